"""Task 3: two deep CNNs of our own, trained within 10 epochs, and an ablation study.

    python task3.py                                  # both models, seed 0
    python task3.py --model resnet --seeds 0 1 2     # one model over three seeds (mean ± std)
    python task3.py --model resnet --ablate augmentation   # with and without, one graph (Task 3d)
The recipe (both models): SGD with Nesterov momentum and weight decay, batch 512, a one-cycle
learning rate (linear warm-up, then linear decay to zero, stepped every batch), label smoothing,
random crop + horizontal flip. It follows "How to train your ResNet" (Myrtle.ai, David Page,
https://myrtle.ai/learn/how-to-train-your-resnet/) and Keller Jordan's airbench.
Model selection uses the validation set only; the test set is evaluated once per run, at the end.
"""
import json
import pathlib
import statistics

import torch
from torch import nn

import dataloaders
import utils
from trainer import Trainer
from utils import create_plots

MAX_EPOCHS = 10  # the assignment's limit
# Logits x 1/8, as in Myrtle's ResNet (airbench uses 1/9): max-pooled ReLU features are large, and
# unscaled logits at learning rate 0.4 blow up in the first steps (seen here: the VGG collapsed to
# chance within half an epoch without it).
LOGIT_SCALE = 0.125
TECHNIQUES = ("augmentation", "batchnorm", "schedule", "optimizer", "label_smoothing")


def norm(channels, batch_norm):
    """Batch norm, or nothing when it is ablated."""
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class VGGNet(nn.Module):
    """Model A, plain (no shortcuts): three stages of two 3x3 conv + batch norm + ReLU, each halved by max-pool."""

    def __init__(self, num_classes=10, batch_norm=True):
        super().__init__()
        bias = not batch_norm  # batch norm has its own shift
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=bias), norm(64, batch_norm), nn.ReLU(),       # [B, 64, 32, 32]
            nn.Conv2d(64, 64, 3, padding=1, bias=bias), norm(64, batch_norm), nn.ReLU(),
            nn.MaxPool2d(2),                                                                 # [B, 64, 16, 16]
            nn.Conv2d(64, 128, 3, padding=1, bias=bias), norm(128, batch_norm), nn.ReLU(),   # [B, 128, 16, 16]
            nn.Conv2d(128, 128, 3, padding=1, bias=bias), norm(128, batch_norm), nn.ReLU(),
            nn.MaxPool2d(2),                                                                 # [B, 128, 8, 8]
            nn.Conv2d(128, 256, 3, padding=1, bias=bias), norm(256, batch_norm), nn.ReLU(),  # [B, 256, 8, 8]
            nn.Conv2d(256, 256, 3, padding=1, bias=bias), norm(256, batch_norm), nn.ReLU(),
            nn.MaxPool2d(2),                                                                 # [B, 256, 4, 4]
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),                                                         # [B, 256, 1, 1]
            nn.Flatten(),                                                                    # [B, 256]
            nn.Linear(256, num_classes),                                                     # [B, 10]
        )

    def forward(self, x):
        """Images [B, 3, 32, 32] -> logits [B, num_classes], scaled down as in ResNet9 below."""
        return self.classifier(self.features(x)) * LOGIT_SCALE


class Residual(nn.Module):
    """x + two (3x3 conv + batch norm + ReLU) of x: the shortcut lets gradients skip the block."""

    def __init__(self, channels, batch_norm=True):
        super().__init__()
        bias = not batch_norm
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias), norm(channels, batch_norm), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias), norm(channels, batch_norm), nn.ReLU(),
        )

    def forward(self, x):
        return x + self.block(x)


