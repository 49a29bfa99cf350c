"""Speed on the device at hand: our device-resident loaders against the standard DataLoader pipeline,
and what mixed precision, channels-last and torch.compile add.

    python benchmark.py --data-dir data/cifar10-jpeg                    # all three parts
    python benchmark.py --models task2 --full-run-epochs 0              # a few minutes on a CPU
Three Markdown tables, printed and saved together as results/benchmark_<device>.md:
1. the input pipeline alone, images per second, for the three ways the tasks feed their models;
2. training throughput of the Task 2 CNN, the Task 3 whitened VGG and the Task 4a ResNet18 (random
   weights: speed does not depend on them), with each pipeline and each speed lever;
3. a whole Task 2 training (validation and final evaluation included) with each pipeline.
"Standard" is the course starter's pipeline: a DataLoader with worker processes over a dataset
that turns each uint8 image into a PIL image and applies torchvision transforms to it, as
torchvision.datasets.CIFAR10 does. Every timing starts after warm-up steps, reads the clock only
after the device has finished its queued work, and is the median of several repeats.
"""
import argparse
import copy
import dataclasses
import itertools
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

import dataloaders
import task2
import task3
import task4a
import utils
from trainer import Trainer

PLAIN = dict(autocast_dtype=None, channels_last=False, compile_model=False)  # float32, NCHW, eager
LEVERS = ("autocast", "channels_last", "compile")


@dataclasses.dataclass
class Workload:
    """How one task trains: its model, optimizer, batch size and input pipeline."""
    title: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[list], torch.optim.Optimizer]  # trainable parameters -> optimizer
    batch_size: int
    mean: tuple
    std: tuple
    augment: bool = False
    crop_padding: int = 4  # pixels; the augmentation's largest translation
    padding_mode: str = "zeros"  # or "reflect"
    flip: str = "random"  # or "alternate" (ours only; the standard pipeline flips at random)
    label_smoothing: float = 0.0
    image_size: int | None = None  # None: the 32x32 images as they are


def workloads(image_size):
    """The three networks with the settings their task scripts train them with."""
    vgg = task3.RECIPES["vgg"]
    return {
        "task2": Workload("Task 2 CNN", lambda: task2.ExampleModel(3, 10),
                          lambda params: torch.optim.SGD(params, lr=5e-2), 64,
                          dataloaders.COURSE_MEAN, dataloaders.COURSE_STD),
        # The whitened VGG at a constant rate below the schedule's peak: there is no warm-up here, and speed
        # does not depend on the rate.
        "task3": Workload("Task 3 whitened VGG", task3.WhitenedVGG,
                          lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.85, nesterov=True,
                                                         weight_decay=5e-4),
                          vgg["batch_size"], dataloaders.COURSE_MEAN, dataloaders.COURSE_STD, augment=True,
                          crop_padding=vgg["translate"], padding_mode=vgg["border"], flip=vgg["flip"],
                          label_smoothing=vgg["label_smoothing"]),
        "task4a": Workload(f"Task 4a ResNet18 at {image_size}x{image_size}",
                           lambda: task4a.TransferResNet18(num_classes=10),
                           lambda params: torch.optim.Adam(params, lr=5e-4), 32,
                           task4a.IMAGENET_MEAN, task4a.IMAGENET_STD, image_size=image_size),
    }


# ---------------------------------------------------------------- the standard pipeline

class PILDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per image: a PIL image from the uint8 array, then transforms."""

    def __init__(self, images, labels, augmentation, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()  # uint8 [N,H,W,3], as PIL reads arrays
        self.labels = labels.tolist()
        self.augmentation = augmentation  # random transforms, training only
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        return self.transform(self.augmentation(image)), self.labels[index]

    def unaugmented(self):
        """The same images without the random transforms."""
        dataset = copy.copy(self)
        dataset.augmentation = T.Compose([])
        return dataset


class StandardLoader(torch.utils.data.DataLoader):
    """The starter's DataLoader, plus the one method the Trainer asks of a training loader."""

    def batches(self, start=0):
        """One epoch's batches from batch `start` on: the Trainer's way of asking (the benchmark never resumes)."""
        return itertools.islice(iter(self), start, None)

    def state_dict(self):
        """Nothing to save: the benchmark never resumes a run."""
        return {}

    @property
    def num_images(self):
        return len(self.dataset)

    def evaluation_view(self, batch_size):
        """The same images in order, unaugmented."""
        return StandardLoader(self.dataset.unaugmented(), batch_size, num_workers=self.num_workers,
                              pin_memory=self.pin_memory)


