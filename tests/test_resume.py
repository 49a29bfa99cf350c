"""Interrupted runs resume exactly: SIGKILL, SIGINT and SIGTERM mid-run, then --resume, end as if never stopped.

The runs that are stopped are real processes, sent real signals; the runs that resume them, and those that need
no signal, run their command line inside the test process (conftest.run_script)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import task2
import task3
import utils
from conftest import run_script
from optim import Lookahead
from test_trainer import make_loaders, small_model
from trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

# Runs a task script's command line in a fresh process; with KILL_AT_STEP=N it sends itself KILL_SIGNAL
# once optimisation step N has been computed (of the run named KILL_RUN, if set), as a scheduler or
# Ctrl-C would at a moment of their choosing.
RUNNER = f"""
import os, runpy, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import trainer

kill_at, kill_signal = int(os.environ.get("KILL_AT_STEP", 0)), os.environ.get("KILL_SIGNAL", "SIGINT")
kill_run = os.environ.get("KILL_RUN", "")
train_step = trainer.Trainer.train_step

def train_step_then_signal(self, images, labels):
    result = train_step(self, images, labels)
    if self.global_step + 1 == kill_at and self.name.startswith(kill_run):
        os.kill(os.getpid(), getattr(signal, kill_signal))
    return result

trainer.Trainer.train_step = train_step_then_signal
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join({str(ROOT)!r}, sys.argv[0]), run_name="__main__")  # as `python task2.py ...` runs it
"""


def run(cwd, argv, kill_at=0, kill_signal="SIGINT", kill_run=""):
    env = dict(os.environ, KILL_AT_STEP=str(kill_at), KILL_SIGNAL=kill_signal, KILL_RUN=kill_run, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def outcome(cwd, name):
    """Everything a run leaves that must not depend on interruptions: results (less timings) and checkpoints."""
    results = json.loads((cwd / f"results/{name}.json").read_text())
    for key in ("wall_time_s", "train_time_s", "command"):
        results.pop(key)
    checkpoints = {}
    for file in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(cwd / f"checkpoints/{name}/{file}", weights_only=True)
        checkpoint.pop("train_time_s")
        checkpoints[file] = checkpoint
    return results, checkpoints


def assert_same(a, b, where=""):
    """Nested dicts, lists and tensors equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


TASK2 = ["task2.py", "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--deterministic"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pickled_dir):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    done = run_script([*TASK2, "--data-dir", str(pickled_dir)], cwd)
    assert done.returncode == 0, done.stderr
    return outcome(cwd, "task2")


