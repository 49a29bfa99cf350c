"""Task 3: two deep CNNs of our own, trained within 10 epochs, and an ablation study.

    python task3.py                                  # both models, seed 0
    python task3.py --model vgg --seeds 0 1 2        # one model over three seeds (mean ± std)
    python task3.py --ablate lookahead               # the cheaper model with and without it (Task 3c, 3d)
Both networks are built for accuracy per arithmetic operation, after Keller Jordan's airbench94
(https://github.com/KellerJordan/cifar10-airbench, https://arxiv.org/abs/2404.00498), which in
turn builds on "How to train your ResNet" (David Page, https://myrtle.ai/learn/how-to-train-your-resnet/):
a fixed 2x2 whitening first layer, pooling right after the first conv of each stage so that most
convolutions run at a quarter of the resolution, batch norm with a fixed scale, GELU, logits scaled
by 1/9. The recipe: Nesterov SGD with a per-example learning rate and decoupled weight decay,
64x the rate for batch-norm shifts, a triangular schedule, label smoothing 0.2, Lookahead weight
averaging, alternating flips and 2-pixel translations, and test-time flips and shifts. vgg follows it
for 10 epochs; resnet for 8, its conv filters trained by Muon instead of SGD (RECIPES;
https://kellerjordan.github.io/posts/muon/, as in airbench94_muon).
--lr and --weight-decay are per 1024 images: the rate and decay a step uses scale with --batch-size.
Model selection uses the validation set only; the test set is evaluated once per run, at the end.
"""
import argparse
import json
import pathlib
import statistics

import torch
from torch import nn

import dataloaders
import utils
from trainer import Lookahead, Muon, Trainer, parameter_groups, warmup_decay
from utils import create_plots

MAX_EPOCHS = 10  # the assignment's limit
LOGIT_SCALE = 1 / 9  # airbench's: unscaled logits of max-pooled features are too large for label smoothing's targets
WHITENING_IMAGES = 5000  # training images whose 2x2 patches fit the whitening layer
TECHNIQUES = ("augmentation", "alternating_flip", "whitening", "lookahead", "label_smoothing")


class BatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1: only the shift is learnt. A learnt scale adds nothing before a
    conv that can scale its own weights, and fixing it stops weight decay and the scale fighting
    (airbench). PyTorch's momentum 0.4 weighs each batch's statistics (airbench's 0.6 for the old)."""

    def __init__(self, channels, momentum=0.4, eps=1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


def conv3x3(channels_in, channels_out, identity_init=True):
    """3x3 conv, padding 1, no bias (batch norm follows). identity_init: the first channels_in filters
    start as the identity (Dirac), an implicit shortcut at initialisation (airbench)."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
    if identity_init:
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:channels_in])
    return conv


class Whitening(nn.Conv2d):
    """2x2 conv, no padding, 24 filters: 12 that decorrelate the 12 values of each 2x2 RGB patch and
    scale each principal direction to unit variance (PCA whitening, fitted once by `fit`), and their negatives,
    so that the GELU after it passes both signs. Its weights are fixed; only its bias trains.
    Page, "How to train your ResNet 8", https://myrtle.ai/learn/how-to-train-your-resnet-8-bag-of-tricks/."""

    def __init__(self, kernel_size=2):
        super().__init__(3, 2 * 3 * kernel_size ** 2, kernel_size, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def fit(self, images, eps=5e-4):
        """Set the filters from `images` (float [N,3,H,W], normalised as in training). A direction of variance v
        leaves with variance v / (v + eps): unit variance where v >> eps, damped where v is not (airbench: 5e-4)."""
        k = self.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, 3, H-k+1, W-k+1, k, k]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)  # one row per patch
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # columns: principal directions
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(-1, 3, k, k)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.bias.zero_()


class WhitenedVGG(nn.Module):
    """Model A, plain: whitening, then three stages of conv, max-pool, batch norm, GELU, conv, batch norm, GELU.
    The last pool takes the maximum over whatever map is left (3x3 for whole images), so that the network
    also trains on smaller crops (--crop-sizes)."""

    def __init__(self, num_classes=10, widths=(64, 256, 256), whitening=True):
        super().__init__()
        self.whiten = Whitening()
        self.whiten.weight.requires_grad_(not whitening)  # without it: an ordinary, learnt first layer
        c0, c1, c2, c3 = self.whiten.out_channels, *widths
        self.features = nn.Sequential(
            self.whiten,                                                          # [B, 24, 31, 31]
            nn.GELU(),
            conv3x3(c0, c1), nn.MaxPool2d(2), BatchNorm(c1), nn.GELU(),          # [B, 64, 15, 15]
            conv3x3(c1, c1), BatchNorm(c1), nn.GELU(),
            conv3x3(c1, c2), nn.MaxPool2d(2), BatchNorm(c2), nn.GELU(),          # [B, 256, 7, 7]
            conv3x3(c2, c2), BatchNorm(c2), nn.GELU(),
            conv3x3(c2, c3), nn.MaxPool2d(2), BatchNorm(c3), nn.GELU(),          # [B, 256, 3, 3]
            conv3x3(c3, c3), BatchNorm(c3), nn.GELU(),
            nn.AdaptiveMaxPool2d(1),                                              # [B, 256, 1, 1]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                                         # [B, 256]
            nn.Linear(c3, num_classes, bias=False),                               # [B, 10]
        )

    def forward(self, x):
        """Images [B, 3, 32, 32] -> logits [B, num_classes], scaled down."""
        return self.classifier(self.features(x)) * LOGIT_SCALE


class Residual(nn.Module):
    """x + block(x): a shortcut around `block`; a row of its own in the layer table, after the block's rows."""
    table_row = True

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def residual_stage(channels_in, channels_out):
    """conv, max-pool, batch norm, GELU; then a shortcut around conv, batch norm, GELU."""
    return nn.Sequential(
        conv3x3(channels_in, channels_out, identity_init=False), nn.MaxPool2d(2), BatchNorm(channels_out), nn.GELU(),
        Residual(nn.Sequential(conv3x3(channels_out, channels_out, identity_init=False),
                               BatchNorm(channels_out), nn.GELU())),
    )


class WhitenedResNet(nn.Module):
    """Model B, residual and narrower: whitening, then three residual stages of half of model A's width."""

    def __init__(self, num_classes=10, widths=(32, 128, 128), whitening=True):
        super().__init__()
        self.whiten = Whitening()
        self.whiten.weight.requires_grad_(not whitening)
        c0, c1, c2, c3 = self.whiten.out_channels, *widths
        self.features = nn.Sequential(
            self.whiten,                                                          # [B, 24, 31, 31]
            nn.GELU(),
            residual_stage(c0, c1),                                               # [B, 32, 15, 15]
            residual_stage(c1, c2),                                               # [B, 128, 7, 7]
            residual_stage(c2, c3),                                               # [B, 128, 3, 3]
            nn.AdaptiveMaxPool2d(1),                                              # [B, 128, 1, 1]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                                                         # [B, 128]
            nn.Linear(c3, num_classes, bias=False),                               # [B, 10]
        )

    def forward(self, x):
        """Images [B, 3, 32, 32] -> logits [B, num_classes], scaled down."""
        return self.classifier(self.features(x)) * LOGIT_SCALE


MODELS = {"vgg": WhitenedVGG, "resnet": WhitenedResNet}
CHEAPER_MODEL = "resnet"  # the one the ablations train
# Where the two recipes differ; --optimizer or --epochs on the command line sets it for both. resnet: 8 epochs
# with Muon reach the validation accuracy of 10 with SGD (3 seeds each), so a run fits 15 minutes of a 2-core
# CPU; Muon matched or beat SGD on validation with TTA in each paired run (records/task3_tuning.md).
RECIPES = {"vgg": dict(optimizer="sgd", epochs=MAX_EPOCHS), "resnet": dict(optimizer="muon", epochs=8)}


def model_args(model_name, args):
    """The command line's settings, with the model's recipe where the command line leaves them open."""
    return argparse.Namespace(**{**vars(args), **{key: value for key, value in RECIPES[model_name].items()
                                                  if getattr(args, key) is None}})


def run_name(model_name, seed, without=None):
    """A run's name: its checkpoints/ folder and results/ file. The full recipe's run is the model's run for the
    seed, whether trained alone or as an ablation's reference."""
    return f"task3_{model_name}_seed{seed}" if without is None else f"task3_{model_name}_without_{without}_seed{seed}"


def run_settings(model_name, args, seed, without=None):
    """Every setting of one run, for its results file (and the check that a saved run is this one)."""
    # Not --ablate (it picks runs) nor --lr (the Trainer records the rate for this batch size as learning_rate).
    return dict({key: value for key, value in vars(args).items() if key not in ("ablate", "learning_rate")},
                model=model_name, seed=seed, without=without,
                augmentation=without != "augmentation",
                flip="random" if without == "alternating_flip" else "alternate",
                whitening=without != "whitening",
                label_smoothing=0.0 if without == "label_smoothing" else args.label_smoothing,
                schedule=f"triangular: x0.2 -> x1 at 23 % of the steps -> x{args.final_lr_scale:g} at the end",
                lr_per_1024_images=args.learning_rate, weight_decay_per_1024_images=args.weight_decay,
                weight_decay_per_step=args.weight_decay * args.batch_size / 1024,
                weight_init="whitening fitted to 5,000 training images; convs Kaiming-uniform "
                            "(PyTorch's default), VGG's with Dirac identity filters first")


def train_one(model_name, args, seed, without=None):
    """Train one model with the recipe (minus the technique `without`) -> its Trainer. With --resume, a run
    with a checkpoint continues (or, finished, is left as it is); one without starts afresh."""
    utils.set_seed(seed, args.deterministic)
    device = utils.get_device(args.device)
    loaders = dataloaders.load_cifar10(
        args.batch_size, data_dir=args.data_dir, device=device, seed=seed, split_seed=args.split_seed,
        augment=without != "augmentation", crop_padding=args.translate, padding_mode="reflect",
        flip="random" if without == "alternating_flip" else "alternate",
        crop_sizes=args.crop_sizes if without != "augmentation" else ())
    model = make_model(model_name, args, whitening=without != "whitening")
    if without != "whitening":
        train = loaders[0]
        model.whiten.fit(train.to_model_input(train.images[:WHITENING_IMAGES]).cpu(), eps=args.whiten_eps)
    # A per-example learning rate: the step for the mean loss of a batch grows with the batch.
    learning_rate = args.learning_rate * args.batch_size / 1024
    weight_decay = args.weight_decay * args.batch_size / 1024
    groups = parameter_groups(model, learning_rate, weight_decay, norm_bias_lr_scale=args.bias_lr_scale,
                              filters_apart=args.optimizer == "muon")
    if args.optimizer == "muon":  # the conv filters by Muon, the rest (biases, the linear layer) by Nesterov SGD
        for group in groups:
            if group["name"] == "conv filters":
                group.update(lr=args.muon_lr, momentum=args.muon_momentum, weight_decay=0.0, orthogonalize=True)
        optimizer = Muon(groups, lr=learning_rate, momentum=args.momentum)
    else:
        optimizer = torch.optim.SGD(groups, lr=learning_rate, momentum=args.momentum, nesterov=True)
    steps_per_epoch = len(loaders[0])
    total_steps = args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_decay(total_steps, start=0.2, peak_at=0.23, end=args.final_lr_scale))
    # airbench's averaging, every 5 steps of 1024 images, kept at the same number of images per update.
    lookahead = None if without == "lookahead" else Lookahead(
        total_steps, start_step=3 * steps_per_epoch, every=max(1, round(5 * 1024 / args.batch_size)))
    settings = run_settings(model_name, args, seed, without)
    name = run_name(model_name, seed, without)
    resume = args.resume and (pathlib.Path("checkpoints") / name / "last.ckpt").is_file()
    trainer = Trainer(args.batch_size, learning_rate, args.early_stop_count, args.epochs, model, loaders,
                      optimizer=optimizer, scheduler=scheduler, lookahead=lookahead, tta_level=args.tta_level,
                      loss_criterion=nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"]), device=device,
                      # The whitening layer's bias trains for the first epochs only, then stays (airbench).
                      freeze_after={"whiten.bias": args.whiten_bias_epochs * steps_per_epoch},
                      validations_per_epoch=args.validations_per_epoch,
                      **utils.speed_options(args, device), **utils.checkpoint_options(args, resume),
                      name=name, settings=settings)
    trainer.train()
    return trainer


