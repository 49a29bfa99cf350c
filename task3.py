"""Task 3: two deep CNNs of our own, trained within 10 epochs, and an ablation study.

    python task3.py                                  # both models, seed 0
    python task3.py --model vgg --seeds 0 1 2        # one model over three seeds (mean ± std)
    python task3.py --ablate lookahead               # the cheaper model with and without it (Task 3c, 3d)
Both networks are built for accuracy per arithmetic operation, after Keller Jordan's airbench94
(https://github.com/KellerJordan/cifar10-airbench, https://arxiv.org/abs/2404.00498), which in
turn builds on "How to train your ResNet" (David Page, https://myrtle.ai/learn/how-to-train-your-resnet/):
a fixed 2x2 whitening first layer, pooling right after the first conv of each stage so that most
convolutions run at a quarter of the resolution, batch norm with a fixed scale, GELU, logits scaled
by 1/9. Each model's whole recipe is the dict RECIPES[model] below; every flag of the recipe defaults
to it. Rates and weight decay are per 1024 images: the step a batch takes scales with --batch-size.
Model selection uses the validation set only; the test set is evaluated once per run, at the end.
"""
import argparse
import json
import pathlib
import statistics

import torch
from torch import nn

import dataloaders
import optim
import utils
from trainer import Trainer, finished_results, last_checkpoint
from utils import create_plots

MAX_EPOCHS = 10  # the assignment's limit
LOGIT_SCALE = 1 / 9  # airbench's: unscaled logits of max-pooled features are too large for label smoothing's targets


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


class WhitenedNet(nn.Module):
    """What both models share: the whitening layer first; last, the maximum over whatever map is left (3x3 for
    whole images, so that the network also trains on smaller crops, --crop-sizes) into a linear classifier whose
    logits are scaled down. A model builds self.features and self.classifier from these."""

    def __init__(self, whitening):
        super().__init__()
        self.whiten = Whitening()
        self.whiten.weight.requires_grad_(not whitening)  # without it: an ordinary, learnt first layer

    def forward(self, x):
        """Images [B, 3, 32, 32] -> logits [B, num_classes], scaled down."""
        return self.classifier(self.features(x)) * LOGIT_SCALE


def linear_classifier(channels, num_classes):
    """[B, channels, 1, 1] -> [B, num_classes]: one linear layer, no bias."""
    return nn.Sequential(
        nn.Flatten(),                                                             # [B, channels]
        nn.Linear(channels, num_classes, bias=False),                             # [B, num_classes]
    )


class WhitenedVGG(WhitenedNet):
    """Model A, plain: whitening, then three stages of conv, max-pool, batch norm, GELU, conv, batch norm, GELU."""

    def __init__(self, num_classes=10, widths=(64, 256, 256), whitening=True):
        super().__init__(whitening)
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
        self.classifier = linear_classifier(c3, num_classes)                      # [B, 10]


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


class WhitenedResNet(WhitenedNet):
    """Model B, residual and narrower: whitening, then three residual stages of half of model A's width."""

    def __init__(self, num_classes=10, widths=(32, 128, 128), whitening=True):
        super().__init__(whitening)
        c0, c1, c2, c3 = self.whiten.out_channels, *widths
        self.features = nn.Sequential(
            self.whiten,                                                          # [B, 24, 31, 31]
            nn.GELU(),
            residual_stage(c0, c1),                                               # [B, 32, 15, 15]
            residual_stage(c1, c2),                                               # [B, 128, 7, 7]
            residual_stage(c2, c3),                                               # [B, 128, 3, 3]
            nn.AdaptiveMaxPool2d(1),                                              # [B, 128, 1, 1]
        )
        self.classifier = linear_classifier(c3, num_classes)                      # [B, 10]


MODELS = {"vgg": WhitenedVGG, "resnet": WhitenedResNet}
CHEAPER_MODEL = "resnet"  # the one the ablations train

