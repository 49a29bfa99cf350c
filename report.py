"""The hand-in report, built from the runs: report/report.md and report/report.pdf.

    python report.py                 # after the task scripts; again after every new run or every edit
Every table, figure and number comes from results/: the figures are drawn anew from the results files'
histories (into report/figures/), so they always agree with the tables. Your own words live in
report/answers.md, made the first time with your name, group and course and a heading for each sub-task
that asks for discussion, and never changed by this script: write under a heading and build again. Where
nothing is written yet, the report shows a TO WRITE box.
"""
import argparse
import os
import pathlib
import re
import statistics

import task1
import task2
import task3
import task4a
import utils

# A report is a list of blocks, rendered once as Markdown and once as PDF:
# ("title" | "h2" | "h3" | "p" | "code", text), ("table", header, rows), ("image", path, caption),
# ("todo", text): a place the student has still to write; ("answer", text): what the student wrote.

PROMPTS = {  # the sub-tasks that ask for the student's own words, and what each asks
    "3c": "Which methods helped, which did not, and why? The table above gives the measured differences.",
    "3f": "Signs of over- or under-fitting in the best model, backed by the curves and the figures above.",
    "4b": "What do the first-layer filters respond to? Compare each filter's weights with its activation.",
    "4c": "What do the last block's activations show, and why are they so coarse (7x7)?",
}
ANSWERS_HEADER = """<!-- Your part of the report. `python report.py` puts what you write under each heading into
report.md and report.pdf, in that sub-task, and never changes this file. Comments like this one are left out.
Write Markdown: paragraphs, **bold**, *italics*, lists with "- ". A heading "## Task 2b" (or any other
sub-task) of your own adds your text to that sub-task. -->

Name:
Group:
Course:
"""


# ---------------------------------------------------------------- the student's words

def answers_template():
    """report/answers.md as it is made the first time: the header lines and a prompt under each heading."""
    sections = [f"## Task {question}\n<!-- {prompt} -->\n" for question, prompt in PROMPTS.items()]
    return ANSWERS_HEADER + "\n" + "\n".join(sections)


def read_answers(path):
    """report/answers.md -> ({"name" | "group" | "course": text}, {sub-task: text}); made with its prompts if
    missing, never written otherwise. Comments and empty sections count as not written."""
    path = pathlib.Path(path)
    if not path.is_file():
        utils.save_text(answers_template(), path)
        print(f"made '{path}': write your name and your answers there, then run report.py again")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise utils.UserError(f"cannot read your answers in '{path}' ({type(error).__name__}): save it as UTF-8 "
                              f"text and run report.py again") from None
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    head, *parts = re.split(r"^##\s+Task\s+(\w+)\s*$", text, flags=re.MULTILINE)
    who = {key: value.strip() for key, value in re.findall(r"^(name|group|course):(.*)$", head,
                                                           flags=re.MULTILINE | re.IGNORECASE)}
    who = {key.lower(): value for key, value in who.items() if value}
    sections = {question.lower(): body.strip()
                for question, body in zip(parts[::2], parts[1::2], strict=True) if body.strip()}
    return who, sections


def words(question, answers):
    """The student's text for `question` as a block, or a TO WRITE box with its prompt."""
    if answers.get(question):
        return [("answer", answers[question])]
    return [("todo", PROMPTS.get(question, "Your text.") + " Write it under '## Task "
             f"{question}' in report/answers.md.")]


# ---------------------------------------------------------------- figures, drawn from the results

class Figures:
    """Draws the report's figures into one folder, numbered in the order the report shows them."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.count = 0

    def draw(self, name, draw, caption):
        """draw(ax) onto a report-sized figure, saved as <folder>/<name>.png -> its image block."""
        self.count += 1
        fig, axes = utils.new_figure(size=utils.REPORT_FIGURE_SIZE)
        draw(axes[0][0])
        path = self.folder / f"{name}.png"
        utils.save_figure(fig, path)
        return ("image", path, f"Figure {self.count}: {caption}")

    def existing(self, path, caption):
        """An image a script drew (Task 4b, 4c) as it is."""
        self.count += 1
        return ("image", pathlib.Path(path), f"Figure {self.count}: {caption}")


def histories(results):
    """A results file's train and validation histories with numeric steps, as the plots take them."""
    return ({key: utils.steps_as_numbers(h) for key, h in results["train_history"].items()},
            {key: utils.steps_as_numbers(h) for key, h in results["validation_history"].items()})


