"""Task 3: the two models, the schedule, the tables, a short run and the ablation mode."""
import json

import pytest
import torch
from torch import nn

import optim
import task2
import task3
import utils


@pytest.mark.parametrize("name, parameters, frozen", [("vgg", 1_972_792, 1_440), ("resnet", 498_104, 864)])
def test_models_give_logits_and_the_parameters_their_tables_state(name, parameters, frozen):
    model = task3.MODELS[name]()
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    # Fixed: the whitening filters (24 x 3 x 2 x 2) and every batch-norm scale.
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen
    assert utils.layer_table(model).splitlines()[-1].endswith(f"| total |  |  |  | {parameters:,} |")
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 10)  # smaller crops (--crop-sizes) pass too
    learnt_first_layer = task3.MODELS[name](whitening=False)
    assert learnt_first_layer.whiten.weight.requires_grad


def test_the_residual_model_adds_its_shortcuts_and_its_table_shows_them():
    model = task3.MODELS["resnet"]()
    rows = utils.layer_rows(model)
    assert [r[3] for r in rows if r[0] == "Residual"] == ["32x15x15", "128x7x7", "128x3x3"]
    shortcut = next(m for m in model.modules() if isinstance(m, task3.Residual))
    x = torch.randn(2, 32, 15, 15)
    assert torch.allclose(shortcut(x), x + shortcut.block(x))


