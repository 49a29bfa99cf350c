"""Tasks 4b and 4c: what ResNet18's filters see in one image.

    python task4b.py                          # images/zebra.jpg through the Task 4a model (or ImageNet's)
    python task4b.py --image photo.jpg --filters 0 1 2 3 4
4b: the image through conv1 only; each chosen filter's weights (top) above its activation (bottom).
4c: the image through every block but avgpool and fc (1x512x7x7); the first ten activations.
"""
import argparse
import pathlib

import matplotlib.pyplot as plt
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, UnidentifiedImageError
from torch import nn

import task4a
import utils


def load_image(path, size=224):
    """An image file -> float [1, 3, size, size], resized and normalised as the ImageNet weights expect."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise utils.UserError(f"no image at '{path}': put the course's zebra.jpg into images/ "
                              "(see images/README.md), or pass --image PATH")
    try:
        image = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise utils.UserError(f"'{path}' is not an image PIL can read ({error}): copy it again, or pass another "
                              f"with --image PATH") from None
    transform = T.Compose([T.Resize((size, size)), T.ToTensor(),
                           T.Normalize(task4a.IMAGENET_MEAN, task4a.IMAGENET_STD)])
    return transform(image).unsqueeze(0)


def load_model(checkpoint, weights_path, device):
    """The Task 4a model from `checkpoint` if it exists, else ResNet18 with its ImageNet weights."""
    checkpoint = pathlib.Path(checkpoint)
    if checkpoint.is_file():
        print(f"model: the fine-tuned Task 4a ResNet18 from '{checkpoint}'")
        model = task4a.TransferResNet18(num_classes=10)
        try:
            model.load_state_dict(utils.load_checkpoint(
                checkpoint, device, remedy="run task4a.py again, or pass --checkpoint none to use ImageNet's weights")
                ["model"])
        except (KeyError, RuntimeError) as error:
            raise utils.UserError(f"'{checkpoint}' does not hold a Task 4a model ({error})") from None
    else:
        print(f"model: ResNet18 with its ImageNet weights (no Task 4a checkpoint at '{checkpoint}')")
        model = torchvision.models.resnet18()
        model.load_state_dict(task4a.imagenet_state_dict(weights_path))
    return model.to(device).eval()


def figure_size(columns, rows=2):
    """Inches: a report page's width (report.py prints it at this size, so 9-point text stays 9 points) for up
    to five square panels a row; wider for more."""
    width = max(utils.REPORT_FIGURE_SIZE[0], 1.3 * columns)
    return width, rows * width / columns + 0.8  # the panels, and room for the titles


def plot_first_layer(model, image, filter_indices, path, show=False):
    """Task 4b: conv1's weights (top row, as RGB) above their activations (bottom row) -> activation [1,64,H/2,W/2]."""
    with torch.no_grad():
        activation = model.conv1(image)  # [1, 64, 112, 112] for a 224x224 image
    fig, axes = plt.subplots(2, len(filter_indices), figsize=figure_size(len(filter_indices)), squeeze=False,
                             layout="constrained")
    for column, index in enumerate(filter_indices):
        weight = model.conv1.weight[index].detach().cpu()  # [3, 7, 7]
        weight = (weight - weight.min()) / (weight.max() - weight.min())  # to [0, 1] to show as RGB
        axes[0, column].imshow(weight.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[0, column].set_title(f"filter {index}", fontsize=9)
        axes[1, column].imshow(activation[0, index].cpu().numpy(), cmap="gray")
        axes[1, column].set_title(f"activation {index}", fontsize=9)
    axes[0, 0].set_ylabel("weights (7x7, RGB)", fontsize=9)
    axes[1, 0].set_ylabel("activation", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Task 4b: first convolutional layer (conv1) on the image", fontsize=10)
    utils.save_figure(fig, path, show)
    return activation


def plot_last_block(model, image, count, path, show=False):
    """Task 4c: the image through every block but avgpool and fc -> activation [1,512,H/32,W/32];
    plot the first `count`."""
    blocks = nn.Sequential(*list(model.children())[:-2])  # conv1 ... layer4, without avgpool and fc
    with torch.no_grad():
        activation = blocks(image)  # [1, 512, 7, 7] for a 224x224 image
    print(f"activation after the last convolutional block: {tuple(activation.shape)}")
    columns = (count + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=figure_size(columns), squeeze=False, layout="constrained")
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index < count:
            ax.imshow(activation[0, index].cpu().numpy(), cmap="gray")
            ax.set_title(f"filter {index}", fontsize=9)
    fig.suptitle(f"Task 4c: last convolutional block (layer4), first {count} of 512 filters", fontsize=10)
    utils.save_figure(fig, path, show)
    return activation


def main(argv=()):
    """Make plots/task4b.png and plots/task4c.png; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="task4b.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--image", default="images/zebra.jpg", help="the image to look at")
    parser.add_argument("--filters", type=int, nargs="+", default=[14, 26, 32, 49, 52],
                        help="conv1 filter indices for Task 4b (0 to 63)")
    parser.add_argument("--count", type=utils.positive_int, default=10,
                        help="how many layer4 activations Task 4c shows (at most 512)")
    parser.add_argument("--checkpoint", default="checkpoints/task4a/best.ckpt",
                        help="the Task 4a model; ImageNet's weights are used when it does not exist")
    parser.add_argument("--weights", default=None,
                        help="a local copy of torchvision's resnet18-f37072fd.pth (when no checkpoint)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu; default: the fastest here")
    parser.add_argument("--show", action="store_true", help="also show the plots in a window")
    args = parser.parse_args(argv)
    if not all(0 <= index < 64 for index in args.filters):
        parser.error(f"--filters: conv1 has filters 0 to 63, got {args.filters}")
    if args.count > 512:
        parser.error("--count: layer4 has 512 filters")
    device = utils.get_device(args.device)
    image = load_image(args.image).to(device)
    model = load_model(args.checkpoint, args.weights, device)
    first = plot_first_layer(model, image, args.filters, "plots/task4b.png", args.show)
    last = plot_last_block(model, image, args.count, "plots/task4c.png", args.show)
    return first, last


if __name__ == "__main__":
    utils.run_cli(main)
