"""compute_loss_and_accuracy, early stopping, checkpoints and the Trainer's bookkeeping."""
import json
import math

import pytest
import torch
from torch import nn

import trainer as trainer_module
import utils
from dataloaders import DeviceLoader
from trainer import Trainer, compute_loss_and_accuracy


def make_loaders(n_train=48, n_val=20, n_test=10, batch_size=16, seed=0):
    """Random uint8 images in DeviceLoaders (train shuffles), 4 classes."""
    generator = torch.Generator().manual_seed(seed)

    def loader(n, **kwargs):
        images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 4, (n,), generator=generator)
        return DeviceLoader(images, labels, batch_size, mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs)

    return loader(n_train, shuffle=True), loader(n_val), loader(n_test)


def small_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def make_trainer(tmp_path, epochs=3, early_stop_count=4, loaders=None, **kwargs):
    torch.manual_seed(0)
    return Trainer(16, 0.05, early_stop_count, epochs, small_model(), loaders or make_loaders(),
                   device=torch.device("cpu"), checkpoint_dir=tmp_path / "checkpoints",
                   results_dir=tmp_path / "results", name="test", **kwargs)


def test_compute_loss_and_accuracy_by_hand_with_an_uneven_last_batch():
    torch.manual_seed(0)
    logits = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    batches = [(logits[:4], labels[:4]), (logits[4:8], labels[4:8]), (logits[8:], labels[8:])]  # 4, 4, 2
    log_probs = logits.log_softmax(dim=1)
    expected_loss = -sum(log_probs[i, labels[i]].item() for i in range(10)) / 10
    expected_accuracy = sum(int(logits[i].argmax() == labels[i]) for i in range(10)) / 10
    model = nn.Identity()
    model.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # gives the model a device
    loss, accuracy = compute_loss_and_accuracy(batches, model, nn.CrossEntropyLoss())
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert accuracy == expected_accuracy
    # The mean of per-batch means would weigh the last two images double: make sure it differs.
    assert abs(sum(nn.functional.cross_entropy(x, y).item() for x, y in batches) / 3 - expected_loss) > 1e-3
    assert isinstance(loss, float) and isinstance(accuracy, float)


def test_compute_loss_and_accuracy_restores_the_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 8 * 8, 4))
    model.train()
    compute_loss_and_accuracy(make_loaders()[1], model, nn.CrossEntropyLoss())
    assert model.training


@pytest.mark.parametrize("losses, count, expected", [
    ([1.0, 0.9, 0.8], 4, False),                 # too few validations
    ([1.0, 0.9, 0.8, 0.7], 4, False),            # still improving
    ([1.0, 0.9, 0.95, 0.92, 0.91], 4, True),     # 0.9 then three without improvement
    ([1.0, 0.9, 0.95, 0.92, 0.89], 4, False),    # improved at the last moment
    ([0.5, 0.6], 2, True),
    ([0.5, 0.5, 0.5, 0.5], 4, True),             # a tie is no improvement
    ([1.0, 0.9, math.nan, math.nan, math.nan], 4, True),  # diverged: NaN is never lower
    ([math.nan] * 4, 4, True),
])
def test_early_stopping_rule(tmp_path, losses, count, expected):
    trainer = make_trainer(tmp_path, early_stop_count=count)
    trainer.validation_history["loss"] = {step: loss for step, loss in enumerate(losses)}
    assert trainer.should_early_stop() is expected


def scripted_validation(monkeypatch, losses, snapshots):
    """Make validations return `losses` in turn (then real ones), remembering the weights at each."""
    script = iter(losses)

    def fake(dataloader, model, loss_criterion, tta_level=0, memory_format=torch.contiguous_format):
        scripted = next(script, None) if getattr(dataloader, "_is_validation", False) else None
        if scripted is None:
            return real(dataloader, model, loss_criterion, tta_level, memory_format)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return scripted, 0.5

    real = trainer_module.compute_loss_and_accuracy
    monkeypatch.setattr(trainer_module, "compute_loss_and_accuracy", fake)


