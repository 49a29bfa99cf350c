"""report.py: built from results files as the scripts write them, with the student's words kept."""
import itertools
import json
from pathlib import Path

import matplotlib.pyplot
import pytest
from pypdf import PdfReader

import report
import task3
import utils

SPLITS = dict(train=450, val=50, test=100)


def fake_run(name, settings, final, steps_per_epoch=4, epochs=2, seed=0):
    """A results file as the Trainer writes one, with made-up figures and curves."""
    steps = steps_per_epoch * epochs
    train = {str(step): 2.0 / step for step in range(1, steps + 1)}
    validation = {str(step): 1.5 / step for step in range(steps_per_epoch, steps + 1, steps_per_epoch)}
    return dict(name=name, final=final, best_step=steps, steps=steps, steps_per_epoch=steps_per_epoch,
                epochs_run=float(epochs), stopped_early=False, dataset_sizes=SPLITS,
                settings=dict(settings, seed=seed, batch_size=settings.get("batch_size", 64), epochs=epochs,
                              learning_rate=0.05, early_stop_count=4, validations_per_epoch=1),
                parameters=1000, device="cpu (2 threads)", wall_time_s=60.0,
                train_history=dict(loss=train, accuracy={k: 0.5 for k in train}),
                validation_history=dict(loss=validation, accuracy={k: 0.4 for k in validation}))


def finals(test, tta=None):
    final = dict(train_loss=0.3, train_accuracy=0.95, val_loss=0.5, val_accuracy=test + 0.01, test_loss=0.55,
                 test_accuracy=test)
    if tta is not None:
        final.update(val_accuracy_tta=tta + 0.01, val_loss_tta=0.5, test_accuracy_tta=tta, test_loss_tta=0.5)
    return final


def task3_run(model, seed, test, **changes):
    recipe = dict(task3.RECIPES[model], **changes)
    return fake_run(f"task3_{model}_seed{seed}", dict(model=model, without=None, recipe=recipe),
                    finals(test, test + 0.005), seed=seed)


def write_results(folder, runs):
    folder.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        (folder / f"{name}.json").write_text(json.dumps(run))


def ablation(technique, with_test, without_test):
    return dict(model="resnet", technique=technique, seed=0,
                runs={"with": "task3_resnet_seed0", "without": f"task3_resnet_without_{technique}_seed0"},
                final={"with": finals(with_test, with_test), "without": finals(without_test, without_test)},
                steps_per_epoch=4,
                loss_histories={label: dict(train={"1": 2.0, "2": 1.5, "8": 0.5 + i},
                                            validation={"4": 1.0, "8": 0.8 + i})
                                for i, label in enumerate(("with", "without"))})


def all_runs():
    runs = {"task2": fake_run("task2", dict(data_dir="data"), finals(0.71))}
    runs.update({f"task3_vgg_seed{s}": task3_run("vgg", s, 0.90 + s / 1000) for s in range(3)})
    runs.update({f"task3_resnet_seed{s}": task3_run("resnet", s, 0.88 + s / 1000, lr=0.75) for s in range(3)})
    runs["task3_ablation_lookahead"] = ablation("lookahead", 0.880, 0.884)
    runs["task3_ablation_augmentation"] = ablation("augmentation", 0.880, 0.850)
    runs["task3_ablation_whitening"] = ablation("whitening", 0.880, 0.875)
    return runs


def build(tmp_path, runs):
    write_results(tmp_path / "results", runs)
    blocks = report.main(["--results-dir", str(tmp_path / "results"), "--plots-dir", str(tmp_path / "plots"),
                          "--output-dir", str(tmp_path / "report")])
    return blocks, (tmp_path / "report/report.md").read_text()


def pdf_text(path):
    return " ".join(" ".join(page.extract_text().split()) for page in PdfReader(path).pages)


def section(markdown, start, end):
    return markdown[markdown.index(start):markdown.index(end)]


@pytest.fixture(scope="module")
def whole_report(tmp_path_factory):
    """(blocks, Markdown) of the report of every kind of run, built once (figures, Markdown and PDF)."""
    folder = tmp_path_factory.mktemp("whole")
    return (folder, *build(folder, all_runs()))