def test_vgg_convs_start_as_identity_on_their_input_channels():
    conv = next(m for m in task3.MODELS["vgg"]().modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    x = torch.randn(1, conv.in_channels, 9, 9)
    assert torch.allclose(conv(x)[:, :conv.in_channels], x)


def test_the_whitening_layer_whitens_the_patches_it_was_fitted_on():
    torch.manual_seed(0)
    # Correlated colour channels, smooth in space: far from white.
    base = torch.randn(200, 1, 16, 16).cumsum(-1).cumsum(-2) / 10
    images = torch.cat([base, 0.8 * base + 0.2 * torch.randn_like(base), 0.3 * torch.randn_like(base) - base], dim=1)
    layer = task3.Whitening()
    layer.fit(images, eps=0.0)
    with torch.no_grad():
        out = layer(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()  # the first 12: the whitening filters
    covariance = out.T @ out / len(out)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(layer.weight[12:], -layer.weight[:12]) and not layer.weight.requires_grad
    assert torch.equal(layer.bias, torch.zeros(24))
    # With eps, a principal direction of variance v leaves with variance v / (v + eps).
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    variances = torch.linalg.eigvalsh(patches.T @ patches / len(patches))
    eps = variances[6].item()  # damps the six directions of least variance, barely touches the largest
    layer.fit(images, eps=eps)
    with torch.no_grad():
        out = layer(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert torch.allclose(torch.linalg.eigvalsh(out.T @ out / len(out)), variances / (variances + eps), atol=1e-3)


def test_the_layer_table_of_the_task2_model_is_table_2():
    rows = utils.layer_rows(task2.ExampleModel(3, 10))
    convs = [row for row in rows if row[0] == "Conv2d"]
    assert [(r[1], r[2], r[3]) for r in convs] == [("32", "5x5 / 1 / 2", "32x32x32"), ("64", "5x5 / 1 / 2", "64x16x16"),
                                                   ("128", "5x5 / 1 / 2", "128x8x8")]
    pools = [row for row in rows if row[0] == "MaxPool2d"]
    assert [(r[2], r[3]) for r in pools] == [("2x2 / 2 / 0", "32x16x16"), ("2x2 / 2 / 0", "64x8x8"),
                                             ("2x2 / 2 / 0", "128x4x4")]
    assert [(r[1], r[3]) for r in rows if r[0] == "Linear"] == [("64", "64"), ("10", "10")]
    assert [r[0] for r in rows].count("ReLU") == 4 and sum(r[4] for r in rows) == 390_410


def test_a_short_run_learns_and_writes_tables_and_plots(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)
    task3.main(["--data-dir", str(pickled_dir), "--model", "resnet", "--epochs", "4", "--batch-size", "32",
                "--seeds", "0", "1", "--device", "cpu"])
    runs = [json.loads((tmp_path / f"results/task3_resnet_seed{s}.json").read_text()) for s in (0, 1)]
    for run in runs:
        losses = list(run["train_history"]["loss"].values())
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
        assert run["final"]["val_accuracy"] > 0.3  # ten easy classes: chance is 0.1
        assert run["settings"]["recipe"]["augmentation"] is True and run["settings"]["recipe"]["flip"] == "alternate"
        assert run["settings"]["lookahead"] is True and run["settings"]["tta_level"] == 2
        # resnet's recipe
        assert run["optimizer"]["name"] == "Muon" and run["settings"]["recipe"]["optimizer"] == "muon"
        assert "label smoothing 0.2" in run["loss"]
        assert {"test_accuracy_tta", "val_accuracy_tta", "test_loss_tta"} <= set(run["final"])
        assert run["dataset_sizes"] == dict(train=360, val=40, test=100) and run["command"].startswith("python")
    assert runs[0]["final"] != runs[1]["final"]  # the seeds differ
    summary = (tmp_path / "results/task3_summary.md").read_text()
    accuracies = [r["final"]["test_accuracy"] for r in runs]
    assert f"| {task3.mean_std(accuracies)} |" in summary and "| resnet | 0, 1 |" in summary
    assert "| total |  |  |  | 498,104 |" in (tmp_path / "results/task3_resnet_layers.md").read_text()
    assert (tmp_path / "plots/task3_resnet_seed1_plot.png").is_file()


def test_the_recipe_reaches_the_optimizer(pickled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(task3.Trainer, "train", lambda self: seen.setdefault("trainer", self))
    args = ["--data-dir", str(pickled_dir), "--model", "vgg", "--batch-size", "64", "--device", "cpu"]
    task3.main(args)
    trainer = seen["trainer"]
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    lr = 1.5 * 64 / 1024  # the default rate per 1024 images, for a batch of 64
    assert groups["other"]["lr"] == pytest.approx(lr * 0.2)  # the schedule starts at 0.2 of the peak
    assert groups["norm biases"]["lr"] == pytest.approx(64 * lr * 0.2)
    for group in groups.values():  # decoupled weight decay: the same fraction removed per step in every group
        assert group["weight_decay"] * group["initial_lr"] == pytest.approx(2e-3 * 64 / 1024)
    assert trainer.optimizer.defaults["nesterov"] and trainer.optimizer.defaults["momentum"] == 0.85
    assert trainer.lookahead.every == 80 and trainer.lookahead.start_step == 3 * trainer.steps_per_epoch
    # The whitening bias trains with the other weights for --whiten-bias-epochs, then is frozen.
    assert any(p is trainer.model.whiten.bias for p in groups["other"]["params"])
    assert trainer.freeze_after == [(trainer.model.whiten.bias, 3 * trainer.steps_per_epoch)]
    scheduler = trainer.scheduler
    while scheduler.last_epoch < 10 * trainer.steps_per_epoch:  # to the last step: 0.07 of the peak
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        scheduler.step()
    assert groups["other"]["lr"] == pytest.approx(lr * 0.07)


def test_muon_takes_the_conv_filters_and_sgd_the_rest(pickled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(task3.Trainer, "train", lambda self: seen.setdefault("trainer", self))
    task3.main(["--data-dir", str(pickled_dir), "--model", "vgg", "--batch-size", "64", "--device", "cpu",
                "--optimizer", "muon", "--muon-lr", "0.05", "--muon-momentum", "0.6", "--final-lr-scale", "0"])
    trainer = seen["trainer"]
    assert isinstance(trainer.optimizer, optim.Muon)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    filters = groups["conv filters"]
    assert filters["orthogonalize"] and filters["momentum"] == 0.6 and filters["weight_decay"] == 0
    assert filters["lr"] == pytest.approx(0.05 * 0.2)  # the same schedule as the rest
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert len(convs) == 6 and {id(p) for p in filters["params"]} == {id(p) for p in convs}
    others = [g for name, g in groups.items() if name != "conv filters"]
    assert not any(g["orthogonalize"] for g in others) and all(g["momentum"] == 0.85 for g in others)
    assert trainer.settings["recipe"]["optimizer"] == "muon" and trainer.settings["recipe"]["muon_lr"] == 0.05
    for _ in range(10 * trainer.steps_per_epoch):  # --final-lr-scale 0: every rate ends at zero
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert filters["lr"] == 0 and groups["other"]["lr"] == 0 and groups["norm biases"]["lr"] == 0
    assert trainer.settings["recipe"]["final_lr_scale"] == 0


def test_each_model_trains_with_its_recipe_unless_the_command_line_says_otherwise(pickled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainers = []
    monkeypatch.setattr(task3.Trainer, "train", lambda self: trainers.append(self))
    flags = ["--data-dir", str(pickled_dir), "--batch-size", "64", "--device", "cpu"]
    task3.main(flags)
    recipes = {t.name: (type(t.optimizer).__name__, t.epochs, t.settings["recipe"]["optimizer"], t.settings["epochs"])
               for t in trainers}
    assert recipes == {"task3_vgg_seed0": ("SGD", 10, "sgd", 10), "task3_resnet_seed0": ("Muon", 8, "muon", 8)}
    trainers.clear()
    task3.main([*flags, "--optimizer", "sgd", "--epochs", "5"])
    assert [(type(t.optimizer).__name__, t.epochs) for t in trainers] == [("SGD", 5), ("SGD", 5)]


def test_progressive_crops_reach_the_training_loader_and_the_results(pickled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task3.main(["--data-dir", str(pickled_dir), "--model", "resnet", "--epochs", "3", "--batch-size", "60",
                "--device", "cpu", "--crop-sizes", "20", "24"])
    run = json.loads((tmp_path / "results/task3_resnet_seed0.json").read_text())
    assert run["settings"]["recipe"]["crop_sizes"] == [20, 24] and run["epochs_run"] == 3
    assert run["final"]["val_accuracy"] > 0.2  # learns on crops, evaluated on whole images
    seen = {}
    monkeypatch.setattr(task3.Trainer, "train", lambda self: seen.setdefault("trainer", self))
    task3.main(["--data-dir", str(pickled_dir), "--model", "resnet", "--device", "cpu", "--crop-sizes", "20", "24"])
    loader = seen["trainer"].dataloader_train
    assert [loader.crop_size(epoch) for epoch in range(4)] == [20, 24, 32, 32]
    assert next(iter(loader))[0].shape[-2:] == (20, 20)


def test_widths_set_the_stages_of_the_model_and_its_layer_table(pickled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(task3.Trainer, "train", lambda self: seen.setdefault("trainer", self))
    task3.main(["--data-dir", str(pickled_dir), "--model", "vgg", "--device", "cpu", "--widths", "16", "32", "48"])
    convs = [m for m in seen["trainer"].model.modules() if isinstance(m, nn.Conv2d)][1:]  # after the whitening
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 48, 48]
    assert seen["trainer"].settings["recipe"]["widths"] == [16, 32, 48]
    table = (tmp_path / "results/task3_vgg_layers.md").read_text()
    assert table.splitlines()[-1].endswith(f"| {sum(p.numel() for p in seen['trainer'].model.parameters()):,} |")


def test_ablation_mode_end_to_end(tmp_path, monkeypatch, pickled_dir, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--data-dir", str(pickled_dir), "--epochs", "2", "--batch-size", "64", "--device", "cpu"]
    task3.main([*flags, "--ablate", "lookahead"])
    record = json.loads((tmp_path / "results/task3_ablation_lookahead.json").read_text())
    assert set(record["final"]) == {"with", "without"} and record["model"] == task3.CHEAPER_MODEL
    assert record["runs"] == {"with": "task3_resnet_seed0", "without": "task3_resnet_without_lookahead_seed0"}
    with_ = json.loads((tmp_path / "results/task3_resnet_seed0.json").read_text())
    without = json.loads((tmp_path / "results/task3_resnet_without_lookahead_seed0.json").read_text())
    assert with_["settings"]["lookahead"] is True and with_["settings"]["without"] is None
    assert without["settings"]["lookahead"] is False and without["settings"]["without"] == "lookahead"
    assert record["final"] == {"with": with_["final"], "without": without["final"]}
    table = (tmp_path / "results/task3_ablation.md").read_text()
    tta = with_["final"]["test_accuracy_tta"], without["final"]["test_accuracy_tta"]
    row = f"| lookahead | resnet, 0 | {100 * tta[0]:.1f} % | {100 * tta[1]:.1f} % | {task3.points(tta[0] - tta[1])} |"
    assert row in table
    assert record["loss_histories"]["without"]["validation"] == without["validation_history"]["loss"]
    assert (tmp_path / "plots/task3_ablation_lookahead.png").stat().st_size > 20_000
    assert (tmp_path / "plots/task3_resnet_seed0_plot.png").is_file()

    # A second ablation with the same settings takes the full recipe's run as it is: one reference for all.
    reference = tmp_path / "results/task3_resnet_seed0.json"
    made = reference.stat().st_mtime_ns
    capsys.readouterr()
    task3.main([*flags, "--ablate", "label_smoothing"])
    assert "task3_resnet_seed0: made already with these settings" in capsys.readouterr().out
    assert reference.stat().st_mtime_ns == made
    record = json.loads((tmp_path / "results/task3_ablation_label_smoothing.json").read_text())
    assert record["final"]["with"] == with_["final"]
    assert "| label smoothing | resnet, 0 |" in (tmp_path / "results/task3_ablation.md").read_text()

    # Other settings: the reference is trained again with them.
    task3.main([*flags[:3], "1", *flags[4:], "--ablate", "label_smoothing"])
    assert json.loads(reference.read_text())["settings"]["epochs"] == 1


@pytest.mark.parametrize("technique, setting, value", [
    ("augmentation", "augmentation", False), ("alternating_flip", "flip", "random"),
    ("whitening", "whitening", False), ("label_smoothing", "label_smoothing", 0.0)])
def test_each_ablation_removes_its_technique(tmp_path, monkeypatch, pickled_dir, technique, setting, value):
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(task3.Trainer, "train", lambda self: None)  # built, not trained
    monkeypatch.setattr(task3, "ablate",
                        lambda model, tech, recipe, args: seen.append(task3.train_one(model, recipe, 0, args, tech)))
    task3.main(["--data-dir", str(pickled_dir), "--ablate", technique, "--batch-size", "64", "--device", "cpu"])
    trainer = seen[0]
    assert trainer.settings["recipe"][setting] == value
    loader = trainer.dataloader_train
    assert loader.augment is (technique != "augmentation")
    assert loader.flip == ("random" if technique == "alternating_flip" else "alternate")
    assert trainer.model.whiten.weight.requires_grad is (technique == "whitening")
    assert trainer.loss_criterion.label_smoothing == (0.0 if technique == "label_smoothing" else 0.2)


@pytest.mark.parametrize("flags", [["--epochs", "11"], ["--translate", "-1"], ["--label-smoothing", "1.5"],
                                   ["--momentum", "-0.1"], ["--weight-decay", "-1"], ["--whiten-bias-epochs", "-2"],
                                   ["--whiten-eps", "0"], ["--optimizer", "adam"], ["--muon-lr", "0"],
                                   ["--muon-momentum", "1.5"], ["--crop-sizes", "24", "40"], ["--crop-sizes", "4"],
                                   ["--widths", "64", "0", "64"]])
def test_bad_recipe_flags_are_refused_before_anything_runs(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        task3.main(flags)
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err


def test_every_entry_of_the_recipe_is_set_by_its_own_flag():
    vgg = task3.RECIPES["vgg"]
    for key, value in vgg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv, expected = [f"--no-{flag[2:]}"], False
        elif isinstance(value, list):
            argv, expected = [flag, "24", "24", "24"] if key == "widths" else [flag, "24"], \
                [24, 24, 24] if key == "widths" else [24]
        elif key in ("optimizer", "border", "flip", "tta_level"):
            expected = {"optimizer": "muon", "border": "zeros", "flip": "random", "tta_level": 1}[key]
            argv = [flag, str(expected)]
        elif isinstance(value, int):
            argv, expected = [flag, str(value + 1)], value + 1
        else:
            argv, expected = [flag, str(value / 2)], value / 2
        recipe = task3.recipe_from("vgg", task3.build_parser().parse_args(["--model", "vgg", *argv]))
        assert recipe == dict(vgg, **{key: expected}), key  # that entry, and no other, changed
    assert task3.recipe_from("vgg", task3.build_parser().parse_args([])) == vgg
    assert task3.RECIPES["resnet"] == dict(vgg, widths=[32, 128, 128], optimizer="muon", epochs=8)


def test_an_ablation_changes_the_recipe_in_its_own_entries_only():
    for technique, removed in task3.TECHNIQUES.items():
        assert removed and all(task3.RECIPES["resnet"][key] != value for key, value in removed.items()), technique