# Each model's recipe: every setting that decides what a run computes, in one place (as airbench's `hyp`).
# The command line overrides any entry (the flag is the key with dashes: --whiten-eps; --lr for lr;
# --no-lookahead for a True/False one), --ablate removes one technique from a copy (TECHNIQUES), and each
# results file records the recipe as it ran (settings.recipe), which is what the report's Task 3a prints.
RECIPES = {}
RECIPES["vgg"] = dict(
    widths=[64, 256, 256],        # filters of the three stages
    epochs=10,                    # passes over the training split (the assignment's limit)
    batch_size=256,               # images per optimisation step
    optimizer="sgd",              # "sgd": Nesterov SGD for every parameter; "muon": Muon for conv filters, SGD the rest
    lr=1.5,                       # SGD's learning rate per 1024 images (a batch of B steps B / 1024 of it)
    momentum=0.85,                # SGD's Nesterov momentum
    weight_decay=2e-3,            # fraction of each weight removed per 1024 images, decoupled from the rate
    bias_lr_scale=64.0,           # batch-norm shifts' rate, a multiple of lr
    muon_lr=0.03,                 # with muon: the filters' change per step, a fraction of their norm (any batch size)
    muon_momentum=0.85,           # with muon: the filters' Nesterov momentum
    lr_start=0.2,                 # schedule: every rate starts at this multiple of its peak,
    lr_peak_at=0.23,              #   rises linearly to the peak at this fraction of the steps,
    final_lr_scale=0.07,          #   and falls linearly to this multiple at the last step
    label_smoothing=0.2,          # of the training loss's targets
    lookahead=True,               # Lookahead weight averaging (optim.Lookahead)
    lookahead_start_epoch=3,      # epochs before the averaging starts
    lookahead_every=5 * 1024,     # images between two averaging updates (airbench: every 5 steps of 1024)
    lookahead_decay=0.95 ** 5,    # of the average kept per update at the end of training (less before)
    whitening=True,               # fixed whitening filters first (False: an ordinary, learnt 2x2 conv)
    whiten_images=5000,           # training images whose 2x2 patches the whitening is fitted to
    whiten_eps=5e-4,              # added to each patch variance: damps directions of far less variance
    whiten_bias_epochs=3,         # epochs the whitening layer's bias trains before it is frozen
    augmentation=True,            # random translations and flips of the training images
    translate=2,                  # largest translation, pixels each way
    border="reflect",             # what a translation brings in: "reflect" (the image's mirrored edge) or "zeros"
    flip="alternate",             # "alternate": each image mirrored every other epoch; "random": a coin per epoch
    crop_sizes=[],                # progressive resizing: crop side per early epoch, pixels (none: whole images)
    tta_level=2,                  # test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts
    validations_per_epoch=1,      # evaluations of the validation split per epoch
    early_stop_count=4,           # stop when the oldest of this many validation losses is the lowest
)
# resnet: 8 epochs with Muon reach the validation accuracy of 10 with SGD (3 seeds each), so a run fits
# 15 minutes of a 2-core CPU; Muon matched or beat SGD on validation with TTA in each paired run
# (https://kellerjordan.github.io/posts/muon/, as in airbench94_muon; records/task3_tuning.md).
RECIPES["resnet"] = dict(RECIPES["vgg"], widths=[32, 128, 128], optimizer="muon", epochs=8)

# The techniques --ablate removes, one at a time: the recipe's entries without each.
TECHNIQUES = {
    "augmentation": dict(augmentation=False),
    "alternating_flip": dict(flip="random"),
    "whitening": dict(whitening=False),
    "lookahead": dict(lookahead=False),
    "label_smoothing": dict(label_smoothing=0.0),
}


def run_name(model_name, seed, without=None):
    """A run's name: its checkpoints/ folder and results/ file. The full recipe's run is the model's run for the
    seed, whether trained alone or as an ablation's reference."""
    return f"task3_{model_name}_seed{seed}" if without is None else f"task3_{model_name}_without_{without}_seed{seed}"


def run_settings(model_name, recipe, seed, args, without=None):
    """What one run computes, for its results file and for the check that a saved run is this one."""
    return dict(model=model_name, seed=seed, without=without, recipe=recipe, split_seed=args.split_seed,
                data_dir=args.data_dir, deterministic=args.deterministic)