def standard_loader(images, labels, workload, device, workers, batch_size=None, train=True):
    """A DataLoader of PIL-transformed images, batches of `batch_size` (default: the workload's)."""
    batch_size = batch_size or workload.batch_size
    padding_mode = "constant" if workload.padding_mode == "zeros" else workload.padding_mode
    augmentation = ([T.RandomCrop(32, padding=workload.crop_padding, padding_mode=padding_mode),
                     T.RandomHorizontalFlip()] if workload.augment and train else [])
    resize = [T.Resize(workload.image_size)] if workload.image_size else []
    dataset = PILDataset(images, labels, T.Compose(augmentation),
                         T.Compose([*resize, T.ToTensor(), T.Normalize(workload.mean, workload.std)]))
    return StandardLoader(dataset, batch_size, shuffle=train, num_workers=workers,
                          pin_memory=device.type == "cuda", drop_last=train and len(dataset) >= batch_size)


def our_loader(images, labels, workload, device):
    """The training DeviceLoader the task scripts use for this workload."""
    return dataloaders.DeviceLoader(images.to(device), labels.to(device), workload.batch_size,
                                    mean=workload.mean, std=workload.std, shuffle=True,
                                    augment=workload.augment, crop_padding=workload.crop_padding,
                                    padding_mode=workload.padding_mode, flip=workload.flip,
                                    image_size=workload.image_size)


# ---------------------------------------------------------------- timing

def synchronize(device):
    """Wait until `device` has run everything queued, so a clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def endless(loader):
    """Batches from `loader`, epoch after epoch."""
    while True:
        yield from loader


def timed_rate(step, device, batches, repeats):
    """Median over `repeats` of images per second, each over `batches` calls of step() -> batch size."""
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        images = sum(step() for _ in range(batches))
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def pipeline_rate(loader, device, batches, repeats):
    """Images per second that `loader` delivers onto `device`, no model."""
    stream = endless(loader)

    def step():
        images, labels = next(stream)
        images.to(device, non_blocking=True)
        return len(labels)

    step()  # warm-up: worker processes start, memory is allocated
    return timed_rate(step, device, batches, repeats)


def training_rate(workload, loader, device, speed, steps, warmup_steps, repeats, scratch):
    """(images per second, seconds of the warm-up steps) of Trainer.train_step with `speed` keywords."""
    torch.manual_seed(0)
    model = workload.model()
    optimizer = workload.optimizer([p for p in model.parameters() if p.requires_grad])
    trainer = Trainer(workload.batch_size, optimizer.defaults["lr"], 1, 1, model, (loader, loader, loader),
                      optimizer=optimizer, loss_criterion=nn.CrossEntropyLoss(label_smoothing=workload.label_smoothing),
                      device=device, checkpoint_dir=scratch, results_dir=scratch, **speed)
    stream = endless(loader)

    def step():
        images, labels = next(stream)
        trainer.train_step(images, labels)
        return len(labels)

    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup_steps):  # torch.compile compiles here, cuDNN picks its kernels
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    return timed_rate(step, device, steps, repeats), warmup_s


# ---------------------------------------------------------------- the three parts

def pipeline_table(train_images, train_labels, device, args):
    """Part 1: images per second of each input pipeline alone."""
    header = ["input pipeline", "batch", "standard (img/s)", "ours (img/s)", "ours / standard"]
    rows = []
    jobs = workloads(args.image_size)
    for name, what in (("task2", "32x32, normalise (Task 2)"), ("task3", "32x32, crop + flip + normalise (Task 3)"),
                       ("task4a", f"resize to {args.image_size}x{args.image_size} + normalise (Task 4a)")):
        workload = jobs[name]
        standard = pipeline_rate(standard_loader(train_images, train_labels, workload, device, args.workers),
                                 device, args.pipeline_batches, args.repeats)
        ours = pipeline_rate(our_loader(train_images, train_labels, workload, device),
                             device, args.pipeline_batches, args.repeats)
        rows.append([what, str(workload.batch_size), f"{standard:,.0f}", f"{ours:,.0f}", f"{ours / standard:.1f}x"])
        print(f"pipeline {what}: standard {standard:,.0f} img/s, ours {ours:,.0f} img/s")
    return header, rows


def configurations(device, levers):
    """(label, pipeline, Trainer speed keywords) to time per network, the starter's way first."""
    configs = [("standard, float32", "standard", PLAIN), ("ours, float32", "ours", PLAIN)]
    dtype = utils.autocast_dtype(device, "bfloat16" if device.type == "cpu" else "auto")  # CPU: native or not
    if "autocast" in levers and dtype is not None:
        native = "" if device.type != "cpu" else " (native)" if utils.cpu_computes_bfloat16() else " (emulated)"
        label = f"ours + {str(dtype).removeprefix('torch.')} autocast{native}"
        configs.append((label, "ours", dict(PLAIN, autocast_dtype=dtype)))
    if "channels_last" in levers:
        configs.append(("ours + channels-last", "ours", dict(PLAIN, channels_last=True)))
    if "compile" in levers:
        configs.append(("ours + torch.compile", "ours", dict(PLAIN, compile_model=True)))
    defaults = task_defaults(device)
    if all(speed != defaults for _, pipeline, speed in configs if pipeline == "ours"):  # no row says it yet
        configs.append(("ours, the task scripts' defaults", "ours", defaults))
    compiled_defaults = dict(defaults, compile_model=True)  # what --compile gives on top of the defaults
    if "compile" in levers and compiled_defaults != dict(PLAIN, compile_model=True):
        configs.append(("ours, the defaults + torch.compile (--compile)", "ours", compiled_defaults))
    return configs


