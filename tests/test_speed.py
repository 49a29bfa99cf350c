"""Speed levers (mixed precision, channels-last, torch.compile) and benchmark.py on tiny data."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import benchmark
import task2
import utils
from test_trainer import make_trainer


def flags(**overrides):
    defaults = dict(precision="auto", no_channels_last=False, compile=False)
    return argparse.Namespace(**dict(defaults, **overrides))


class CompileSpy:
    """Stands in for torch.compile: compiles for real (with the light 'eager' backend) and counts forward calls."""

    def __init__(self):
        self.compiled = []
        self.calls = 0
        self.real = torch.compile

    def __call__(self, model):
        spy = self

        class Counted(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = spy.real(model, backend="eager")

            def forward(self, x):
                spy.calls += 1
                return self.inner(x)

        self.compiled.append(model)
        return Counted()


@pytest.fixture
def compile_spy(monkeypatch):
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    return spy


def test_speed_defaults_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2", "fma"})  # a CPU that only emulates bfloat16
    assert utils.speed_options(flags(), cpu) == dict(autocast_dtype=None, channels_last=True, compile_model=False)
    assert utils.speed_options(flags(no_channels_last=True), cpu)["channels_last"] is False
    assert utils.speed_options(flags(), torch.device("mps"))["channels_last"] is False
    assert utils.speed_options(flags(compile=True), cpu)["compile_model"] is True
    # An Ampere-or-later GPU computes bfloat16 natively; a T4 only emulates it, so it gets float16. Asked of the
    # GPU in use: here an A100 (cuda:1) beside a T4 (cuda:0, the current device).
    capabilities = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capabilities[0 if device is None else torch.device(device).index or 0])
    assert utils.speed_options(flags(), torch.device("cuda:1")) == dict(autocast_dtype=torch.bfloat16,
                                                                       channels_last=True, compile_model=False)
    assert utils.autocast_dtype(cuda) == torch.float16 and utils.autocast_dtype(torch.device("cuda:0")) == torch.float16
    assert utils.autocast_dtype(cuda, "bfloat16") == torch.bfloat16  # asked for, emulated or not
    assert utils.autocast_dtype(torch.device("cuda:1"), "float16") == torch.float16  # a T4's path on an A100
    assert utils.speed_options(flags(precision="float32", no_channels_last=True), cuda) == dict(
        autocast_dtype=None, channels_last=False, compile_model=False)


@pytest.mark.parametrize("speed, dtype, channels_last, scaler", [
    ({}, torch.float32, False, False),
    (dict(autocast_dtype=torch.bfloat16), torch.bfloat16, False, False),
    (dict(autocast_dtype=torch.float16), torch.float16, False, True),  # float16 needs the gradient scaler
    (dict(channels_last=True), torch.float32, True, False),
])
def test_levers_reach_the_training_step(tmp_path, speed, dtype, channels_last, scaler):
    trainer = make_trainer(tmp_path, **speed)
    seen = []
    trainer.model[0].register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.model[1].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = trainer.model[1].weight.detach().clone()
    images, labels = next(iter(trainer.dataloader_train))
    loss, accuracy = trainer.train_step(images, labels)
    assert seen == [channels_last, dtype]
    assert trainer.grad_scaler.is_enabled() is scaler
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert not torch.equal(before, trainer.model[1].weight)  # the step really updated the weights
    assert trainer.model[1].weight.dtype == torch.float32  # autocast leaves the weights in float32


def test_a_compiled_model_trains_and_its_checkpoints_load_into_the_plain_model(tmp_path, compile_spy):
    trainer = make_trainer(tmp_path, epochs=2, compile_model=True)
    trainer.train()
    assert compile_spy.compiled == [trainer.model] and compile_spy.calls > 0
    state = utils.load_checkpoint(tmp_path / "checkpoints/test/best.ckpt")["model"]
    assert not any(key.startswith("_orig_mod.") for key in state)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    plain.load_state_dict(state)  # strict: every key matches
    assert json.loads((tmp_path / "results/test.json").read_text())["settings"]["compiled"] is True


def record_forward_precision(monkeypatch):
    """Make task2.ExampleModel note, on every forward pass, the autocast dtype it runs under (None: off)."""
    seen = []
    forward = task2.ExampleModel.forward

    def recording(self, x):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, x)

    monkeypatch.setattr(task2.ExampleModel, "forward", recording)
    return seen


@pytest.mark.parametrize("extra, expected", [([], torch.bfloat16), (["--precision", "float32"], None),
                                             (["--no-autocast"], None), (["--precision", "float16"], torch.float16),
                                             (["--bfloat16"], torch.bfloat16)])
def test_the_precision_flag_reaches_the_training_step(tmp_path, monkeypatch, pickled_dir, extra, expected):
    monkeypatch.chdir(tmp_path)
    real = utils.autocast_dtype

    def as_on_an_ampere_gpu(device, precision="auto"):
        return torch.bfloat16 if precision == "auto" else real(device, precision)

    monkeypatch.setattr(utils, "autocast_dtype", as_on_an_ampere_gpu)
    seen = record_forward_precision(monkeypatch)
    trainer = task2.main(["--data-dir", str(pickled_dir), "--epochs", "1", "--batch-size", "180", "--device", "cpu",
                          *extra])
    assert seen and set(seen) == {expected}
    assert trainer.settings["precision"] == str(expected or torch.float32).removeprefix("torch.")
    assert trainer.grad_scaler.is_enabled() is (expected == torch.float16)  # float16 with the scaler, on the CPU too
    results = json.loads((tmp_path / "results/task2.json").read_text())
    assert results["settings"]["precision"] == trainer.settings["precision"]
    assert results["skipped_steps"] == trainer.skipped_steps and all(p.dtype == torch.float32
                                                                      for p in trainer.model.parameters())


def test_the_compile_flag_reaches_the_training_step(tmp_path, monkeypatch, pickled_dir, compile_spy):
    monkeypatch.chdir(tmp_path)
    trainer = task2.main(["--data-dir", str(pickled_dir), "--epochs", "1", "--device", "cpu", "--compile"])
    assert compile_spy.compiled == [trainer.model] and compile_spy.calls >= trainer.global_step
    plain = task2.ExampleModel(3, 10)
    plain.load_state_dict(utils.load_checkpoint(tmp_path / "checkpoints/task2/best.ckpt")["model"])


def read_tables(text):
    """{section number: rows as lists of cell strings} from benchmark.py's Markdown."""
    tables = {}
    for number, body in re.findall(r"^(\d)\. .*?\n\n((?:\|.*\n?)+)", text, flags=re.M):
        rows = body.strip().splitlines()[2:]  # after the header and the |---| line
        tables[int(number)] = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return tables