def test_each_model_gets_its_own_training_details_best_model_first(whole_report):
    _, _, markdown = whole_report
    task3a = section(markdown, "### Task 3a", "### Task 3b")
    vgg = section(task3a, "Training details of vgg", "**resnet**")
    resnet = task3a[task3a.index("Training details of resnet"):]
    assert task3a.index("**vgg** (the best model)") < task3a.index("**resnet**")
    assert "Nesterov SGD, momentum 0.85, for every parameter" in vgg and "Muon" not in vgg
    assert "Muon for the conv filters" in resnet and "10 epochs" in vgg and "8 epochs" in resnet
    assert "peak 1.5 per 1024 images" in vgg and "peak 0.75 per 1024 images" in resnet  # each run's own rate
    for internal in ("no_autocast", "compile", "seeds", "deterministic", "data_dir", "checkpoint"):
        assert internal not in task3a
    assert "The best model, chosen by validation accuracy: **vgg**" in markdown


def test_the_students_answers_survive_a_rebuild_and_reach_both_files(tmp_path):
    runs = all_runs()
    build(tmp_path, runs)
    answers = tmp_path / "report/answers.md"
    template = answers.read_text()
    assert "## Task 3c" in template and "## Task 4c" in template and "Name:" in template
    answers.write_text(template.replace("Name:", "Name: Ada Lovelace").replace(
        "## Task 3c\n", "## Task 3c\nAugmentation helped most: without it the model overfits.\n")
        + "\n## Task 2b\nThe test accuracy is inside the expected range.\n")
    runs["task3_vgg_seed1"] = task3_run("vgg", 1, 0.93)  # a new run, then the report again
    _, markdown = build(tmp_path, runs)
    assert "Ada Lovelace" in answers.read_text()  # never rewritten
    task3c = section(markdown, "### Task 3c", "### Task 3d")
    assert "Augmentation helped most: without it the model overfits." in task3c and "TO WRITE" not in task3c
    assert "TO WRITE" in section(markdown, "### Task 3f", "## Task 4")  # not written yet: the box stays
    assert "The test accuracy is inside the expected range." in section(markdown, "### Task 2b", "## Task 3")
    assert "Name: Ada Lovelace" in markdown and f"{(0.900 + 0.930 + 0.902) / 3:.3f} ± " in markdown  # the new run
    text = pdf_text(tmp_path / "report/report.pdf")
    assert "Augmentation helped most: without it the model overfits." in text and "Ada Lovelace" in text


def test_3d_shows_the_largest_improvement_and_3c_reports_points(whole_report):
    _, blocks, markdown = whole_report
    task3c = section(markdown, "### Task 3c", "### Task 3d")
    assert "| augmentation | resnet, 0 | 88.0 % | 85.0 % | +3.0 pt |" in task3c
    assert "| lookahead | resnet, 0 | 88.0 % | 88.4 % | -0.4 pt |" in task3c
    assert "0.1 pt (3 seeds)" in task3c  # the spread of resnet's three seeds
    task3d = section(markdown, "### Task 3d", "### Task 3e")
    assert "helped most in Task 3c: **augmentation**" in task3d and "task3_ablation_augmentation.png" in task3d
    images = [block for block in blocks if block[0] == "image"]
    assert all(Path(block[1]).is_file() for block in images) and len(images) == 5  # 2a, 3b twice, 3d, 3e
    assert task3.largest_improvement([all_runs()["task3_ablation_whitening"]])["technique"] == "whitening"