def loss_figure(figures, name, results, caption):
    train, validation = histories(results)
    return figures.draw(name, lambda ax: utils.draw_loss(ax, train, validation, results["steps_per_epoch"],
                                                         results["best_step"]), caption)


def missing(what, command):
    return ("p", f"No results for {what} yet: run `{command}`, then `python report.py` again.")


def percent(value):
    return f"{100 * value:.1f} %"


# ---------------------------------------------------------------- Task 1 and Task 2

def task1_blocks():
    blocks = [("h2", "Task 1")]
    for question, (answer, details) in task1.answers().items():
        blocks.append(("h3", f"Task {question}"))
        blocks.append(("code", answer) if "\n" in answer else ("p", f"**{answer}**"))
        blocks.append(("code", details) if "\n" in details else ("p", details))
    return blocks


def final_table(runs):
    """('table', ...) of final loss and accuracy on each split, one row per (label, results)."""
    header = ["run", "train loss", "train acc.", "val. loss", "val. acc.", "test loss", "test acc."]
    rows = [[label] + [f"{r['final'][f'{split}_{metric}']:.3f}" for split in ("train", "val", "test")
                       for metric in ("loss", "accuracy")] for label, r in runs]
    return ("table", header, rows)


def task2_details(results):
    """Task 2's hyper-parameters in words, from its results file."""
    s = results["settings"]
    return (f"Training: SGD without momentum, learning rate {s['learning_rate']:g}, batch size {s['batch_size']}, "
            f"at most {s['epochs']} epochs, validation {s['validations_per_epoch']} times per epoch, early stopping "
            f"when the oldest of the last {s['early_stop_count']} validation losses is the lowest (the weights with "
            f"the lowest validation loss are kept); cross-entropy loss; PyTorch's default initialisation; inputs "
            f"normalised per channel with mean 0.5 and std 0.25; no augmentation. Data: "
            f"{data_sizes(results)}. It ran {results['epochs_run']:.2f} epochs on {results['device']}.")


def data_sizes(results):
    sizes = results["dataset_sizes"]
    return f"{sizes['train']:,} training, {sizes['val']:,} validation and {sizes['test']:,} test images"


def task2_blocks(results, figures):
    blocks = [("h2", "Task 2"), ("h3", "Task 2a"),
              ("p", "The network of Table 2, as built by task2.ExampleModel (kernel / stride / padding; "
                    "output shape for one 32x32 RGB image):"),
              ("table", *utils.layer_table_data(task2.ExampleModel(3, 10)))]
    run = results.get("task2")
    if run is None:
        return blocks + [missing("Task 2", "python task2.py"), ("h3", "Task 2b"), missing("Task 2", "python task2.py")]
    blocks += [("p", task2_details(run)),
               loss_figure(figures, "task2_loss", run, "Task 2a: training loss (per batch, smoothed) and validation "
                                                        "loss over training steps; dashed: the model kept.")]
    return blocks + [("h3", "Task 2b"), final_table([("Table 2 network", run)])]


# ---------------------------------------------------------------- Task 3

def recipe_of(results, model_name):
    """The recipe a Task 3 run trained with: as its results file records it, else (files written before the
    recipe was recorded whole) the model's recipe with every setting the file does record."""
    settings = results["settings"]
    if "recipe" in settings:
        return settings["recipe"]
    recorded = {key: settings[key] for key in task3.RECIPES[model_name] if key in settings}
    if "lr_per_1024_images" in settings or "learning_rate" in settings:
        recorded["lr"] = settings.get("lr_per_1024_images", settings["learning_rate"] * 1024 / settings["batch_size"])
    return dict(task3.RECIPES[model_name], **recorded)