class ResNet9(nn.Module):
    """Model B, residual: the 9-layer ResNet of Myrtle.ai's DAWNBench entry (conv, 3 stages, 2 residual blocks)."""

    def __init__(self, num_classes=10, batch_norm=True):
        super().__init__()
        bias = not batch_norm
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1, bias=bias), norm(64, batch_norm), nn.ReLU(),       # [B, 64, 32, 32]
            nn.Conv2d(64, 128, 3, padding=1, bias=bias), norm(128, batch_norm), nn.ReLU(),    # [B, 128, 32, 32]
            nn.MaxPool2d(2),                                                                 # [B, 128, 16, 16]
            Residual(128, batch_norm),
            nn.Conv2d(128, 256, 3, padding=1, bias=bias), norm(256, batch_norm), nn.ReLU(),   # [B, 256, 16, 16]
            nn.MaxPool2d(2),                                                                 # [B, 256, 8, 8]
            nn.Conv2d(256, 512, 3, padding=1, bias=bias), norm(512, batch_norm), nn.ReLU(),   # [B, 512, 8, 8]
            nn.MaxPool2d(2),                                                                 # [B, 512, 4, 4]
            Residual(512, batch_norm),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),                                                         # [B, 512, 1, 1]
            nn.Flatten(),                                                                    # [B, 512]
            nn.Linear(512, num_classes, bias=False),                                         # [B, 10]
        )

    def forward(self, x):
        """Images [B, 3, 32, 32] -> logits [B, num_classes], scaled down."""
        return self.classifier(self.features(x)) * LOGIT_SCALE


MODELS = {"vgg": VGGNet, "resnet": ResNet9}


