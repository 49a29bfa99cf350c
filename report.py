"""Build the report's skeleton from what the runs left behind: report/report.md and report/report.pdf.

    python report.py
A section per task (1a ... 4c): Task 1's computed answers, layer tables, results tables,
every plot with a caption, each run's hyper-parameters, and marked places for the discussion
you write yourself. A task without a run says so and names the command that makes it.
"""
import argparse
import datetime
import json
import os
import pathlib

import task1
import task2
import task3
import utils

# A report is a list of blocks, rendered once as Markdown and once as PDF:
# ("title" | "h2" | "h3" | "p" | "code", text), ("table", header, rows), ("image", path, caption),
# ("todo", text): a place the student must fill in.


def load_results(results_dir, name):
    """results/<name>.json as a dict, or None when that run has not been made."""
    path = pathlib.Path(results_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def final_table(runs):
    """('table', ...) of final loss and accuracy on each split, one row per (label, results)."""
    header = ["run", "train loss", "train acc.", "val. loss", "val. acc.", "test loss", "test acc."]
    rows = [[label] + [f"{r['final'][f'{split}_{metric}']:.3f}" for split in ("train", "val", "test")
                       for metric in ("loss", "accuracy")] for label, r in runs]
    return ("table", header, rows)


def settings_table(results):
    """('table', ...) of everything needed to repeat a run."""
    optimizer = results["optimizer"]
    shown = ", ".join(f"{k}={v}" for k, v in optimizer.items()
                      if k in ("lr", "momentum", "weight_decay", "betas", "nesterov"))
    rows = [["optimizer", f"{optimizer['name']} ({shown})"],
            ["loss", results["loss"]], ["model", f"{results['model']} ({results['parameters']:,} parameters)"]]
    rows += [[key, str(value)] for key, value in results["settings"].items()
             if key not in ("show", "data_dir", "device", "checkpoint_every")]
    rows += [["epochs run", f"{results['epochs_run']:.2f} (best model at step {results['best_step']})"],
             ["device", results["device"]], ["wall time", f"{results['wall_time_s'] / 60:.1f} min"]]
    return ("table", ["setting", "value"], rows)


def missing(what, command):
    return ("p", f"No results for {what} yet: run `{command}`, then `python report.py` again.")


def plot_block(plots_dir, name, caption):
    path = pathlib.Path(plots_dir) / name
    if path.is_file():
        return [("image", path, caption)]
    return [("p", f"(plot {path} not made yet)")]


def task1_blocks():
    blocks = [("h2", "Task 1")]
    for question, (answer, details) in task1.answers().items():
        blocks.append(("h3", f"Task {question}"))
        blocks.append(("code", answer) if "\n" in answer else ("p", f"**{answer}**"))
        blocks.append(("code", details) if "\n" in details else ("p", details))
    return blocks


def task2_blocks(results_dir, plots_dir):
    blocks = [("h2", "Task 2"), ("h3", "Task 2a"),
              ("p", "The network of Table 2, as built by task2.ExampleModel (kernel / stride / padding; "
                    "output shape for one 32x32 RGB image):"),
              ("table", *utils.layer_table_data(task2.ExampleModel(3, 10)))]
    results = load_results(results_dir, "task2")
    if results is None:
        return blocks + [missing("Task 2", "python task2.py"), ("h3", "Task 2b"), missing("Task 2", "python task2.py")]
    blocks += plot_block(plots_dir, "task2_plot.png",
                         "Task 2a: training loss (per batch, smoothed) and validation loss over training "
                         "steps (left); validation accuracy (right). Dashed: the model kept (lowest "
                         "validation loss).")
    blocks += [settings_table(results), ("h3", "Task 2b"), final_table([("Table 2 network", results)])]
    return blocks


def task3_blocks(results_dir, plots_dir):
    blocks = [("h2", "Task 3"), ("h3", "Task 3a")]
    for name, model in task3.MODELS.items():
        blocks += [("p", f"**{name}**: {model.__doc__.splitlines()[0]}"), ("table", *utils.layer_table_data(model()))]
    runs = sorted(pathlib.Path(results_dir).glob("task3_*_seed*.json"))
    if runs:
        blocks += [("p", "Training details (every run of Task 3):"), settings_table(json.loads(runs[0].read_text()))]
    blocks.append(("h3", "Task 3b"))
    header, rows = task3.summary_table(results_dir)
    blocks += [("table", header, rows)] if rows else [missing("Task 3", "python task3.py --seeds 0 1 2")]
    for path in sorted(pathlib.Path(plots_dir).glob("task3_*_seed*_plot.png")):
        blocks += plot_block(plots_dir, path.name, f"Task 3b: {path.stem.removesuffix('_plot')}: loss (left) and "
                                                   "validation accuracy (right) over training steps.")
    blocks += [("h3", "Task 3c"), ("todo", "Which methods helped, which did not, and why.")]
    header, rows = task3.ablation_table(results_dir)
    blocks += [("table", header, rows)] if rows else [missing("the ablation study", "python task3.py --ablate augmentation")]
    blocks.append(("h3", "Task 3d"))
    ablation_plots = sorted(pathlib.Path(plots_dir).glob("task3_ablation_*.png"))
    for path in ablation_plots:
        blocks += plot_block(plots_dir, path.name, f"Task 3d: training and validation loss with and without "
                                                   f"{path.stem.removeprefix('task3_ablation_')}.")
    if not ablation_plots:
        blocks.append(missing("Task 3d", "python task3.py --ablate augmentation"))
    for question, prompt in (("3e", "The improved best model: validation accuracy over training and test accuracy."),
                             ("3f", "Signs of over- or under-fitting in the best model, backed by the curves.")):
        blocks += [("h3", f"Task {question}"), ("todo", prompt)]
    return blocks


def task4_blocks(results_dir, plots_dir):
    blocks = [("h2", "Task 4"), ("h3", "Task 4a")]
    results = load_results(results_dir, "task4a")
    if results is None:
        blocks.append(missing("Task 4a", "python task4a.py"))
    else:
        blocks += plot_block(plots_dir, "task4a_plot.png",
                             "Task 4a: training and validation loss over steps (left); validation accuracy (right).")
        blocks += [settings_table(results), final_table([("ResNet18, layer4 + fc trained", results)])]
    for question, plot, caption, prompt in (
            ("4b", "task4b.png", "Task 4b: conv1 filter weights (top) and their activations on the zebra (bottom).",
             "What do these first-layer filters respond to?"),
            ("4c", "task4c.png", "Task 4c: activations of the first ten filters after the last convolutional block (7x7).",
             "What do the last block's activations show, and why are they so coarse?")):
        blocks.append(("h3", f"Task {question}"))
        if (pathlib.Path(plots_dir) / plot).is_file():
            blocks += plot_block(plots_dir, plot, caption)
        else:
            blocks.append(missing(f"Task {question}", "python task4b.py"))
        blocks.append(("todo", prompt))
    return blocks


def build(results_dir="results", plots_dir="plots"):
    """Every block of the report, in order."""
    date = datetime.date.today().isoformat()
    return ([("title", "CIFAR-10 image classification"),
             ("p", f"Built by report.py on {date} from {results_dir}/ and {plots_dir}/. "
                   "Places marked TO WRITE are yours.")]
            + task1_blocks() + task2_blocks(results_dir, plots_dir)
            + task3_blocks(results_dir, plots_dir) + task4_blocks(results_dir, plots_dir))


def to_markdown(blocks, output_dir):
    """The blocks as Markdown; image links are relative to output_dir."""
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("title", "h2", "h3"):
            lines += [{"title": "#", "h2": "##", "h3": "###"}[kind] + " " + block[1], ""]
        elif kind == "p":
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


def latin1(text):
    """The PDF's built-in fonts know Latin-1 only: map the few other characters used here."""
    for old, new in {"–": "-", "—": "-", "→": "->", "≥": ">=", "…": "..."}.items():
        text = text.replace(old, new)
    return text.encode("latin-1", "replace").decode("latin-1")


def to_pdf(blocks, path):
    """The blocks as an A4 PDF (fpdf2: pure Python, no system libraries)."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    for block in blocks:
        kind = block[0]
        if kind in ("title", "h2", "h3"):
            size = {"title": 20, "h2": 16, "h3": 12}[kind]
            if (kind == "h2" and pdf.get_y() > 40) or pdf.get_y() > pdf.h - 60:  # no heading alone at a page's foot
                pdf.add_page()
            pdf.set_font("Helvetica", "B", size)
            pdf.multi_cell(0, size * 0.5, latin1(block[1]), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "p":
            pdf.set_font("Helvetica", size=10)
            text = latin1(block[1]).replace("`", "")
            # fpdf2's markdown knows **bold**, but reads the "--" of command-line flags as underlining.
            pdf.multi_cell(0, 5, text, markdown="--" not in text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "code":
            pdf.set_font("Courier", size=9)
            pdf.multi_cell(0, 4.5, latin1(block[1]), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "table":
            pdf_table(pdf, block[1], block[2])
        elif kind == "image":
            _, image, caption = block
            pdf.image(str(image), w=pdf.epw)
            pdf.set_font("Helvetica", "I", 9)
            pdf.multi_cell(0, 4.5, latin1(caption), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
        elif kind == "todo":
            pdf.set_font("Helvetica", "B", 10)
            pdf.set_fill_color(255, 243, 205)
            pdf.multi_cell(0, 6, latin1(f"TO WRITE: {block[1]}"), border=1, fill=True,
                           new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(path))


def pdf_table(pdf, header, rows):
    pdf.set_font("Helvetica", size=8)
    with pdf.table(text_align="LEFT", line_height=4.5) as table:
        for row in [header] + rows:
            cells = table.row()
            for cell in row:
                cells.cell(latin1(str(cell)))
    pdf.ln(3)


def main(argv=()):
    """Write report/report.md and report/report.pdf; `argv` as on the command line."""
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--results-dir", default="results", help="where the runs wrote their results")
    parser.add_argument("--plots-dir", default="plots", help="where the runs saved their plots")
    parser.add_argument("--output-dir", default="report", help="where report.md and report.pdf go")
    args = parser.parse_args(argv)
    blocks = build(args.results_dir, args.plots_dir)
    output = pathlib.Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.md").write_text(to_markdown(blocks, output))
    to_pdf(blocks, output / "report.pdf")
    print(f"saved {output / 'report.md'} and {output / 'report.pdf'}")
    return blocks


if __name__ == "__main__":
    utils.run_cli(main)
