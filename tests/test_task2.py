"""task2.py: the Table-2 model, and the script end to end on tiny data and on bad input."""
import json
import sys

import pytest
import torch

import task2
from conftest import run_script


def test_example_model_is_table_2():
    model = task2.ExampleModel(image_channels=3, num_classes=10)
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == 390_410
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) and c.stride == (1, 1) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(linear.in_features, linear.out_features) for linear in linears] == [(2048, 64), (64, 10)]


def test_task2_end_to_end_on_tiny_data(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)  # plots/, results/ and checkpoints/ land here
    trainer = task2.main(["--data-dir", str(pickled_dir), "--epochs", "6", "--batch-size", "16",
                          "--lr", "0.02", "--device", "cpu"])
    plot = tmp_path / "plots/task2_plot.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    results = json.loads((tmp_path / "results/task2.json").read_text())
    final = results["final"]
    assert final == trainer.final
    assert all(0 <= final[f"{s}_accuracy"] <= 1 and final[f"{s}_loss"] > 0 for s in ("train", "val", "test"))
    # The tiny classes are easy: the run must learn, not just finish.
    assert final["val_accuracy"] > 0.5 and final["test_accuracy"] > 0.5
    losses = list(trainer.train_history["loss"].values())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    assert results["parameters"] == 390_410 and results["settings"]["batch_size"] == 16
    assert results["optimizer"]["name"] == "SGD" and results["optimizer"]["lr"] == 0.02
    assert results["steps_per_epoch"] == 360 // 16
    assert (tmp_path / "checkpoints/task2/best.ckpt").is_file()


def test_missing_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    saved = tmp_path / "results" / "task2.json"
    saved.parent.mkdir()
    saved.write_text("an earlier run")
    # Every download goes to a closed local port, so it fails at once, as offline.
    closed = "http://127.0.0.1:9"
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, closed)
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(variable, "")
    result = run_script(["task2.py", "--data-dir", "nothing-here", "--device", "cpu"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "nothing-here" in error_lines[0] and "--data-dir" in error_lines[0]
    assert saved.read_text() == "an earlier run"  # nothing already saved is touched
    assert not (tmp_path / "nothing-here").exists()  # nor a folder left behind by the failed download


def test_bad_flags_fail_before_anything_runs(tmp_path):
    result = run_script(["task2.py", "--epochs", "0"], tmp_path)
    assert result.returncode == 2 and "--epochs: must be a positive integer" in result.stderr
    result = run_script(["task2.py", "--device", "cuda:7", "--data-dir", "x"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --device cuda:7")
    assert not any(tmp_path.iterdir())


def test_main_ignores_the_notebook_kernels_own_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    seen = {}

    def fake_load(batch_size, **kwargs):
        seen.update(kwargs, batch_size=batch_size)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(task2.dataloaders, "load_cifar10", fake_load)
    with pytest.raises(RuntimeError, match="stop before loading"):
        task2.main()
    assert seen["batch_size"] == 64 and seen["data_dir"] == "data/cifar10" and seen["seed"] == 0