def test_best_checkpoint_is_the_lowest_validation_loss_and_round_trips(tmp_path, monkeypatch):
    loaders = make_loaders()
    loaders[1]._is_validation = True
    snapshots = []
    scripted_validation(monkeypatch, [2.0, 1.5, 0.7, 1.2, math.nan, 0.9], snapshots)
    trainer = make_trainer(tmp_path, loaders=loaders, epochs=3, early_stop_count=10)
    trainer.train()
    steps = list(trainer.validation_history["loss"])
    assert len(steps) == 6 and trainer.best_step == steps[2]
    best = utils.load_checkpoint(tmp_path / "checkpoints/test/best.ckpt")
    assert best["global_step"] == steps[2] and best["best_val_loss"] == 0.7
    for key, value in snapshots[2].items():
        assert torch.equal(best["model"][key], value)
        assert torch.equal(trainer.model.state_dict()[key], value)  # train() ends on the best weights
    last = utils.load_checkpoint(tmp_path / "checkpoints/test/last.ckpt")
    assert last["global_step"] == steps[-1] and set(last) >= {"model", "optimizer", "settings"}
    assert sorted(p.name for p in (tmp_path / "checkpoints/test").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]

    # A fresh model gets the best weights back.
    other = make_trainer(tmp_path, loaders=loaders)
    torch.nn.init.zeros_(other.model[1].weight)
    other.load_best_model()
    assert torch.equal(other.model[1].weight, snapshots[2]["1.weight"])


def test_no_finite_validation_loss_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    loaders = make_loaders()
    loaders[1]._is_validation = True
    scripted_validation(monkeypatch, [math.nan] * 6, [])
    trainer = make_trainer(tmp_path, loaders=loaders, epochs=3)
    with pytest.raises(utils.UserError, match="diverged"):
        trainer.train()
    assert not (tmp_path / "checkpoints/test/best.ckpt").exists()


def test_missing_best_checkpoint_is_an_error(tmp_path):
    with pytest.raises(utils.UserError, match="no checkpoint"):
        make_trainer(tmp_path).load_best_model()


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.ckpt"
    utils.save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]  # no temporary file left behind


def test_train_records_floats_validates_twice_per_epoch_and_writes_results(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2, settings={"note": "x"})
    final = trainer.train()
    assert trainer.steps_per_epoch == 3
    assert list(trainer.train_history["loss"]) == [1, 2, 3, 4, 5, 6]
    assert list(trainer.validation_history["loss"]) == [2, 3, 5, 6]
    for history in (trainer.train_history, trainer.validation_history):
        assert all(type(v) is float for values in history.values() for v in values.values())
    results = json.loads((tmp_path / "results/test.json").read_text())
    assert results["final"] == final
    assert set(final) == {f"{s}_{m}" for s in ("train", "val", "test") for m in ("loss", "accuracy")}
    assert all(0 <= final[f"{s}_accuracy"] <= 1 for s in ("train", "val", "test"))
    assert results["settings"]["note"] == "x" and results["settings"]["learning_rate"] == 0.05
    assert results["optimizer"]["name"] == "SGD" and results["device"].startswith("cpu")
    assert results["wall_time_s"] >= results["train_time_s"] > 0
    assert results["validation_history"]["loss"]["6"] == trainer.validation_history["loss"][6]
    # The final train figures cover all 48 training images, not the 3 x 16 the epoch used: same here,
    # so check against a direct evaluation of the unshuffled set.
    direct = compute_loss_and_accuracy(trainer.dataloader_train.evaluation_view(64), trainer.model,
                                       nn.CrossEntropyLoss())
    assert final["train_loss"] == pytest.approx(direct[0]) and final["train_accuracy"] == direct[1]


def test_a_single_batch_per_epoch_works(tmp_path):
    loaders = make_loaders(n_train=10, batch_size=16)
    trainer = make_trainer(tmp_path, loaders=loaders, epochs=3)
    trainer.train()
    assert trainer.steps_per_epoch == 1
    assert list(trainer.validation_history["loss"]) == [1, 2, 3]


