"""Task 3: the two models, the schedule, the tables, a short run and the ablation mode."""
import json

import pytest
import torch

import task2
import task3
import utils


@pytest.mark.parametrize("name, parameters", [("vgg", 1_148_874), ("resnet", 6_573_120)])
def test_models_give_logits_and_the_parameters_their_tables_state(name, parameters):
    model = task3.MODELS[name]()
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert utils.layer_table(model).splitlines()[-1].endswith(f"| total |  |  |  | {parameters:,} |")
    plain = task3.MODELS[name](batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_the_layer_table_of_the_task2_model_is_table_2():
    rows = utils.layer_rows(task2.ExampleModel(3, 10))
    convs = [row for row in rows if row[0] == "Conv2d"]
    assert [(r[1], r[2], r[3]) for r in convs] == [("32", "5x5 / 1 / 2", "32x32x32"), ("64", "5x5 / 1 / 2", "64x16x16"),
                                                   ("128", "5x5 / 1 / 2", "128x8x8")]
    pools = [row for row in rows if row[0] == "MaxPool2d"]
    assert [(r[2], r[3]) for r in pools] == [("2x2 / 2 / 0", "32x16x16"), ("2x2 / 2 / 0", "64x8x8"), ("2x2 / 2 / 0", "128x4x4")]
    assert [(r[1], r[3]) for r in rows if r[0] == "Linear"] == [("64", "64"), ("10", "10")]
    assert [r[0] for r in rows].count("ReLU") == 4 and sum(r[4] for r in rows) == 390_410


def test_one_cycle_rises_then_falls_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    scheduler = task3.one_cycle(optimizer, total_steps=100, warmup_fraction=0.2)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and rates[20] == pytest.approx(0.4) and rates[10] == pytest.approx(0.2)
    assert rates[60] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.4 * 1 / 80)
    assert max(rates) == pytest.approx(0.4) and optimizer.param_groups[0]["lr"] == 0


def test_a_short_run_learns_and_writes_tables_and_plots(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)
    task3.main(["--data-dir", str(pickled_dir), "--model", "vgg", "--epochs", "3", "--batch-size", "32",
                "--lr", "0.05", "--seeds", "0", "1", "--device", "cpu"])
    runs = [json.loads((tmp_path / f"results/task3_vgg_seed{s}.json").read_text()) for s in (0, 1)]
    for run in runs:
        losses = list(run["train_history"]["loss"].values())
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
        assert run["final"]["val_accuracy"] > 0.3  # ten easy classes: chance is 0.1
        assert run["settings"]["augmentation"] is True and run["optimizer"]["nesterov"] is True
        assert "label smoothing 0.2" in run["loss"]
    assert runs[0]["final"] != runs[1]["final"]  # the seeds differ
    summary = (tmp_path / "results/task3_summary.md").read_text()
    accuracies = [r["final"]["test_accuracy"] for r in runs]
    assert f"{sum(accuracies) / 2:.3f} ± " in summary and "| vgg | 0, 1 |" in summary
    assert "| total |  |  |  | 1,148,874 |" in (tmp_path / "results/task3_vgg_layers.md").read_text()
    assert (tmp_path / "plots/task3_vgg_seed1_plot.png").is_file()


def test_ablation_mode_end_to_end(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)
    task3.main(["--data-dir", str(pickled_dir), "--model", "vgg", "--ablate", "augmentation", "--epochs", "1",
                "--batch-size", "64", "--lr", "0.05", "--device", "cpu"])
    record = json.loads((tmp_path / "results/task3_ablation_augmentation.json").read_text())
    assert set(record["final"]) == {"with", "without"}
    without = json.loads((tmp_path / "results/task3_vgg_ablation_augmentation_without.json").read_text())
    assert without["settings"]["augmentation"] is False and without["settings"]["without"] == "augmentation"
    table = (tmp_path / "results/task3_ablation.md").read_text()
    assert f"| augmentation | vgg | 0 | {record['final']['with']['test_accuracy']:.3f} |" in table
    assert (tmp_path / "plots/task3_ablation_augmentation.png").stat().st_size > 20_000


def test_more_than_ten_epochs_is_refused():
    with pytest.raises(SystemExit):
        task3.main(["--epochs", "11"])