def train_one(model_name, recipe, seed, args, without=None):
    """Train `model_name` by `recipe`, less the technique `without`, for one seed -> its Trainer. With --resume
    (either kind), each run goes on as with --resume auto: one with a checkpoint continues, a finished one is
    left as it is, one with neither starts."""
    recipe = dict(recipe, **TECHNIQUES[without]) if without else recipe
    utils.set_seed(seed, args.deterministic)
    device = utils.get_device(args.device)
    loaders = dataloaders.load_cifar10(
        recipe["batch_size"], data_dir=args.data_dir, device=device, seed=seed, split_seed=args.split_seed,
        augment=recipe["augmentation"], crop_padding=recipe["translate"], padding_mode=recipe["border"],
        flip=recipe["flip"], crop_sizes=recipe["crop_sizes"] if recipe["augmentation"] else ())
    model = MODELS[model_name](widths=recipe["widths"], whitening=recipe["whitening"])
    if recipe["whitening"]:
        train = loaders[0]
        model.whiten.fit(train.to_model_input(train.images[:recipe["whiten_images"]]).cpu(), eps=recipe["whiten_eps"])
    # A per-example learning rate: the step for the mean loss of a batch grows with the batch.
    learning_rate = recipe["lr"] * recipe["batch_size"] / 1024
    weight_decay = recipe["weight_decay"] * recipe["batch_size"] / 1024
    groups = optim.parameter_groups(model, learning_rate, weight_decay, norm_bias_lr_scale=recipe["bias_lr_scale"],
                                    filters_apart=recipe["optimizer"] == "muon")
    if recipe["optimizer"] == "muon":  # the conv filters by Muon, the rest (biases, the linear layer) by Nesterov SGD
        for group in groups:
            if group["name"] == "conv filters":
                group.update(lr=recipe["muon_lr"], momentum=recipe["muon_momentum"], weight_decay=0.0,
                             orthogonalize=True)
        optimizer = optim.Muon(groups, lr=learning_rate, momentum=recipe["momentum"])
    else:
        optimizer = torch.optim.SGD(groups, lr=learning_rate, momentum=recipe["momentum"], nesterov=True)
    steps_per_epoch = len(loaders[0])
    total_steps = recipe["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.warmup_decay(
        total_steps, start=recipe["lr_start"], peak_at=recipe["lr_peak_at"], end=recipe["final_lr_scale"]))
    lookahead = optim.Lookahead(
        total_steps, start_step=recipe["lookahead_start_epoch"] * steps_per_epoch,
        every=max(1, round(recipe["lookahead_every"] / recipe["batch_size"])),
        decay=recipe["lookahead_decay"]) if recipe["lookahead"] else None
    name = run_name(model_name, seed, without)
    trainer = Trainer(recipe["batch_size"], learning_rate, recipe["early_stop_count"], recipe["epochs"], model, loaders,
                      optimizer=optimizer, scheduler=scheduler, lookahead=lookahead, tta_level=recipe["tta_level"],
                      loss_criterion=nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"]), device=device,
                      # The whitening layer's bias trains for the first epochs only, then stays (airbench).
                      freeze_after={"whiten.bias": recipe["whiten_bias_epochs"] * steps_per_epoch},
                      validations_per_epoch=recipe["validations_per_epoch"],
                      **utils.speed_options(args, device),
                      **utils.checkpoint_options(args, "auto" if args.resume else False),
                      name=name, settings=run_settings(model_name, recipe, seed, args, without))
    trainer.train()
    return trainer


def write_layer_table(model_name, recipe):
    """results/task3_<model>_layers.md: the layer table the report's Task 3a needs."""
    path = pathlib.Path("results") / f"task3_{model_name}_layers.md"
    utils.save_text(utils.layer_table(MODELS[model_name](widths=recipe["widths"])) + "\n", path)
    print(f"saved {path}")


def mean_std(values, digits=3):
    """'0.912 ± 0.003' (± only where the values differ)."""
    if len(set(values)) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def seed_runs(results):
    """{model: [its full-recipe runs, by seed]} from {file stem: results} (utils.read_results)."""
    return {model_name: [results[name] for name in sorted(results)
                         if name.startswith(f"task3_{model_name}_seed") and "settings" in results[name]]
            for model_name in MODELS}