def task_defaults(device):
    """The speed keywords a task script uses on `device` when no speed flag is given."""
    return utils.speed_options(argparse.Namespace(precision="auto", no_channels_last=False, compile=False), device)


def throughput_table(train_images, train_labels, device, args, scratch):
    """Part 2: training images per second and seconds per epoch, per network, pipeline and lever."""
    header = ["network", "pipeline, levers", "batch", "img/s", "s / epoch", "vs standard", "warm-up s"]
    rows = []
    jobs = workloads(args.image_size)
    for name in args.models:
        workload = jobs[name]
        loaders = dict(standard=standard_loader(train_images, train_labels, workload, device, args.workers),
                       ours=our_loader(train_images, train_labels, workload, device))
        baseline = None
        for label, pipeline, speed in configurations(device, args.levers):
            rate, warmup_s = training_rate(workload, loaders[pipeline], device, speed, args.steps,
                                           args.warmup_steps, args.repeats, scratch)
            baseline = baseline or rate
            rows.append([workload.title, label, str(workload.batch_size), f"{rate:,.0f}",
                         f"{len(train_labels) / rate:,.1f}", f"{rate / baseline:.2f}x", f"{warmup_s:.1f}"])
            print(f"{workload.title}, {label}: {rate:,.0f} img/s (warm-up {warmup_s:.1f} s)")
    return header, rows