def recipe_rows(recipe, model_name, results=None):
    """Task 3a's training details of one model, in words a reader can repeat, each setting once."""
    per_step = recipe["batch_size"] / 1024
    lr, decay = recipe["lr"] * per_step, recipe["weight_decay"] * per_step
    sgd = f"Nesterov SGD, momentum {recipe['momentum']:g}"
    if recipe["optimizer"] == "muon":
        optimizer = (f"Muon for the conv filters: each update orthogonalised (Newton-Schulz, 3 steps) from "
                     f"Nesterov momentum {recipe['muon_momentum']:g}, a step of {recipe['muon_lr']:g} of the filters' "
                     f"norm, the norm held fixed (no weight decay); {sgd} for the rest")
    else:
        optimizer = f"{sgd}, for every parameter"
    steps = f" ({results['steps']:,} steps)" if results else ""
    data = data_sizes(results) if results else "45,000 training, 5,000 validation and 10,000 test images"
    crops = (f"; progressive crops of {' '.join(map(str, recipe['crop_sizes']))} pixels in the first epochs"
             if recipe["crop_sizes"] else "")
    flips = "alternating (each image mirrored in every other epoch)" if recipe["flip"] == "alternate" else "random"
    rows = [
        ["optimizer", optimizer],
        ["learning rate", f"peak {recipe['lr']:g} per 1024 images: {lr:g} per step of {recipe['batch_size']} images; "
                          f"batch-norm shifts at {recipe['bias_lr_scale']:g}x that"],
        ["schedule", f"per step: {recipe['lr_start']:g} of the peak at the start, linearly up to the peak at "
                     f"{100 * recipe['lr_peak_at']:.0f} % of the steps, linearly down to {recipe['final_lr_scale']:g} "
                     f"of it at the last step (every rate alike)"],
        ["weight decay", f"{recipe['weight_decay']:g} of each weight per 1024 images ({decay:g} per step), "
                         f"decoupled from the rate"],
        ["batch size, epochs", f"{recipe['batch_size']} images; {recipe['epochs']} epochs{steps}; {data}"],
        ["loss", f"cross-entropy, label smoothing {recipe['label_smoothing']:g}" if recipe["label_smoothing"]
         else "cross-entropy"],
        ["initialisation", ("whitening filters fitted to the 2x2 patches of the first "
                            f"{recipe['whiten_images']:,} training images (eps {recipe['whiten_eps']:g}), fixed; "
                            f"their bias trains for {recipe['whiten_bias_epochs']} epochs, then is frozen"
                            if recipe["whitening"] else "first layer an ordinary learnt 2x2 conv (no whitening)")
         + "; convs PyTorch's default (Kaiming-uniform)" + (", the first filters of each as the identity (Dirac)"
                                                             if model_name == "vgg" else "")
         + "; batch-norm scales fixed at 1"],
        ["augmentation", (f"random translation by up to {recipe['translate']} pixels each way ({recipe['border']} "
                          f"border), {flips} horizontal flips{crops}" if recipe["augmentation"] else "none")],
        ["weight averaging", (f"Lookahead: from epoch {recipe['lookahead_start_epoch']}, every "
                              f"{recipe['lookahead_every']:,} images the weights move to an average that keeps "
                              f"{recipe['lookahead_decay']:.3f} x (progress)^3 of itself per update; the model is set "
                              f"to the average at every epoch's end" if recipe["lookahead"] else "none")],
        ["test-time augmentation", {0: "none",
                                    1: "average of the image and its mirror image",
                                    2: "average of the image and its mirror (1/2), and both shifted by one pixel "
                                       "up-left and down-right (1/4 each)"}[recipe["tta_level"]]
         + "; reported beside the plain accuracy"],
        ["model selection", f"validation {recipe['validations_per_epoch']}x per epoch; the weights with the lowest "
                            f"validation loss are kept; early stop when the oldest of the last "
                            f"{recipe['early_stop_count']} validation losses is the lowest"],
    ]
    return rows