def ablations(results):
    """The ablation results files among {file stem: results}, by technique."""
    return [results[name] for name in sorted(results) if name.startswith("task3_ablation_")]


def test_accuracy_key(*finals):
    """'test_accuracy_tta' where every one of `finals` has it (the figure the recipe is judged by), else the plain."""
    return "test_accuracy_tta" if all("test_accuracy_tta" in f for f in finals) else "test_accuracy"


def summary_table(runs_by_model):
    """(header, rows) of Task 3b: final train loss, train / validation / test accuracy per model, mean ± std over
    its seeds (seed_runs)."""
    header = ["model", "seeds", "epochs", "train loss", "train accuracy", "validation accuracy",
              "validation accuracy, TTA", "test accuracy", "test accuracy, TTA"]
    rows = []
    for model_name, runs in runs_by_model.items():
        if runs:
            finals = [r["final"] for r in runs]
            rows.append([model_name, ", ".join(str(r["settings"]["seed"]) for r in runs),
                         mean_std([r["epochs_run"] for r in runs],
                                  0 if all(r["epochs_run"] % 1 == 0 for r in runs) else 1)]
                        + [mean_std([f[key] for f in finals]) if all(key in f for f in finals) else "–"
                           for key in ("train_loss", "train_accuracy", "val_accuracy", "val_accuracy_tta",
                                       "test_accuracy", "test_accuracy_tta")])
    return header, rows


def ablation_table(ablation_runs, runs_by_model):
    """(header, rows) of Task 3c: test accuracy with and without each technique (with TTA where both runs
    measured it), the difference in percentage points, and beside it the spread of the full recipe's test
    accuracy over the model's seeds: a difference within it is not shown to be real."""
    header = ["technique removed", "model, seed", "test acc. with", "test acc. without", "difference",
              "plain difference", "seeds' std"]
    rows = []
    for ablation in ablation_runs:
        with_, without = ablation["final"]["with"], ablation["final"]["without"]
        key = test_accuracy_key(with_, without)
        seeds = [r["final"][key] for r in runs_by_model.get(ablation["model"], []) if key in r["final"]]
        rows.append([ablation["technique"].replace("_", " "), f"{ablation['model']}, {ablation['seed']}",
                     f"{100 * with_[key]:.1f} %", f"{100 * without[key]:.1f} %",
                     points(with_[key] - without[key]), points(with_["test_accuracy"] - without["test_accuracy"]),
                     f"{100 * statistics.stdev(seeds):.1f} pt ({len(seeds)} seeds)" if len(seeds) > 1 else "–"])
    return header, rows


def points(difference):
    """A difference of two accuracies in percentage points: '+2.4 pt' ('+0.0 pt', never '-0.0 pt')."""
    return f"{round(100 * difference, 1) + 0.0:+.1f} pt"


def largest_improvement(ablation_runs):
    """The ablation whose technique raised test accuracy the most (with TTA where measured): Task 3d's."""
    def gain(ablation):
        key = test_accuracy_key(ablation["final"]["with"], ablation["final"]["without"])
        return ablation["final"]["with"][key] - ablation["final"]["without"][key]

    return max(ablation_runs, key=gain, default=None)


def write_tables(*tables):
    """Save (make_table, path) tables, each made from every results file in results/, as Markdown, and print them.
    Jobs that finish at once take turns (a lock), so that the last to write has read every other's results."""
    with utils.file_lock(utils.writable_folder("results") / ".tables.lock", "another process writing the tables"):
        results = utils.read_results("results")
        for make_table, path in tables:
            text = utils.markdown_table(*make_table(results))
            utils.save_text(text + "\n", path)
            print(f"\n{path}:\n{text}")


def summary(results):
    """Task 3b's table (summary_table) from {file stem: results}."""
    return summary_table(seed_runs(results))


def ablation_summary(results):
    """Task 3c's table (ablation_table) from {file stem: results}."""
    return ablation_table(ablations(results), seed_runs(results))