def test_the_report_builds_with_any_kinds_of_runs_missing(tmp_path, monkeypatch, whole_report):
    """All 16 subsets of the four kinds of runs give every sub-task. Two (every run: the module's whole report, and
    none) are built whole, PDF and figures; the other 14 as Markdown, their figures drawn onto real axes but not
    rendered to PNG."""
    runs = all_runs()
    kinds = {"task2": ["task2"], "vgg": [n for n in runs if "vgg" in n], "resnet": [n for n in runs if "resnet" in n],
             "ablations": [n for n in runs if "ablation" in n]}
    save_figure = utils.save_figure
    for count in range(len(kinds) + 1):
        for missing in itertools.combinations(kinds, count):
            folder = tmp_path / "-".join(missing or ["none"])
            kept = {name: run for name, run in runs.items()
                    if not any(name in kinds[kind] for kind in missing)}
            whole = count in (0, len(kinds))
            monkeypatch.setattr(utils, "save_figure", save_figure if whole else lambda fig, path, show=False:
                                matplotlib.pyplot.close(fig))
            if count == 0:  # every run: the module's whole report
                folder, _, markdown = whole_report
                assert (folder / "report/report.pdf").read_bytes()[:5] == b"%PDF-"
            elif whole:
                _, markdown = build(folder, kept)
                assert (folder / "report/report.pdf").read_bytes()[:5] == b"%PDF-"
            else:
                write_results(folder / "results", kept)
                markdown = report.to_markdown(report.build(folder / "results", folder / "plots", folder / "report"),
                                              folder / "report")
            for question in ("1a", "2a", "2b", "3a", "3b", "3c", "3d", "3e", "3f", "4a", "4b", "4c"):
                assert f"### Task {question}" in markdown, (missing, question)
            assert ("No results for Task 2" in markdown) is ("task2" in missing)


def test_the_report_from_nothing_names_each_command_and_states_task4a_before_a_run(tmp_path):
    _, markdown = build(tmp_path, {})
    for command in ("python task2.py", "python task3.py --seeds 0 1 2", "python task3.py --ablate augmentation",
                    "python task4a.py", "python task4b.py"):
        assert f"`{command}`" in markdown
    task4a = section(markdown, "### Task 4a", "### Task 4b")
    assert "Adam, learning rate 0.0005" in task4a and "32 images; at most 5 epochs" in task4a
    assert "224x224" in task4a and "8,398,858 of 11,181,642" in task4a
    assert markdown.count("> **TO WRITE:**") == 5 and "390,410" in markdown and "1,972,792" in markdown


def test_a_broken_results_file_is_left_out_with_a_line_and_the_rest_still_builds(tmp_path, capsys):
    runs = all_runs()
    write_results(tmp_path / "results", runs)
    (tmp_path / "results/task2.json").write_text("{broken")
    report.main(["--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert f"left out '{tmp_path / 'results/task2.json'}'" in out
    markdown = (tmp_path / "report/report.md").read_text()
    assert "No results for Task 2" in markdown and "**vgg** (the best model)" in markdown
    assert (tmp_path / "results/task2.json").read_text() == "{broken"


def test_report_image_links_reach_the_figures_from_any_output_folder(tmp_path):
    plot = tmp_path / "runs" / "plots" / "task4b.png"
    for output_dir in (tmp_path / "runs" / "report", tmp_path / "elsewhere" / "deeper"):
        link = report.image_link(plot, output_dir)
        assert not Path(link).is_absolute() and (output_dir / link).resolve() == plot.resolve()
    assert report.image_link(plot, tmp_path / "runs" / "report") == "../plots/task4b.png"


def test_report_from_a_tiny_real_run(tmp_path, monkeypatch, pickled_dir):
    import task2

    monkeypatch.chdir(tmp_path)
    task2.main(["--data-dir", str(pickled_dir), "--epochs", "1", "--batch-size", "32", "--device", "cpu"])
    report.main([])
    final = json.loads((tmp_path / "results/task2.json").read_text())["final"]
    markdown = (tmp_path / "report/report.md").read_text()
    assert f"| {final['test_accuracy']:.3f} |" in markdown
    assert "(figures/task2_loss.png)" in markdown and (tmp_path / "report/figures/task2_loss.png").is_file()
    assert "No results for Task 2" not in markdown and "No results for Task 4a" in markdown
    assert (tmp_path / "report/report.pdf").stat().st_size > 50_000  # the figure is embedded


@pytest.mark.parametrize("text", ["", "Name:\n## Task 3c\n<!-- only a comment -->\n"])
def test_an_empty_answers_file_leaves_every_box(tmp_path, text):
    (tmp_path / "report").mkdir()
    (tmp_path / "report/answers.md").write_text(text)
    _, markdown = build(tmp_path, {})
    assert markdown.count("> **TO WRITE:**") == 5 and (tmp_path / "report/answers.md").read_text() == text