def best_model(runs_by_model):
    """The model with the highest mean validation accuracy (with TTA where every run has it), or None."""
    candidates = {m: runs for m, runs in runs_by_model.items() if runs}
    if not candidates:
        return None
    finals = [r["final"] for runs in candidates.values() for r in runs]
    key = "val_accuracy_tta" if all("val_accuracy_tta" in f for f in finals) else "val_accuracy"
    return max(candidates, key=lambda m: statistics.mean(r["final"][key] for r in candidates[m]))


def task3_blocks(results, figures):
    runs_by_model = task3.seed_runs(results)
    best = best_model(runs_by_model)
    order = sorted(task3.MODELS, key=lambda m: m != best)  # the best model first
    blocks = [("h2", "Task 3"), ("h3", "Task 3a")]
    for model_name in order:
        runs = runs_by_model[model_name]
        recipe = recipe_of(runs[0], model_name) if runs else task3.RECIPES[model_name]
        title = f"**{model_name}**" + (" (the best model)" if model_name == best else "")
        blocks += [("p", f"{title}: {task3.MODELS[model_name].__doc__.splitlines()[0]} Layers (kernel / stride / "
                         f"padding; output shape for one 32x32 RGB image):"),
                   ("table", *utils.layer_table_data(task3.MODELS[model_name](widths=recipe["widths"]))),
                   ("p", f"Training details of {model_name}" + ("" if runs else " (its recipe; no run yet)") + ":"),
                   ("table", ["setting", "value"], recipe_rows(recipe, model_name, runs[0] if runs else None))]

    blocks.append(("h3", "Task 3b"))
    header, rows = task3.summary_table({m: runs_by_model[m] for m in order})
    if not rows:
        return blocks + [missing("Task 3", "python task3.py --seeds 0 1 2")] + task3_rest_missing()
    blocks += [("p", "Final figures of the kept weights of each model, mean ± std over the seeds named. TTA: with "
                     "test-time augmentation (Task 3a); the other columns without it. Losses are plain "
                     "cross-entropy."), ("table", header, rows)]
    best_run = runs_by_model[best][0]
    train, validation = histories(best_run)
    blocks += [("p", f"The best model, chosen by validation accuracy: **{best}**. Its run of seed "
                     f"{best_run['settings']['seed']} over training:"),
               figures.draw("task3_best_accuracy", lambda ax: utils.draw_accuracy(
                   ax, train, validation, best_run["steps_per_epoch"], best_run["best_step"]),
                   f"Task 3b: {best}, seed {best_run['settings']['seed']}: validation accuracy (whole set) and the "
                   f"training batches' accuracy (smoothed) over training steps."),
               loss_figure(figures, "task3_best_loss", best_run,
                           f"Task 3b: {best}, seed {best_run['settings']['seed']}: training loss (per batch, smoothed) "
                           f"and validation loss over training steps.")]
    return blocks + task3_ablation_blocks(results, runs_by_model, figures) \
        + task3_best_blocks(best, runs_by_model[best], figures)


def task3_rest_missing():
    blocks = []
    for question in ("3c", "3d", "3e", "3f"):
        command = "python task3.py --seeds 0 1 2" if question in "3e 3f" else "python task3.py --ablate augmentation"
        blocks += [("h3", f"Task {question}"), missing(f"Task {question}", command)]
    return blocks


def ablation_with_histories(ablation, results):
    """The ablation record with both runs' loss histories: its own, or (records written before they were kept
    there) those of the runs it names, if those are still the runs it measured."""
    if "loss_histories" in ablation:
        return ablation
    runs = {label: results.get(name) for label, name in ablation["runs"].items()}
    if any(run is None or run.get("final") != ablation["final"][label] for label, run in runs.items()):
        return None
    return dict(ablation, steps_per_epoch=runs["with"]["steps_per_epoch"],
                loss_histories={label: dict(train=run["train_history"]["loss"],
                                            validation=run["validation_history"]["loss"])
                                for label, run in runs.items()})