def make_model(model_name, args, **kwargs):
    """The network `model_name`, at --widths where given."""
    return MODELS[model_name](**kwargs, **(dict(widths=tuple(args.widths)) if args.widths else {}))


def write_layer_table(model_name, args):
    """results/task3_<model>_layers.md: the layer table the report's Task 3a needs."""
    path = pathlib.Path("results") / f"task3_{model_name}_layers.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(utils.layer_table(make_model(model_name, args)) + "\n")
    print(f"saved {path}")


def mean_std(values, digits=3):
    """'0.912 ± 0.003' (± only with several values)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(results_dir="results"):
    """(header, rows) of Task 3b: final train loss, train / validation / test accuracy per model, over its seeds."""
    header = ["model", "seeds", "epochs", "train loss", "train accuracy", "validation accuracy", "test accuracy",
              "test accuracy, TTA", "wall time (min)"]
    rows = []
    for model_name in MODELS:
        runs = [json.loads(p.read_text()) for p in sorted(pathlib.Path(results_dir).glob(f"task3_{model_name}_seed*.json"))]
        if runs:
            finals = [r["final"] for r in runs]
            tta = [f["test_accuracy_tta"] for f in finals if "test_accuracy_tta" in f]
            rows.append([model_name, ", ".join(str(r["settings"]["seed"]) for r in runs),
                         mean_std([r["epochs_run"] for r in runs], 1)]
                        + [mean_std([f[key] for f in finals]) for key in
                           ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy")]
                        + [mean_std(tta) if len(tta) == len(finals) else "–",
                           mean_std([r["wall_time_s"] / 60 for r in runs], 1)])
    return header, rows


def ablation_table(results_dir="results"):
    """(header, rows): test accuracy (plain, and with TTA where measured) with and without each technique
    measured so far (Task 3c)."""
    header = ["technique", "model", "seed", "test accuracy with", "test accuracy without", "difference"]
    rows = []
    for path in sorted(pathlib.Path(results_dir).glob("task3_ablation_*.json")):
        r = json.loads(path.read_text())
        for suffix, label in (("", ""), ("_tta", " (TTA)")):
            key = "test_accuracy" + suffix
            if key in r["final"]["with"] and key in r["final"]["without"]:
                with_, without = r["final"]["with"][key], r["final"]["without"][key]
                rows.append([r["technique"] + label, r["model"], str(r["seed"]), f"{with_:.3f}", f"{without:.3f}",
                             f"{with_ - without:+.3f}"])
    return header, rows


def write_table(table, path):
    """Save a (header, rows) table as Markdown and print it."""
    text = utils.markdown_table(*table)
    pathlib.Path(path).write_text(text + "\n")
    print(f"\n{path}:\n{text}")


def saved_run(name, settings, results_dir="results"):
    """results/<name>.json if it holds a finished run with these settings (device and speed levers aside), else None."""
    path = pathlib.Path(results_dir) / f"{name}.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    same = all(results["settings"].get(key) == value for key, value in settings.items()
               if key not in utils.RESUME_MAY_CHANGE)
    return results if same else None


def ablate(model_name, technique, args):
    """Compare the recipe with and without `technique`, same seed (Tasks 3c, 3d): one loss graph, one results file.

    The run with it is the model's own run for the seed (results/task3_<model>_seed<N>.json): one reference
    for every ablation, trained here only where results/ lacks it with these settings.
    """
    seed = args.seeds[0]
    name = run_name(model_name, seed)
    if saved_run(name, run_settings(model_name, args, seed)) is None:
        trainer = train_one(model_name, args, seed)
        create_plots(trainer, trainer.name, args.show)
    else:
        print(f"{name}: made already with these settings; 'results/{name}.json' is the run with {technique}")
    train_one(model_name, args, seed, without=technique)
    runs = {label: json.loads((pathlib.Path("results") / f"{run_name(model_name, seed, without)}.json").read_text())
            for label, without in (("with", None), ("without", technique))}
    fig, axes = utils.new_figure()
    ax = axes[0][0]
    for label, run in runs.items():
        # A results file's histories have their steps as JSON keys, strings.
        train, validation = ({int(step): loss for step, loss in run[history]["loss"].items()}
                             for history in ("train_history", "validation_history"))
        utils.plot_history(ax, train, f"train batches, {label} {technique}", smoothing=0.95)
        utils.plot_history(ax, validation, f"validation, {label} {technique}")
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(f"{model_name}: with and without {technique}")
    utils.add_epoch_axis(ax, runs["with"]["steps_per_epoch"])
    ax.grid(alpha=0.3)
    ax.legend()
    utils.save_figure(fig, f"plots/task3_ablation_{technique}.png", args.show)
    utils.save_json(dict(model=model_name, technique=technique, seed=seed,
                         runs={label: run["name"] for label, run in runs.items()},
                         final={label: run["final"] for label, run in runs.items()}),
                    f"results/task3_ablation_{technique}.json")
    write_table(ablation_table(), "results/task3_ablation.md")


def main(argv=()):
    """Train, summarise and plot; `argv` as on the command line (the defaults when called with none)."""
    parser = utils.common_parser("task3.py", __doc__, epochs=None, batch_size=256, learning_rate=1.5,
                                 early_stop_count=4, validations_per_epoch=1)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which network to train")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: --seed)")
    parser.add_argument("--widths", type=utils.positive_int, nargs=3, default=None, metavar=("C1", "C2", "C3"),
                        help="filters of the three stages (default: each model's own, vgg 64 256 256, "
                             "resnet 32 128 128)")
    parser.add_argument("--ablate", choices=TECHNIQUES, default=None,
                        help=f"train with and without this technique and compare (model: --model, "
                             f"default {CHEAPER_MODEL})")
    parser.add_argument("--optimizer", choices=("sgd", "muon"), default=None,
                        help="sgd: Nesterov SGD for every parameter; muon: Muon for the conv filters, SGD for the "
                             "rest (default: each model's recipe: " + ", ".join(
                                 f"{name} {recipe['optimizer']}" for name, recipe in RECIPES.items()) + ")")
    parser.add_argument("--momentum", type=utils.fraction, default=0.85, help="SGD's Nesterov momentum")
    parser.add_argument("--muon-lr", type=utils.positive_float, default=0.03,
                        help="with --optimizer muon: the filters' rate, the fraction of their norm an update "
                             "moves them per step, whatever --batch-size")
    parser.add_argument("--muon-momentum", type=utils.fraction, default=0.85,
                        help="with --optimizer muon: the filters' Nesterov momentum")
    parser.add_argument("--weight-decay", type=utils.non_negative_float, default=2e-3,
                        help="fraction of each weight removed per step of 1024 images, whatever the "
                             "learning rate (scaled with --batch-size, like --lr)")
    parser.add_argument("--bias-lr-scale", type=utils.positive_float, default=64.0,
                        help="batch-norm shifts train at this multiple of --lr")
    parser.add_argument("--whiten-eps", type=utils.positive_float, default=5e-4,
                        help="added to each variance of the 2x2 patches before whitening: directions with much "
                             "less variance than this are damped instead of scaled up to unit variance")
    parser.add_argument("--whiten-bias-epochs", type=utils.non_negative_int, default=3,
                        help="epochs the whitening layer's bias trains before it is frozen")
    parser.add_argument("--final-lr-scale", type=utils.fraction, default=0.07,
                        help="every rate at the last step, as a fraction of its peak (airbench94's 0.07; "
                             "airbench94_muon decays to 0)")
    parser.add_argument("--label-smoothing", type=utils.fraction, default=0.2, help="of the training loss")
    parser.add_argument("--translate", type=utils.non_negative_int, default=2,
                        help="largest random translation of a training image, pixels each way")
    parser.add_argument("--crop-sizes", type=utils.positive_int, nargs="*", default=[],
                        help="progressive resizing: the side in pixels of the random crops each of the first "
                             "epochs trains on, one value per epoch (say 24 24 24 28 28 28 28), whole images "
                             "after them; a crop costs (side / 32)^2 of a whole image's work")
    parser.add_argument("--tta-level", type=int, choices=(0, 1, 2), default=2,
                        help="test-time augmentation reported besides the plain accuracy: 0 none, "
                             "1 mirror, 2 mirror and 1-pixel shifts")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs > MAX_EPOCHS:
        parser.error(f"--epochs: Task 3 allows at most {MAX_EPOCHS} epochs")
    if any(not 8 <= size <= 32 + 2 * args.translate for size in args.crop_sizes):
        parser.error(f"--crop-sizes: each from 8 to {32 + 2 * args.translate} pixels (the image padded by --translate)")
    args.seeds = args.seeds or [args.seed]
    models = [CHEAPER_MODEL if args.model == "all" else args.model] if args.ablate else \
        (list(MODELS) if args.model == "all" else [args.model])
    if args.resume:
        names = ([run_name(models[0], args.seeds[0], without) for without in (None, args.ablate)]
                 if args.ablate else [run_name(m, seed) for m in models for seed in args.seeds])
        if not any((pathlib.Path("checkpoints") / name / "last.ckpt").is_file() for name in names):
            raise utils.UserError(f"--resume: nothing to resume at 'checkpoints/{names[0]}/last.ckpt' (nor for "
                                  f"the other runs these flags name); leave out --resume to start")
    if args.ablate:
        ablate(models[0], args.ablate, model_args(models[0], args))
        return
    for model_name in models:
        write_layer_table(model_name, args)
        for seed in args.seeds:
            trainer = train_one(model_name, model_args(model_name, args), seed)
            create_plots(trainer, trainer.name, args.show)
    write_table(summary_table(), "results/task3_summary.md")


if __name__ == "__main__":
    utils.run_cli(main)