def test_early_stop_ends_training(tmp_path, monkeypatch):
    loaders = make_loaders()
    loaders[1]._is_validation = True
    scripted_validation(monkeypatch, [1.0, 0.5, 0.6, 0.7, 0.8, 0.4, 0.3], [])
    trainer = make_trainer(tmp_path, loaders=loaders, epochs=10, early_stop_count=4)
    trainer.train()
    assert len(trainer.validation_history["loss"]) == 5 and trainer.best_step == 3
    assert json.loads((tmp_path / "results/test.json").read_text())["stopped_early"] is True


def test_training_history_is_plain_cross_entropy_even_with_label_smoothing(tmp_path):
    trainer = make_trainer(tmp_path, loss_criterion=nn.CrossEntropyLoss(label_smoothing=0.5))
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)  # the weights stay put
    images, labels = next(iter(trainer.dataloader_train))
    recorded, accuracy = trainer.train_step(images, labels)
    with torch.no_grad():
        logits = trainer.model(images)
    assert recorded.item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert recorded.item() != pytest.approx(nn.CrossEntropyLoss(label_smoothing=0.5)(logits, labels).item(), rel=1e-3)
    assert accuracy.item() == (logits.argmax(1) == labels).float().mean().item()


def test_freeze_after_stops_a_parameter_and_the_gradients_only_it_needed(tmp_path):
    """A frozen parameter ends where a zero rate from the same step leaves it, and so does every other weight;
    but from that step on nothing computes its gradient, nor the gradient of the layer output it alone needed."""
    runs = {}
    for how in ("freeze", "zero rate"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.GELU(), nn.Linear(6, 4))
        model[1].weight.requires_grad_(False)  # a fixed input layer with a trainable bias, as Task 3's whitening
        optimizer = torch.optim.SGD([dict(params=[model[1].bias]), dict(params=list(model[3].parameters()))],
                                    lr=0.1, momentum=0.9, weight_decay=0.01)
        scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: float(step < 4), lambda step: 1.0])
                     if how == "zero rate" else None)
        needs_grad = []  # per training step: whether the first layer's output took part in the backward pass
        model[1].register_forward_hook(lambda module, inputs, out, seen=needs_grad: seen.append(out.requires_grad)
                                       if module.training else None)
        trainer = Trainer(16, 0.1, 10, 3, model, make_loaders(), optimizer=optimizer, scheduler=scheduler,
                          device=torch.device("cpu"), checkpoint_dir=tmp_path / how, results_dir=tmp_path / how,
                          freeze_after={"1.bias": 4} if how == "freeze" else None)
        trainer.train()
        runs[how] = model.state_dict(), needs_grad, model[1].bias.grad
    assert runs["freeze"][1] == [True] * 4 + [False] * 5  # 3 epochs of 3 steps
    assert runs["zero rate"][1] == [True] * 9
    assert runs["freeze"][2] is None and runs["zero rate"][2] is not None
    for key, value in runs["zero rate"][0].items():
        assert torch.allclose(runs["freeze"][0][key], value, atol=1e-7), key
    assert not torch.equal(runs["freeze"][0]["1.bias"], torch.zeros(6))  # it trained before the freeze
    with pytest.raises(ValueError, match="9.bias"):
        make_trainer(tmp_path, freeze_after={"9.bias": 1})


def test_test_time_augmentation_averages_the_model_over_its_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    images = torch.randn(2, 3, 8, 8)
    mirror = images.flip(-1)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    down_right, up_left = padded[..., :8, :8], padded[..., 2:, 2:]
    assert torch.equal(down_right[..., 1:, 1:], images[..., :7, :7])
    assert torch.equal(up_left[..., :7, :7], images[..., 1:, 1:])
    with torch.no_grad():
        assert torch.equal(trainer_module.predict_plain_and_views(model, images, 0)[1], model(images))
        level1 = (model(images) + model(mirror)) / 2
        assert torch.allclose(trainer_module.predict_plain_and_views(model, images, 1)[1], level1)
        views = [model(v) for v in (down_right, down_right.flip(-1), up_left, up_left.flip(-1))]
        assert torch.allclose(trainer_module.predict_plain_and_views(model, images, 2)[1], level1 / 2 + sum(views) / 8,
                              atol=1e-6)