def task3_ablation_blocks(results, runs_by_model, figures):
    ablation_runs = task3.ablations(results)
    blocks = [("h3", "Task 3c")]
    if not ablation_runs:
        blocks.append(missing("the ablation study", "python task3.py --ablate augmentation"))
    else:
        blocks += [("p", "Each technique removed from the full recipe in turn, one run each (the same seed), against "
                         "the full recipe's run: test accuracy (with test-time augmentation where both runs have it), "
                         "the difference in percentage points, the difference without TTA, and the spread (std) of "
                         "the full recipe's test accuracy over its seeds. A difference within that spread is not "
                         "shown to be real by one run."),
                   ("table", *task3.ablation_table(ablation_runs, runs_by_model))]

    blocks.append(("h3", "Task 3d"))
    largest = task3.largest_improvement(ablation_runs)
    if largest is None:
        return blocks + [missing("Task 3d", "python task3.py --ablate augmentation")]
    technique = largest["technique"].replace("_", " ")
    drawable = ablation_with_histories(largest, results)
    if drawable is None:
        return blocks + [("p", f"The largest improvement: {technique}. Its runs' results have been replaced since "
                               f"(results/{largest['runs']['with']}.json is another run now): run `python task3.py "
                               f"--ablate {largest['technique']}` again for its graph.")]
    return blocks + [("p", f"The technique that helped most in Task 3c: **{technique}**."),
                     figures.draw(f"task3_ablation_{largest['technique']}",
                                  lambda ax: utils.draw_ablation(ax, drawable),
                                  f"Task 3d: {largest['model']}, training loss (per batch, smoothed) and validation "
                                  f"loss with {technique} (solid) and without it (dashed).")]


def task3_best_blocks(best, runs, figures):
    finals = [r["final"] for r in runs]
    seeds = ", ".join(str(r["settings"]["seed"]) for r in runs)

    def accuracy_of_seeds(ax):
        for run in runs:
            utils.plot_history(ax, histories(run)[1]["accuracy"], f"validation, seed {run['settings']['seed']} (test "
                               f"{percent(run['final'].get('test_accuracy_tta', run['final']['test_accuracy']))})")
        utils.finish_axes(ax, "validation accuracy", runs[0]["steps_per_epoch"])

    tta = all("test_accuracy_tta" in f for f in finals)
    test = (f"plain {task3.mean_std([f['test_accuracy'] for f in finals])}" + (
        f", with test-time augmentation {task3.mean_std([f['test_accuracy_tta'] for f in finals])}" if tta else ""))
    mean_test = statistics.mean(f["test_accuracy"] for f in finals)
    blocks = [("h3", "Task 3e"),
              ("p", f"The best model, {best}, as Task 3a describes it, trained for {runs[0]['settings']['epochs']} "
                    f"epochs: {'above' if mean_test >= 0.8 else 'below'} the 80 % asked for. Test accuracy over "
                    f"seeds {seeds}: {test} (the figure in the legend: {'with TTA' if tta else 'plain'})."),
              figures.draw("task3_best_validation_seeds", accuracy_of_seeds,
                           f"Task 3e: {best}, validation accuracy over training, every seed; each seed's final test "
                           f"accuracy in the legend.")]

    run = runs[0]
    f = run["final"]
    validation_losses = histories(run)[1]["loss"]
    lowest = min(validation_losses, key=validation_losses.get)
    last = max(validation_losses)
    blocks += [("h3", "Task 3f"),
               ("p", f"The best model, seed {run['settings']['seed']}: the kept weights on each whole split (train "
                     f"without augmentation)."),
               ("table", ["split", "loss", "accuracy"],
                [["train", f"{f['train_loss']:.3f}", percent(f["train_accuracy"])],
                 ["validation", f"{f['val_loss']:.3f}", percent(f["val_accuracy"])],
                 ["test", f"{f['test_loss']:.3f}", percent(f["test_accuracy"])]]),
               ("p", f"Train accuracy exceeds validation accuracy by "
                     f"{100 * (f['train_accuracy'] - f['val_accuracy']):.1f} points and validation exceeds test by "
                     f"{100 * (f['val_accuracy'] - f['test_accuracy']):.1f}. The validation loss is lowest at step "
                     f"{lowest:,} (epoch {lowest / run['steps_per_epoch']:.1f}) of {last:,}"
                     + (", the last validation" if lowest == last else
                        f"; at the last validation it is {validation_losses[last]:.3f} against "
                        f"{validation_losses[lowest]:.3f}") + ". The curves of Task 3b show where training and "
                     "validation part.")]
    return blocks


