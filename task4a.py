"""Task 4a: transfer learning with torchvision's ImageNet-pretrained ResNet18 (only layer4 and fc learn).

    python task4a.py                       # Adam, lr 5e-4, batch 32, at most 5 epochs, 224x224 inputs
    python task4a.py --image-size 112      # four times less work per image, for slow machines
    python task4a.py --weights resnet18-f37072fd.pth   # a local copy of the ImageNet weights (no internet)
"""
import os
import warnings

import torch
import torchvision
from torch import nn

import dataloaders
import utils
from trainer import Trainer
from utils import create_plots

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
# The weights declare how their training images were normalised; CIFAR-10 images must match.
IMAGENET_MEAN, IMAGENET_STD = tuple(WEIGHTS.transforms().mean), tuple(WEIGHTS.transforms().std)


class TransferResNet18(torchvision.models.ResNet):
    """torchvision's ResNet18 with a `num_classes`-way fc; every parameter frozen except layer4 and fc.

    With keep_imagenet_bn_stats, the frozen layers' batch norms stay in eval mode while training,
    so they normalise with the statistics ImageNet left them; by default (as the course's
    reference run) they are in train mode like the rest and re-estimate them on CIFAR-10.
    """

    def __init__(self, num_classes=10, imagenet_state_dict=None, keep_imagenet_bn_stats=False):
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])  # ResNet18, 1000-way fc
        if imagenet_state_dict is not None:
            self.load_state_dict(imagenet_state_dict)
        self.fc = nn.Linear(self.fc.in_features, num_classes)  # [B, 512] -> [B, num_classes]
        self.requires_grad_(False)
        self.layer4.requires_grad_(True)
        self.fc.requires_grad_(True)
        self.keep_imagenet_bn_stats = keep_imagenet_bn_stats

    def train(self, mode=True):
        """As nn.Module.train, but the frozen layers' batch norms may stay in eval mode."""
        super().train(mode)
        if mode and self.keep_imagenet_bn_stats:
            for name, module in self.named_modules():
                if isinstance(module, nn.BatchNorm2d) and not name.startswith("layer4"):
                    module.eval()
        return self


def cached_weights_path():
    """Where torchvision keeps the downloaded ImageNet weights of ResNet18."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))


def imagenet_state_dict(weights_path=None):
    """The ImageNet weights of ResNet18: from `weights_path`, else torchvision's cache or download."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise utils.UserError(f"--weights {weights_path}: no such file")
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (empty, cut short, not a PyTorch file: unreadable either way)
            raise utils.UserError(f"--weights {weights_path}: not a readable PyTorch file ({type(error).__name__}); "
                                  f"copy {os.path.basename(WEIGHTS.url)} over again") from None
        expected = torchvision.models.resnet18().state_dict()
        if not isinstance(state_dict, dict) or state_dict.keys() != expected.keys():
            raise utils.UserError(f"--weights {weights_path}: not a state dict of torchvision's ResNet18 "
                                  f"(such as {os.path.basename(WEIGHTS.url)})")
        return state_dict
    state_dict, failure = utils.try_download(torch.hub.load_state_dict_from_url, WEIGHTS.url,
                                             folder=os.path.dirname(cached_weights_path()),
                                             progress=True, check_hash=True, map_location="cpu", weights_only=True)
    if failure is not None:
        raise utils.UserError(
            f"could not download ResNet18's ImageNet weights ({failure}). torchvision keeps them as "
            f"'{cached_weights_path()}': copy {os.path.basename(WEIGHTS.url)} there from a machine with "
            f"internet, or pass it with --weights PATH")
    return state_dict


def build_model(weights_path=None, pretrained=True, keep_imagenet_bn_stats=False):
    """A TransferResNet18 for CIFAR-10, ImageNet-initialised unless pretrained=False."""
    if not pretrained:
        warnings.warn("--no-pretrained: ResNet18 starts from random weights; its accuracy means "
                      "nothing for Task 4 (use it for smoke tests only)", stacklevel=2)
    state_dict = imagenet_state_dict(weights_path) if pretrained else None
    return TransferResNet18(10, state_dict, keep_imagenet_bn_stats)


def count_parameters(model):
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def build_parser():
    """The command line, with Task 4a's settings as defaults (the report states them before a run)."""
    parser = utils.common_parser("task4a.py", __doc__, epochs=5, batch_size=32, learning_rate=5e-4,
                                 early_stop_count=4)
    parser.add_argument("--image-size", type=utils.positive_int, default=224,
                        help="side of the square the 32x32 images are resized to, on the device")
    parser.add_argument("--weights", default=None,
                        help="a local copy of torchvision's resnet18-f37072fd.pth instead of the download")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random initial weights: smoke tests only, the results mean nothing")
    parser.add_argument("--keep-imagenet-bn-stats", action="store_true",
                        help="frozen layers' batch norms keep ImageNet's statistics instead of re-estimating them")
    return parser


def main(argv=()):
    """Fine-tune, evaluate and plot; `argv` as on the command line (the defaults when called with none)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_pretrained and args.weights:
        parser.error("--weights and --no-pretrained exclude each other")
    utils.set_seed(args.seed, args.deterministic)
    device = utils.get_device(args.device)
    model = build_model(args.weights, not args.no_pretrained, args.keep_imagenet_bn_stats)
    trainable, total = count_parameters(model)
    print(f"ResNet18: {trainable:,} of {total:,} parameters trainable (layer4 and fc)")
    loaders = dataloaders.load_cifar10(args.batch_size, data_dir=args.data_dir, device=device,
                                       mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=args.image_size,
                                       seed=args.seed, split_seed=args.split_seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    trainer = Trainer(args.batch_size, args.learning_rate, args.early_stop_count, args.epochs, model, loaders,
                      optimizer=optimizer, device=device, validations_per_epoch=args.validations_per_epoch,
                      **utils.speed_options(args, device), **utils.checkpoint_options(args),
                      name="task4a", settings=dict(vars(args), trainable_parameters=trainable))
    trainer.train()
    create_plots(trainer, "task4a", args.show)
    warning = " (random initial weights: not a Task 4 result)" if args.no_pretrained else ""
    print(f"Task 4a test accuracy: {trainer.final['test_accuracy']:.4f}{warning}")
    return trainer


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