def number(cell):
    return float(cell.replace(",", "").rstrip("x"))


def test_benchmark_on_tiny_data_writes_consistent_tables(tmp_path, monkeypatch, pickled_dir, compile_spy):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils, "cpu_flags", lambda: {"avx2", "fma"})  # a CPU that only emulates bfloat16
    out = tmp_path / "bench.md"
    benchmark.main(["--data-dir", str(pickled_dir), "--device", "cpu", "--models", "task2", "task4a",
                    "--image-size", "32", "--steps", "2", "--warmup-steps", "1", "--repeats", "2",
                    "--pipeline-batches", "2", "--full-run-epochs", "1", "--workers", "0", "--out", str(out)])
    tables = read_tables(out.read_text())
    assert sorted(tables) == [1, 2, 3]

    assert [row[0] for row in tables[1]] == ["32x32, normalise (Task 2)", "32x32, crop + flip + normalise (Task 3)",
                                            "resize to 32x32 + normalise (Task 4a)"]
    for _, _, standard, ours, ratio in tables[1]:
        assert number(standard) > 0 and number(ours) > 0
        assert number(ratio) == pytest.approx(number(ours) / number(standard), rel=0.05, abs=0.06)

    labels = ["standard, float32", "ours, float32", "ours + bfloat16 autocast (emulated)", "ours + channels-last",
              "ours + torch.compile",
              "ours, the defaults + torch.compile (--compile)"]  # on a CPU the defaults are channels-last
    assert [(row[0], row[1]) for row in tables[2]] == [("Task 2 CNN", label) for label in labels] + [
        ("Task 4a ResNet18 at 32x32", label) for label in labels]
    assert len(compile_spy.compiled) == 4 and compile_spy.calls >= 4 * (1 + 2 * 2)  # warm-up + repeats x steps
    layouts = [next(p for p in model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
               for model in compile_spy.compiled]
    assert layouts == [False, True, False, True]  # per network: compile alone, then on top of channels-last
    # The table rounds images per second to whole numbers: on a loaded machine a slow network's rate is
    # small enough for that rounding alone to move a ratio by several per cent, so allow for it.
    for _network, _label, _batch, rate, epoch_s, _ratio, warmup_s in tables[2]:
        assert number(epoch_s) == pytest.approx(400 / number(rate), rel=0.05 + 0.5 / number(rate), abs=0.06)
        assert number(warmup_s) >= 0
    for first in (tables[2][0], tables[2][len(labels)]):
        assert first[5] == "1.00x"
    for row in tables[2]:
        standard = next(r for r in tables[2] if r[0] == row[0] and r[1] == "standard, float32")
        rounding = 0.5 / number(row[3]) + 0.5 / number(standard[3])
        assert number(row[5]) == pytest.approx(number(row[3]) / number(standard[3]), rel=0.05 + rounding, abs=0.011)

    (standard_run, our_run) = tables[3]
    assert standard_run[0].startswith("standard") and our_run[0].startswith("ours")
    for row in tables[3]:
        assert row[1] == "1" and 0 < number(row[2]) <= number(row[3]) and 0 <= number(row[4]) <= 1
    assert standard_run[5] == "1.0x"
    # The speed-up is the ratio of the two whole-run times, which the table rounds to 0.1 s: on runs
    # of about a second that rounding alone moves the ratio by 10 %, so bound it from both sides.
    standard_s, our_s = number(standard_run[3]), number(our_run[3])
    lowest, highest = (standard_s - 0.05) / (our_s + 0.05), (standard_s + 0.05) / max(our_s - 0.05, 0.01)
    assert lowest - 0.05 <= number(our_run[5]) <= highest + 0.05
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results").exists()  # nothing of a user's


@pytest.mark.parametrize("flags_, native", [({"avx2", "avx512f", "avx512_bf16"}, True),
                                           ({"avx2", "amx_bf16", "amx_tile"}, True),
                                           ({"avx2", "avx512f", "fma"}, False)])
def test_cpus_that_compute_bfloat16_natively_train_in_it_by_default(monkeypatch, flags_, native):
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_flags", lambda: flags_)
    assert utils.cpu_computes_bfloat16() is native
    assert utils.speed_options(flags(), cpu)["autocast_dtype"] == (torch.bfloat16 if native else None)
    assert utils.speed_options(flags(precision="float32"), cpu)["autocast_dtype"] is None  # float32 when asked
    assert utils.speed_options(flags(precision="bfloat16"), cpu)["autocast_dtype"] == torch.bfloat16  # even emulated
    assert utils.speed_options(flags(precision="float16"), cpu)["autocast_dtype"] == torch.float16


def test_mixed_precision_on_apple_mps_is_one_line():
    with pytest.raises(utils.UserError, match="--precision float16: mixed precision is not supported on Apple MPS"):
        utils.autocast_dtype(torch.device("mps"), "float16")
    assert utils.autocast_dtype(torch.device("mps")) is None


def test_the_gradient_scaler_skips_an_overflowing_step_and_counts_it(tmp_path):
    trainer = make_trainer(tmp_path, autocast_dtype=torch.float16)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # the scaled float16 gradients: inf
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    images, labels = next(iter(trainer.dataloader_train))
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 1 and trainer.grad_scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())  # no step taken
    trainer.grad_scaler = torch.amp.GradScaler("cpu")  # the default scale: finite gradients
    trainer.train_step(images, labels)
    assert trainer.skipped_steps == 1
    assert not all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def test_a_checkpoint_of_the_old_precision_flags_resumes_under_the_new_one():
    from trainer import settings_differences

    old = dict(no_autocast=True, bfloat16=False, precision="float32", lr=0.05)
    assert settings_differences(old, dict(precision="float16", lr=0.05)) == []
    assert settings_differences(old, dict(precision="float16", lr=0.1)) == [("lr", 0.05, 0.1)]


def test_the_cpu_flags_are_read_from_proc_cpuinfo_where_linux_has_it():
    flags_ = utils.cpu_flags()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here")
    assert "fpu" in flags_ or "fp" in flags_ or flags_ == set()  # x86 lists fpu; some ARM kernels list no flags


def test_bfloat16_on_the_cpu_trains_with_float32_weights_and_says_so(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)
    seen = record_forward_precision(monkeypatch)
    trainer = task2.main(["--data-dir", str(pickled_dir), "--epochs", "1", "--device", "cpu", "--bfloat16"])
    assert set(seen) == {torch.bfloat16} and trainer.settings["precision"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    results = json.loads((tmp_path / "results/task2.json").read_text())
    assert results["settings"]["precision"] == "bfloat16" and results["final"]["test_accuracy"] > 0.1
    assert all(isinstance(v, float) for v in results["train_history"]["loss"].values())