@pytest.mark.parametrize("kill_signal, kill_at, code", [
    ("SIGKILL", 8, -signal.SIGKILL),  # after the first validation (step 6): resumes from that checkpoint
    ("SIGINT", 15, 130),  # mid-epoch: checkpoints at step 15 and resumes there
    ("SIGTERM", 28, 143),
])
def test_an_interrupted_task2_run_resumes_to_identical_results(tmp_path, pickled_dir, uninterrupted,
                                                                kill_signal, kill_at, code):
    argv = [*TASK2, "--data-dir", str(pickled_dir)]
    stopped = run(tmp_path, argv, kill_at, kill_signal)
    assert stopped.returncode == code, stopped.stderr
    last = torch.load(tmp_path / "checkpoints/task2/last.ckpt", weights_only=True)
    if kill_signal == "SIGKILL":
        assert last["global_step"] == 6 and not (tmp_path / "results/task2.json").exists()
    else:  # saved at the step it stopped, and one line says how to go on
        assert last["global_step"] == kill_at and last["train_loader"]["epoch"] == kill_at // 11  # mid-epoch
        message = stopped.stderr.strip().splitlines()[-1]
        assert message.startswith(f"{kill_signal} at step {kill_at} (epoch ")
        assert message.endswith(f"resume with: python {' '.join([str(ROOT / argv[0]), *argv[1:]])} --resume")
    resumed = run_script([*argv, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {last['global_step']}" in resumed.stdout
    assert_same(outcome(tmp_path, "task2"), uninterrupted)


def test_a_finished_run_resumed_changes_nothing(tmp_path, pickled_dir):
    argv = [*TASK2, "--epochs", "1", "--data-dir", str(pickled_dir)]
    assert run_script(argv, tmp_path).returncode == 0
    files = [tmp_path / "results/task2.json", tmp_path / "checkpoints/task2/last.ckpt",
             tmp_path / "checkpoints/task2/best.ckpt"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    again = run_script([*argv, "--resume"], tmp_path)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before


def test_resume_refuses_changed_settings_and_names_them(tmp_path, monkeypatch, pickled_dir, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(pickled_dir), "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
    task2.main(argv)
    with pytest.raises(utils.UserError) as error:
        task2.main([*argv[:-4], "--batch-size", "32", "--lr", "0.01", "--device", "cpu", "--resume"])
    message = str(error.value)
    assert "batch_size 64 in the checkpoint, 32 now" in message
    assert "learning_rate 0.05 in the checkpoint, 0.01 now" in message
    assert "\n" not in message and "epochs" not in message
    # Where and how fast may change: another checkpoint interval, --show, channels-last.
    task2.main([*argv, "--resume", "--checkpoint-every", "1", "--no-channels-last"])
    assert "finished already" in capsys.readouterr().out


def test_resume_with_nothing_to_resume_names_the_checkpoint(tmp_path, pickled_dir):
    done = run_script(["task2.py", "--data-dir", str(pickled_dir), "--resume"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: --resume: nothing to resume at 'checkpoints/task2/last.ckpt'; "
                                   "leave out --resume to start the run")
    assert not any(tmp_path.iterdir())  # nothing made
    done = run_script(["task3.py", "--data-dir", str(pickled_dir), "--resume", "--seeds", "0", "1"], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "nothing to resume at 'checkpoints/task3_vgg_seed0/last.ckpt'" in done.stderr


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler during the test, whatever the test runner inherited (a shell starts its
    background jobs with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_lookahead_scheduler_and_augmentation_resume_exactly_in_process(tmp_path, python_ctrl_c):
    """A Trainer stopped by SIGINT mid-epoch and rebuilt from nothing continues bit for bit."""

    def build(folder, resume=False):
        torch.manual_seed(0)
        loaders = make_loaders(n_train=96, seed=1)
        loaders[0].augment, loaders[0].crop_padding, loaders[0].flip = True, 2, "alternate"
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        return Trainer(16, 0.05, 10, 4, model, loaders, optimizer=optimizer, scheduler=scheduler,
                       lookahead=Lookahead(total_steps=24, start_step=3, every=2), device=torch.device("cpu"),
                       checkpoint_dir=folder / "checkpoints", results_dir=folder / "results", name="t",
                       resume=resume)

    whole = build(tmp_path / "whole")
    whole.train()
    stopped = build(tmp_path / "stopped")
    train_step = stopped.train_step

    def step_then_ctrl_c(images, labels):
        result = train_step(images, labels)
        if stopped.global_step + 1 == 10:  # step 10 of 24: epoch 2, its 4th step
            os.kill(os.getpid(), signal.SIGINT)
        return result

    stopped.train_step = step_then_ctrl_c
    with pytest.raises(utils.TrainingInterrupted):
        stopped.train()
    resumed = build(tmp_path / "stopped", resume=True)
    resumed.train()
    assert resumed.final == whole.final and resumed.train_history == whole.train_history
    assert resumed.validation_history == whole.validation_history
    assert_same(resumed.lookahead.average, whole.lookahead.average)
    assert_same(resumed.model.state_dict(), whole.model.state_dict())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_checkpoints_come_every_few_minutes_between_validations(tmp_path, monkeypatch):
    saves = []
    clock = iter(range(0, 10_000, 100))  # each reading of the clock: 100 s later
    monkeypatch.setattr("trainer.time.perf_counter", lambda: next(clock))
    trainer = Trainer(16, 0.05, 10, 1, small_model(), make_loaders(n_train=160), device=torch.device("cpu"),
                      checkpoint_dir=tmp_path / "c", results_dir=tmp_path / "r", validations_per_epoch=1,
                      checkpoint_every_s=250)
    monkeypatch.setattr(trainer, "save_run_state", lambda filename: saves.append((filename, trainer.global_step)))
    monkeypatch.setattr(trainer, "load_best_model", lambda: None)
    trainer.train()
    last = [step for filename, step in saves if filename == "last.ckpt"]
    assert last[:3] == [3, 6, 9] and last[-2:] == [10, 10]  # every third step (300 s), the validation, the end


def test_task3_resumes_the_interrupted_seed_and_skips_the_finished_one(tmp_path, pickled_dir):
    argv = ["task3.py", "--data-dir", str(pickled_dir), "--model", "resnet", "--epochs", "2", "--batch-size", "64",
            "--seeds", "0", "1", "--device", "cpu"]
    stopped = run(tmp_path, argv, kill_at=8, kill_signal="SIGTERM", kill_run="task3_resnet_seed1")  # seed 0 finished
    assert stopped.returncode == 143
    finished = (tmp_path / "results/task3_resnet_seed0.json").read_bytes()
    resumed = run_script([*argv, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "task3_resnet_seed0: finished already" in resumed.stdout and "resuming at step 8" in resumed.stdout
    assert (tmp_path / "results/task3_resnet_seed0.json").read_bytes() == finished
    assert "| resnet | 0, 1 |" in (tmp_path / "results/task3_summary.md").read_text()


def test_task3_trains_on_a_dataset_smaller_than_one_batch(tmp_path, monkeypatch, pickled_dir):
    monkeypatch.chdir(tmp_path)
    task3.main(["--data-dir", str(pickled_dir), "--model", "resnet", "--epochs", "1", "--batch-size", "1024",
                "--device", "cpu"])
    run_ = json.loads((tmp_path / "results/task3_resnet_seed0.json").read_text())
    assert run_["steps"] == 1 and run_["steps_per_epoch"] == 1 and run_["dataset_sizes"]["train"] == 360


def test_resume_auto_starts_continues_and_then_leaves_a_finished_run_alone(tmp_path, monkeypatch, pickled_dir, capsys,
                                                                          python_ctrl_c):
    """--resume auto, a requeued batch job's command: the same command starts, continues and skips."""
    argv = ["--data-dir", str(pickled_dir), "--epochs", "2", "--batch-size", "32", "--device", "cpu",
            "--deterministic", "--resume", "auto"]
    for folder in ("straight", "stopped"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    task2.main(argv)  # nothing to resume: it starts
    straight = outcome(tmp_path / "straight", "task2")

    monkeypatch.chdir(tmp_path / "stopped")
    train_step = Trainer.train_step

    def step_then_ctrl_c(self, images, labels):
        result = train_step(self, images, labels)
        if self.global_step + 1 == 15:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    with pytest.raises(utils.TrainingInterrupted):
        task2.main(argv)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    task2.main(argv)  # a checkpoint: it continues
    assert "task2: resuming at step 15" in capsys.readouterr().out
    assert_same(outcome(tmp_path / "stopped", "task2"), straight)

    files = [Path("results/task2.json"), Path("checkpoints/task2/last.ckpt"), Path("checkpoints/task2/best.ckpt")]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    trainer = task2.main(argv)  # finished: nothing changes, and the plot is drawn from the results' histories
    assert "task2: finished already" in capsys.readouterr().out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before
    assert trainer.train_history["loss"] and trainer.best_step == json.loads(files[0].read_text())["best_step"]

    with pytest.raises(utils.UserError) as error:  # a run of other settings: refused as plain --resume refuses it
        task2.main([*argv, "--lr", "0.01"])
    assert "learning_rate 0.05 in the checkpoint, 0.01 now" in str(error.value)


@pytest.mark.parametrize("folder", ["results", "checkpoints", "plots"])
def test_a_read_only_folder_is_one_line_naming_it(tmp_path, monkeypatch, pickled_dir, capsys, folder):
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).mkdir()
    with read_only(tmp_path / folder):
        argv = ["task2.py", "--data-dir", str(pickled_dir), "--epochs", "1", "--device", "cpu"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            utils.run_cli(task2.main)
    message = str(exit_.value.code)
    assert message.startswith("error: cannot write '") and folder in message and "\n" not in message, message
    if folder != "plots":  # refused before any training
        assert not (tmp_path / "results/task2.json").exists() and "epoch" not in capsys.readouterr().out


class read_only:
    """A folder no one may write in while the block runs, root included: chmod for a user, the immutable
    attribute (chattr +i) for root, whom permissions do not stop."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(self.folder)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make a folder read-only for root here: {done.stderr.decode().strip()}")
        else:
            self.folder.chmod(0o555)
        return self.folder

    def __exit__(self, *exception):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(self.folder)], check=True)
        else:
            self.folder.chmod(0o755)