def ablate(model_name, technique, recipe, args):
    """Compare the recipe with and without `technique`, same seed (Tasks 3c, 3d): one loss graph, one results file.

    The run with it is the model's own run for the seed (results/task3_<model>_seed<N>.json): one reference
    for every ablation, trained here only where results/ lacks it with these settings. With --resume, ablations
    run at once (a job array) wait for the one that trains it, and then find it finished.
    """
    seed = args.seeds[0]
    name = run_name(model_name, seed)
    if args.resume or finished_results(f"results/{name}.json", run_settings(model_name, recipe, seed, args)) is None:
        trainer = train_one(model_name, recipe, seed, args)
        create_plots(trainer, trainer.name, args.show)
    else:
        print(f"{name}: made already with these settings; 'results/{name}.json' is the run with {technique}")
    train_one(model_name, recipe, seed, args, without=technique)
    runs = {label: json.loads((pathlib.Path("results") / f"{run_name(model_name, seed, without)}.json").read_text())
            for label, without in (("with", None), ("without", technique))}
    record = dict(model=model_name, technique=technique, seed=seed,
                  runs={label: run["name"] for label, run in runs.items()},
                  final={label: run["final"] for label, run in runs.items()},
                  # Both runs' loss curves, so that Task 3d's graph is drawn from this file alone.
                  steps_per_epoch=runs["with"]["steps_per_epoch"],
                  loss_histories={label: dict(train=run["train_history"]["loss"],
                                              validation=run["validation_history"]["loss"])
                                  for label, run in runs.items()})
    utils.save_json(record, f"results/task3_ablation_{technique}.json")
    utils.plot_ablation(record, f"plots/task3_ablation_{technique}.png", args.show)
    write_tables((ablation_summary, "results/task3_ablation.md"))


def build_parser():
    """The command line: what to run, and a flag for every entry of the recipe (default: the model's own)."""
    parser = utils.common_parser("task3.py", __doc__, epochs=None, batch_size=None, learning_rate=None,
                                 early_stop_count=None, validations_per_epoch=None, recipe_default=recipe_defaults)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="which network to train")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: --seed)")
    parser.add_argument("--ablate", choices=TECHNIQUES, default=None,
                        help=f"train with and without this technique and compare (model: --model, "
                             f"default {CHEAPER_MODEL})")
    recipe = parser.add_argument_group(
        "the recipe", "Each flag below, and --epochs, --batch-size, --lr, --early-stop-count and\n"
                      "--validations-per-epoch above, sets one entry of the model's recipe (task3.RECIPES) for every\n"
                      "model run; left out, each model keeps its own value, shown as vgg / resnet.")

    def add(flag, help, **kwargs):
        key = flag.removeprefix("--").replace("-", "_")
        recipe.add_argument(flag, default=None, help=f"{help} (default: {recipe_defaults(key)})", **kwargs)

    add("--widths", type=utils.positive_int, nargs=3, metavar=("C1", "C2", "C3"), help="filters of the three stages")
    add("--optimizer", choices=("sgd", "muon"),
        help="sgd: Nesterov SGD for every parameter; muon: Muon for the conv filters, SGD for the rest")
    add("--momentum", type=utils.fraction, help="SGD's Nesterov momentum")
    add("--weight-decay", type=utils.non_negative_float,
        help="fraction of each weight removed per 1024 images, whatever the learning rate")
    add("--bias-lr-scale", type=utils.positive_float, help="batch-norm shifts train at this multiple of --lr")
    add("--muon-lr", type=utils.positive_float,
        help="with muon: the fraction of their norm the filters move per step, whatever --batch-size")
    add("--muon-momentum", type=utils.fraction, help="with muon: the filters' Nesterov momentum")
    add("--lr-start", type=utils.fraction, help="every rate at the first step, as a fraction of its peak")
    add("--lr-peak-at", type=utils.fraction, help="the fraction of the steps at which the rates peak")
    add("--final-lr-scale", type=utils.fraction,
        help="every rate at the last step, as a fraction of its peak (airbench94_muon decays to 0)")
    add("--label-smoothing", type=utils.fraction, help="of the training loss")
    add("--lookahead", action=argparse.BooleanOptionalAction, help="Lookahead weight averaging")
    add("--lookahead-start-epoch", type=utils.non_negative_int, help="epochs before the averaging starts")
    add("--lookahead-every", type=utils.positive_int, help="images between two averaging updates")
    add("--lookahead-decay", type=utils.fraction,
        help="the fraction of the average an update keeps at the end of training")
    add("--whitening", action=argparse.BooleanOptionalAction,
        help="fixed whitening filters first; --no-whitening: an ordinary, learnt first layer")
    add("--whiten-images", type=utils.positive_int, help="training images the whitening is fitted to")
    add("--whiten-eps", type=utils.positive_float,
        help="added to each variance of the 2x2 patches before whitening: directions with much less variance "
             "than this are damped instead of scaled up to unit variance")
    add("--whiten-bias-epochs", type=utils.non_negative_int,
        help="epochs the whitening layer's bias trains before it is frozen")
    add("--augmentation", action=argparse.BooleanOptionalAction,
        help="random translations and flips of the training images")
    add("--translate", type=utils.non_negative_int,
        help="largest random translation of a training image, pixels each way")
    add("--border", choices=("reflect", "zeros"), help="what a translation brings in at the image's edge")
    add("--flip", choices=("alternate", "random"),
        help="alternate: each image mirrored in every other epoch; random: a coin per image and epoch")
    add("--crop-sizes", type=utils.positive_int, nargs="*",
        help="progressive resizing: the side in pixels of the random crops each of the first epochs trains on, "
             "one value per epoch (say 24 24 24 28 28 28 28), whole images after them; a crop costs "
             "(side / 32)^2 of a whole image's work")
    add("--tta-level", type=int, choices=(0, 1, 2),
        help="test-time augmentation reported besides the plain accuracy: 0 none, 1 mirror, "
             "2 mirror and 1-pixel shifts")
    return parser