def one_cycle(optimizer, total_steps, warmup_fraction):
    """Learning rate x factor: 0 -> 1 linearly over the warm-up steps, then 1 -> 0 linearly by the last step."""
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step):
        return step / warmup if step < warmup else max(0.0, (total_steps - step) / (total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one(model_name, args, seed, without=None, name=None):
    """Train one model with the recipe (minus the technique `without`) -> its Trainer."""
    utils.set_seed(seed, args.deterministic)
    device = utils.get_device(args.device)
    loaders = dataloaders.load_cifar10(args.batch_size, data_dir=args.data_dir, device=device,
                                       augment=without != "augmentation", seed=seed, split_seed=args.split_seed)
    model = MODELS[model_name](batch_norm=without != "batchnorm").to(device)
    if without == "optimizer":  # Adam at its usual rate instead of SGD with Nesterov momentum
        optimizer = torch.optim.Adam(model.parameters(), lr=args.adam_lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                    nesterov=True, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loaders[0])
    scheduler = None if without == "schedule" else one_cycle(optimizer, total_steps, args.warmup)
    smoothing = 0.0 if without == "label_smoothing" else args.label_smoothing
    settings = dict(vars(args), model=model_name, seed=seed, without=without, augmentation=without != "augmentation",
                    schedule="constant" if without == "schedule" else f"one-cycle, {args.warmup:.0%} warm-up",
                    weight_init="PyTorch defaults (Kaiming-uniform)")
    trainer = Trainer(args.batch_size, args.learning_rate, args.early_stop_count, args.epochs, model, loaders,
                      optimizer=optimizer, scheduler=scheduler,
                      loss_criterion=nn.CrossEntropyLoss(label_smoothing=smoothing), device=device,
                      validations_per_epoch=args.validations_per_epoch,
                      **utils.speed_options(args, device),
                      name=name or f"task3_{model_name}_seed{seed}", settings=settings)
    trainer.train()
    return trainer


def write_layer_table(model_name):
    """results/task3_<model>_layers.md: the layer table the report's Task 3a needs."""
    path = pathlib.Path("results") / f"task3_{model_name}_layers.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(utils.layer_table(MODELS[model_name]()) + "\n")
    print(f"saved {path}")


def mean_std(values, digits=3):
    """'0.912 ± 0.003' (± only with several values)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(results_dir="results"):
    """(header, rows) of Task 3b: final train loss, train / validation / test accuracy per model, over its seeds."""
    header = ["model", "seeds", "epochs", "train loss", "train accuracy", "validation accuracy", "test accuracy"]
    rows = []
    for model_name in MODELS:
        runs = [json.loads(p.read_text()) for p in sorted(pathlib.Path(results_dir).glob(f"task3_{model_name}_seed*.json"))]
        if runs:
            finals = [r["final"] for r in runs]
            rows.append([model_name, ", ".join(str(r["settings"]["seed"]) for r in runs),
                         mean_std([r["epochs_run"] for r in runs], 1)]
                        + [mean_std([f[key] for f in finals]) for key in
                           ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy")])
    return header, rows


def ablation_table(results_dir="results"):
    """(header, rows): test accuracy with and without each technique measured so far (Task 3c)."""
    header = ["technique", "model", "seed", "test accuracy with", "test accuracy without", "difference"]
    rows = []
    for path in sorted(pathlib.Path(results_dir).glob("task3_ablation_*.json")):
        r = json.loads(path.read_text())
        with_, without = r["final"]["with"]["test_accuracy"], r["final"]["without"]["test_accuracy"]
        rows.append([r["technique"], r["model"], str(r["seed"]), f"{with_:.3f}", f"{without:.3f}",
                     f"{with_ - without:+.3f}"])
    return header, rows


def write_table(table, path):
    """Save a (header, rows) table as Markdown and print it."""
    text = utils.markdown_table(*table)
    pathlib.Path(path).write_text(text + "\n")
    print(f"\n{path}:\n{text}")


def ablate(model_name, technique, args):
    """Train with and without `technique` (same seed); one loss graph and a results file (Tasks 3c, 3d)."""
    seed = args.seeds[0]
    runs = {"with": train_one(model_name, args, seed, name=f"task3_{model_name}_ablation_{technique}_with"),
            "without": train_one(model_name, args, seed, without=technique,
                                 name=f"task3_{model_name}_ablation_{technique}_without")}
    fig, axes = utils.new_figure()
    ax = axes[0][0]
    for label, trainer in runs.items():
        utils.plot_history(ax, trainer.train_history["loss"], f"train batches, {label} {technique}", smoothing=0.95)
        utils.plot_history(ax, trainer.validation_history["loss"], f"validation, {label} {technique}")
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"{model_name}: with and without {technique}")
    utils.add_epoch_axis(ax, runs["with"].steps_per_epoch)
    ax.grid(alpha=0.3)
    ax.legend()
    utils.save_figure(fig, f"plots/task3_ablation_{technique}.png", args.show)
    record = {label: trainer.final for label, trainer in runs.items()}
    utils.save_json(dict(model=model_name, technique=technique, seed=seed, final=record),
                    f"results/task3_ablation_{technique}.json")
    write_table(ablation_table(), "results/task3_ablation.md")


def main(argv=()):
    """Train, summarise and plot; `argv` as on the command line (the defaults when called with none)."""
    parser = utils.common_parser("task3.py", __doc__, epochs=MAX_EPOCHS, batch_size=512, learning_rate=0.4,
                                 early_stop_count=4)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which network to train")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: --seed)")
    parser.add_argument("--ablate", choices=TECHNIQUES, default=None,
                        help="train with and without this technique and compare (model: --model, default resnet)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD's Nesterov momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on every weight")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the steps spent warming up")
    parser.add_argument("--label-smoothing", type=float, default=0.2, help="of the training loss")
    parser.add_argument("--adam-lr", type=utils.positive_float, default=1e-3,
                        help="Adam's learning rate, for --ablate optimizer")
    args = parser.parse_args(argv)
    if args.epochs > MAX_EPOCHS:
        parser.error(f"--epochs: Task 3 allows at most {MAX_EPOCHS} epochs")
    args.seeds = args.seeds or [args.seed]
    if args.ablate:
        model_name = "resnet" if args.model == "all" else args.model
        ablate(model_name, args.ablate, args)
        return
    for model_name in (MODELS if args.model == "all" else [args.model]):
        write_layer_table(model_name)
        for seed in args.seeds:
            trainer = train_one(model_name, args, seed)
            create_plots(trainer, trainer.name, args.show)
    write_table(summary_table(), "results/task3_summary.md")


if __name__ == "__main__":
    utils.run_cli(main)