def full_run_table(data_dir, device, args, scratch):
    """Part 3: a whole Task 2 training with the standard pipeline (float32) and with task2.py's own."""
    header = ["Task 2 training", "epochs", "training s", "whole run s", "test accuracy", "speed-up"]
    rows = []
    workload = workloads(args.image_size)["task2"]
    eval_batch_size = max(workload.batch_size, dataloaders.EVAL_BATCH_SIZE)  # as load_cifar10's
    baseline = None
    for label, pipeline, speed in (("standard pipeline, float32 (the starter)", "standard", PLAIN),
                                   ("ours, task2.py's defaults", "ours", task_defaults(device))):
        start = time.perf_counter()  # both runs read the data (decoded once, from the cache) in the timed part
        if pipeline == "standard":
            train_images, train_labels, test_images, test_labels, _ = dataloaders.read_cifar10(data_dir)
            train_index, val_index = dataloaders.split_indices(len(train_labels), 0.1, split_seed=0)
            loaders = (standard_loader(train_images[train_index], train_labels[train_index], workload, device,
                                       args.workers),
                       standard_loader(train_images[val_index], train_labels[val_index], workload, device,
                                       args.workers, batch_size=eval_batch_size, train=False),
                       standard_loader(test_images, test_labels, workload, device, args.workers,
                                       batch_size=eval_batch_size, train=False))
        else:
            loaders = dataloaders.load_cifar10(workload.batch_size, data_dir=data_dir, device=device)
        utils.set_seed(0)
        model = workload.model()
        trainer = Trainer(workload.batch_size, 5e-2, 2 * args.full_run_epochs + 1, args.full_run_epochs, model,
                          loaders, optimizer=workload.optimizer(model.parameters()), device=device,
                          name=f"benchmark_task2_{pipeline}", checkpoint_dir=scratch, results_dir=scratch, **speed)
        trainer.train()  # early stopping is off (count > validations), so both runs do the same work
        synchronize(device)
        wall = time.perf_counter() - start
        baseline = baseline or wall
        rows.append([label, str(args.full_run_epochs), f"{trainer.train_time:.1f}", f"{wall:.1f}",
                     f"{trainer.final['test_accuracy']:.3f}", f"{baseline / wall:.1f}x"])
    return header, rows


def main(argv=()):
    """Measure, print and save the tables; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10 folder, as for the task scripts")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu; default: the task scripts' choice")
    parser.add_argument("--models", nargs="*", choices=("task2", "task3", "task4a"),
                        default=["task2", "task3", "task4a"], help="networks for the throughput table (none: skip it)")
    parser.add_argument("--levers", nargs="*", choices=LEVERS, default=list(LEVERS),
                        help="speed levers to time one by one (autocast: on the CPU bfloat16, native or emulated)")
    parser.add_argument("--steps", type=utils.positive_int, default=50, help="training steps per timed repeat")
    parser.add_argument("--warmup-steps", type=utils.positive_int, default=10,
                        help="untimed training steps first (compilation, cuDNN autotuning)")
    parser.add_argument("--repeats", type=utils.positive_int, default=3, help="timed repeats; the median is kept")
    parser.add_argument("--pipeline-batches", type=utils.positive_int, default=200,
                        help="batches per timed repeat of the input pipeline alone")
    parser.add_argument("--full-run-epochs", type=int, default=10,
                        help="epochs of the whole Task 2 training with each pipeline; 0 skips it")
    parser.add_argument("--image-size", type=utils.positive_int, default=224, help="Task 4a's input side")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the standard DataLoader")
    parser.add_argument("--out", default=None, help="where to save the tables (default results/benchmark_<device>.md)")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.full_run_epochs < 0:
        parser.error("--workers and --full-run-epochs must not be negative")
    device = utils.get_device(args.device)
    utils.set_seed(0)

    train_images, train_labels, _, _, _ = dataloaders.read_cifar10(args.data_dir)
    train_images, train_labels = train_images[:45_000], train_labels[:45_000]  # an epoch of Task 2's size
    sections = [f"Device: {utils.describe_device(device)}; PyTorch {torch.__version__}; data: {args.data_dir} "
                f"({len(train_labels):,} training images an epoch); standard DataLoader with "
                f"{args.workers} workers; medians of {args.repeats} repeats."]
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's checkpoints: nothing of the user's is touched
        sections.append("1. Input pipeline alone\n\n" + utils.markdown_table(
            *pipeline_table(train_images, train_labels, device, args)))
        if args.models:
            sections.append(f"2. Training throughput ({args.steps} steps a repeat, after {args.warmup_steps} "
                            "warm-up steps)\n\n" + utils.markdown_table(
                                *throughput_table(train_images, train_labels, device, args, scratch)))
        if args.full_run_epochs > 0:
            sections.append("3. Whole Task 2 training (early stopping off), final evaluation included\n\n"
                            + utils.markdown_table(*full_run_table(args.data_dir, device, args, scratch)))
    text = "\n\n".join(sections) + "\n"
    out = pathlib.Path(args.out or f"results/benchmark_{device.type}.md")
    utils.save_text(text, out)
    print("\n" + text + f"saved {out}")


if __name__ == "__main__":
    utils.run_cli(main)