def recipe_defaults(key):
    """The recipes' values of `key` for --help: "10 / 8" (vgg / resnet), or one value where the models agree."""
    def text(value):
        return " ".join(map(str, value)) or "none" if isinstance(value, list) else f"{value:g}" \
            if isinstance(value, float) else str(value)

    values = dict.fromkeys(text(RECIPES[m][key]) for m in MODELS)
    return " / ".join(values)


def recipe_from(model_name, args):
    """The model's recipe with the command line's overrides."""
    flags = {key: getattr(args, "learning_rate" if key == "lr" else key) for key in RECIPES[model_name]}
    return dict(RECIPES[model_name], **{key: value for key, value in flags.items() if value is not None})


def check_recipe(recipe, parser):
    """Refuse a recipe the assignment or the loaders cannot take, naming the flag."""
    if recipe["epochs"] > MAX_EPOCHS:
        parser.error(f"--epochs: Task 3 allows at most {MAX_EPOCHS} epochs")
    if any(not 8 <= size <= 32 + 2 * recipe["translate"] for size in recipe["crop_sizes"]):
        parser.error(f"--crop-sizes: each from 8 to {32 + 2 * recipe['translate']} pixels "
                     f"(the image padded by --translate)")


def main(argv=()):
    """Train, summarise and plot; `argv` as on the command line (the defaults when called with none)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    models = [CHEAPER_MODEL if args.model == "all" else args.model] if args.ablate else \
        (list(MODELS) if args.model == "all" else [args.model])
    recipes = {model_name: recipe_from(model_name, args) for model_name in models}
    for recipe in recipes.values():
        check_recipe(recipe, parser)
    if args.resume is True:
        names = ([run_name(models[0], args.seeds[0], without) for without in (None, args.ablate)]
                 if args.ablate else [run_name(m, seed) for m in models for seed in args.seeds])
        if not any(last_checkpoint(name).is_file() for name in names):
            raise utils.UserError(f"--resume: nothing to resume at '{last_checkpoint(names[0])}' (nor for "
                                  f"the other runs these flags name); leave out --resume to start")
    if args.ablate:
        ablate(models[0], args.ablate, recipes[models[0]], args)
        return
    for model_name, recipe in recipes.items():
        write_layer_table(model_name, recipe)
        for seed in args.seeds:
            trainer = train_one(model_name, recipe, seed, args)
            create_plots(trainer, trainer.name, args.show)
    write_tables((summary, "results/task3_summary.md"))


if __name__ == "__main__":
    utils.run_cli(main, resumable=True)