# ---------------------------------------------------------------- Task 4

def task4a_rows(settings, results=None):
    """Task 4a's hyper-parameters, from its run or, before one, from task4a.py's defaults."""
    trainable, total = (results["settings"].get("trainable_parameters"), results["parameters"]) if results \
        else task4a.count_parameters(task4a.TransferResNet18(10))
    return [
        ["model", "torchvision's ResNet18, " + ("random initial weights (no-pretrained run)"
                                                 if settings.get("no_pretrained")
                                                 else "ImageNet weights (IMAGENET1K_V1)")
                  + f", fc replaced by a 10-way linear layer; every parameter frozen but layer4 and fc ({trainable:,} "
                    f"of {total:,} train)"],
        ["optimizer", f"Adam, learning rate {settings['learning_rate']:g}, PyTorch's default betas"],
        ["batch size, epochs", f"{settings['batch_size']} images; at most {settings['epochs']} "
                               f"epoch{'s' if settings['epochs'] != 1 else ''}, early stopping "
                               f"after {settings['early_stop_count'] - 1} validations without improvement, validation "
                               f"{settings['validations_per_epoch']}x per epoch; the weights with the lowest "
                               f"validation loss are kept"],
        ["input", f"32x32 images resized to {settings['image_size']}x{settings['image_size']} (bilinear), normalised "
                  f"with ImageNet's mean and std"],
        ["augmentation", "none"],
        ["batch norm", "the frozen layers' statistics kept from ImageNet" if settings["keep_imagenet_bn_stats"]
         else "every layer's statistics re-estimated on CIFAR-10 while training"],
    ]


def task4_blocks(results, plots_dir, figures):
    blocks = [("h2", "Task 4"), ("h3", "Task 4a")]
    run = results.get("task4a")
    settings = run["settings"] if run else vars(task4a.build_parser().parse_args([]))
    blocks += [("p", "Hyper-parameters" + (":" if run else " (task4a.py's defaults; no run yet):")),
               ("table", ["setting", "value"], task4a_rows(settings, run))]
    if run is None:
        blocks.append(missing("Task 4a", "python task4a.py"))
    else:
        if settings.get("no_pretrained"):
            blocks.append(("p", "**This run started from random weights, not ImageNet's: not a Task 4 result.**"))
        blocks += [loss_figure(figures, "task4a_loss", run,
                               "Task 4a: training loss (per batch, smoothed) and validation loss over training steps; "
                               "dashed: the model kept."),
                   ("p", f"Test accuracy: **{percent(run['final']['test_accuracy'])}**."),
                   final_table([("ResNet18, layer4 + fc trained", run)])]
    for question, plot, caption, expected in (
            ("4b", "task4b.png", "Task 4b: conv1 filter weights (top, as RGB) and their activations on the zebra "
                                 "(bottom).",
             "the weights of conv1's filters 14, 26, 32, 49 and 52 (7x7, as RGB) above their activation maps "
             "(112x112) on the zebra image"),
            ("4c", "task4c.png", "Task 4c: activations of the first ten filters after the last convolutional block "
                                 "(7x7 each).",
             "the activation maps of the first ten of layer4's 512 filters (7x7 each) on the zebra image")):
        blocks.append(("h3", f"Task {question}"))
        path = pathlib.Path(plots_dir) / plot
        if path.is_file():
            blocks.append(figures.existing(path, caption))
        else:
            blocks.append(("p", f"No figure yet: `python task4b.py` (after Task 4a, with images/zebra.jpg) draws "
                                f"{expected}, then `python report.py` again."))
    return blocks