def test_plain_and_tta_figures_come_from_one_pass_over_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    batches = [(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 4])), (torch.randn(2, 3, 8, 8), torch.tensor([2, 2]))]
    criterion = nn.CrossEntropyLoss()
    for level, views in ((0, 1), (1, 2), (2, 6)):
        calls.clear()
        plain, tta = trainer_module.compute_plain_and_tta(batches, model, criterion, level)
        assert calls == [3] * views + [2] * views  # the image alone is computed once, for both figures
        assert plain == pytest.approx(compute_loss_and_accuracy(batches, model, criterion))
        assert tta == pytest.approx(compute_loss_and_accuracy(batches, model, criterion, tta_level=level))
    assert plain != pytest.approx(tta)


def test_final_evaluation_reports_test_time_augmentation_beside_the_plain_figures(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, tta_level=1)
    final = trainer.train()
    assert {"val_accuracy_tta", "val_loss_tta", "test_accuracy_tta", "test_loss_tta"} <= set(final)
    expected = compute_loss_and_accuracy(trainer.dataloader_test, trainer.model, nn.CrossEntropyLoss(), tta_level=1)
    assert (final["test_loss_tta"], final["test_accuracy_tta"]) == pytest.approx(expected)
    assert "train_accuracy_tta" not in final and trainer.settings["tta_level"] == 1


def test_test_time_views_are_averaged_in_float32_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, tta = trainer_module.predict_plain_and_views(model, images, 2)
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :8, :8], padded[..., 2:, 2:]]
        views = [model(v).float() for v in (images, images.flip(-1), *shifted, *(v.flip(-1) for v in shifted))]
    # Each view's logits are bfloat16 numbers; their weighted sum is taken in float32, not rounded to bfloat16.
    expected = 0.25 * (views[0] + views[1]) + 0.125 * (views[2] + views[4] + views[3] + views[5])
    assert plain.dtype == tta.dtype == torch.float32
    assert torch.allclose(tta, expected, atol=1e-6) and not torch.equal(tta, expected.bfloat16().float())


def test_without_mixed_precision_no_autocast_context_is_made(tmp_path, monkeypatch):
    """Off is no context at all: a disabled torch.autocast raises on Apple's MPS up to torch 2.3."""
    def no_autocast(*args, **kwargs):
        raise RuntimeError("torch.autocast built, though mixed precision is off")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    make_trainer(tmp_path, epochs=1).train()


def test_a_checkpoint_resumes_where_fewer_gpus_are_visible_than_where_it_was_saved(monkeypatch):
    """Saved by a run that saw two GPUs, resumed by a cluster job pinned to one: the GPUs' generators are neither
    saved nor restored (nothing draws from them), so nothing indexes a GPU that is not there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)] * 2)

    def one_gpu(states):
        if len(states) > 1:
            raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", one_gpu)
    states = trainer_module.random_states()
    trainer_module.set_random_states(states)
    assert "cuda" not in states


def test_the_best_model_is_read_on_the_cpu_whatever_device_trains(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.train()
    seen = []
    load = utils.load_checkpoint
    monkeypatch.setattr(utils, "load_checkpoint", lambda path, device="cpu", **kw: seen.append(str(device))
                        or load(path, device, **kw))
    trainer.device = torch.device("cuda")  # a GPU run: only the weights should reach the GPU, by load_state_dict
    trainer.load_best_model()
    assert seen == ["cpu"]


def test_evaluation_and_test_time_views_reach_the_model_in_its_memory_format(tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 6 * 6, 4))
    seen = []
    conv.register_forward_pre_hook(lambda module, inputs: seen.append(
        (module.training, inputs[0].is_contiguous(memory_format=torch.channels_last))))
    torch.manual_seed(0)
    trainer = Trainer(16, 0.05, 4, 1, model, make_loaders(), device=torch.device("cpu"), channels_last=True,
                      tta_level=2, checkpoint_dir=tmp_path / "c", results_dir=tmp_path / "r")
    trainer.train()
    evaluations = [channels_last for training, channels_last in seen if not training]
    assert evaluations and all(evaluations)