# ---------------------------------------------------------------- the whole report

def build(results_dir="results", plots_dir="plots", output_dir="report", answers_path=None):
    """Every block of the report, in order."""
    who, answers = read_answers(answers_path or pathlib.Path(output_dir) / "answers.md")
    results = utils.read_results(results_dir)
    figures = Figures(pathlib.Path(output_dir) / "figures")
    title = [("title", "CIFAR-10 image classification")]
    if who:
        title.append(("p", "  \n".join(f"{key.capitalize()}: {value}" for key, value in who.items())))
    else:
        title.append(("todo", "Your name, group and course: the lines at the top of report/answers.md."))
    return with_answers(title + task1_blocks() + task2_blocks(results, figures) + task3_blocks(results, figures)
                        + task4_blocks(results, plots_dir, figures), answers)


def with_answers(blocks, answers):
    """The blocks with, at the end of each sub-task ("### Task 3c"), the student's text for it, or a TO WRITE
    box where the sub-task asks for words and none are written yet."""
    merged, question, questions = [], None, set()
    for block in blocks + [None]:
        if block is None or block[0] in ("h2", "h3"):
            if question in answers or question in PROMPTS:
                merged += words(question, answers)
            question = block[1].removeprefix("Task ") if block is not None and block[0] == "h3" else None
            questions.add(question)
        if block is not None:
            merged.append(block)
    for question in sorted(set(answers) - questions):
        print(f"note: report/answers.md has a heading 'Task {question}', which no sub-task has; it is left out")
    return merged


def to_markdown(blocks, output_dir):
    """The blocks as Markdown; image links are relative to output_dir."""
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("title", "h2", "h3"):
            lines += [{"title": "#", "h2": "##", "h3": "###"}[kind] + " " + block[1], ""]
        elif kind in ("p", "answer"):
            lines += [block[1], ""]
        elif kind == "code":
            lines += ["```", block[1], "```", ""]
        elif kind == "table":
            lines += [utils.markdown_table(block[1], block[2]), ""]
        elif kind == "image":
            _, path, caption = block
            lines += [f"![{caption}]({image_link(path, output_dir)})", "", f"*{caption}*", ""]
        elif kind == "todo":
            lines += [f"> **TO WRITE:** {block[1]}", ""]
    return "\n".join(lines)


def image_link(path, output_dir):
    """The image's path as the Markdown file in output_dir reaches it: relative where one exists
    (plots/ beside report/, or anywhere on the same drive), else absolute (another Windows drive)."""
    path = pathlib.Path(path).resolve()
    try:
        return pathlib.Path(os.path.relpath(path, pathlib.Path(output_dir).resolve())).as_posix()
    except ValueError:
        return path.as_posix()


class PDF:
    """The blocks as an A4 PDF with fpdf2 (pure Python), in the DejaVu fonts matplotlib ships, which cover
    every script a name or an answer may be written in."""

    def __init__(self):
        import matplotlib
        from fpdf import FPDF

        self.pdf = FPDF(format="A4")
        fonts = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        for family, stem in (("sans", "DejaVuSans"), ("mono", "DejaVuSansMono")):
            for style, suffix in (("", ""), ("B", "-Bold"), ("I", "-Oblique"), ("BI", "-BoldOblique")):
                self.pdf.add_font(family, style, str(fonts / f"{stem}{suffix}.ttf"))
        self.pdf.set_margins(15, 15, 15)
        self.pdf.set_auto_page_break(True, margin=15)
        self.pdf.add_page()

    def room(self, height_mm):
        """A new page unless `height_mm` still fit on this one."""
        if self.pdf.get_y() + height_mm > self.pdf.h - self.pdf.b_margin:
            self.pdf.add_page()

    def text(self, text, size=10, style="", markdown=True, line=5):
        self.pdf.set_font("sans", style, size)
        # fpdf2's markdown knows **bold** and *italics*, but reads the "--" of command-line flags as underlining.
        self.pdf.multi_cell(0, line, text.replace("`", ""), markdown=markdown and "--" not in text,
                            new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1.5)

    def image_height(self, image):
        """mm: the height of an image printed at its own size (at most the page's width)."""
        from PIL import Image

        with Image.open(image) as img:
            return self.image_width() * img.height / img.width

    def image_width(self):
        return min(self.pdf.epw, 25.4 * utils.REPORT_FIGURE_SIZE[0])  # printed at its own size: text keeps its points

    def add(self, block, next_block=None):
        kind = block[0]
        pdf = self.pdf
        if kind in ("title", "h2", "h3"):
            # No heading alone at a page's foot: room for it and what follows (a figure, or some lines).
            follows = self.image_height(next_block[1]) + 12 if next_block and next_block[0] == "image" else 25
            self.room(15 + follows)
            if kind == "h2":
                pdf.ln(3)
            self.text(block[1], size={"title": 18, "h2": 15, "h3": 12}[kind], style="B", markdown=False,
                      line={"title": 9, "h2": 7, "h3": 6}[kind])
        elif kind == "p":
            self.text(block[1])
        elif kind == "answer":
            for paragraph in re.split(r"\n\s*\n", block[1].strip()):
                self.text(paragraph)
        elif kind == "code":
            pdf.set_font("mono", size=9)
            pdf.multi_cell(0, 4.5, block[1], new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1.5)
        elif kind == "table":
            self.table(block[1], block[2])
        elif kind == "image":
            _, image, caption = block
            width, height = self.image_width(), self.image_height(image)
            self.room(height + 12)  # the figure and its caption on one page
            pdf.image(str(image), x=pdf.l_margin + (pdf.epw - width) / 2, w=width)
            self.text(caption, size=9, style="I", markdown=False, line=4.5)
        elif kind == "todo":
            pdf.set_font("sans", "B", 10)
            pdf.set_fill_color(255, 243, 205)
            pdf.multi_cell(0, 6, f"TO WRITE: {block[1]}", border=1, fill=True, new_x="LMARGIN", new_y="NEXT")
            pdf.set_fill_color(255, 255, 255)
            pdf.ln(2)

    def table(self, header, rows):
        self.pdf.set_font("sans", size=8)
        widths = (25, 75) if len(header) == 2 else None  # a settings table: narrow names, wide values
        from fpdf.fonts import FontFace

        with self.pdf.table(text_align="LEFT", line_height=4.2, col_widths=widths, cell_fill_mode="NONE",
                            headings_style=FontFace(emphasis="BOLD")) as table:
            for row in [header] + rows:
                cells = table.row()
                for cell in row:
                    cells.cell(str(cell))
        self.pdf.ln(2)

    def save(self, path):
        utils.save_bytes(self.pdf.output(), path)


def main(argv=()):
    """Write report/report.md and report/report.pdf; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--results-dir", default="results", help="where the runs wrote their results")
    parser.add_argument("--plots-dir", default="plots", help="where task4b.py saved its figures")
    parser.add_argument("--output-dir", default="report",
                        help="where report.md, report.pdf and the figures go, and where answers.md is read")
    args = parser.parse_args(argv)
    blocks = build(args.results_dir, args.plots_dir, args.output_dir)
    output = pathlib.Path(args.output_dir)
    utils.save_text(to_markdown(blocks, output), output / "report.md")
    pdf = PDF()
    for block, next_block in zip(blocks, blocks[1:] + [None], strict=True):
        pdf.add(block, next_block)
    pdf.save(output / "report.pdf")
    print(f"saved {output / 'report.md'} and {output / 'report.pdf'} ({pdf.pdf.pages_count} pages)")
    return blocks


if __name__ == "__main__":
    utils.run_cli(main)
