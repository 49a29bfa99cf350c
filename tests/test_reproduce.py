"""reproduce.py end to end on the tiny data and the CPU: every step but the test suite, each its first command
(--smoke), run inside this process (conftest.run_script) rather than one interpreter each."""
import json
import tarfile
from pathlib import Path

import pytest

import reproduce
import utils
from conftest import run_script


def in_this_process(argv, cwd, log):
    """reproduce.in_a_process's stand-in: `python <script> ...` run by conftest.run_script."""
    done = run_script([Path(argv[1]).name, *argv[2:]], cwd)
    log.write(done.stdout + done.stderr)
    return done.returncode


def test_reproduce_runs_each_step_once_records_it_and_packs_what_is_done(tmp_path, pickled_dir, capsys):
    argv = ["--smoke", "--data-dir", str(pickled_dir), "--skip", "tests", "--device", "cpu",
            "--output", str(tmp_path / "reproduce")]

    def options_fail(argv_, cwd, log):  # the step's first command (--smoke): task2.py --precision float32
        return 3 if "float32" in argv_ else in_this_process(argv_, cwd, log)

    with pytest.raises(utils.UserError, match="steps that failed: options"):
        reproduce.main(argv, run=options_fail)
    work = next(p for p in (tmp_path / "reproduce").iterdir() if p.is_dir())
    assert work.name.startswith("cpu-") and work.name.endswith("-smoke")
    manifest = json.loads((work / "manifest.json").read_text())
    assert {name: step["exit_status"] for name, step in manifest["steps"].items()} == dict(
        task2=0, task3=0, ablations=0, task4a=0, benchmark=0, options=3)

    capsys.readouterr()
    assert reproduce.main(argv, run=in_this_process) == work  # again: only the failed step runs
    out = capsys.readouterr().out
    assert out.count("done before") == 5 and "options: running" in out
    manifest = json.loads((work / "manifest.json").read_text())
    assert all(step["exit_status"] == 0 for step in manifest["steps"].values())
    assert manifest["device"].startswith("cpu") and manifest["smoke"] is True

    for made in ("task2/results/task2.json", "task3/results/task3_resnet_seed0.json", "task3/results/task3_summary.md",
                 "task3/results/task3_ablation_augmentation.json", "task4a_224/results/task4a.json",
                 "benchmark/benchmark.md", "options/task2_float32/results/task2.json", "logs/options.log"):
        assert (work / made).is_file(), made
    table = (work / "options.md").read_text()
    assert "| task2 | default | bfloat16 |" in table or "| task2 | default | float32 |" in table
    assert "| task2 | float32 | float32 |" in table and "| task3_resnet_seed0 | default |" in table
    with tarfile.open(work.with_suffix(".tar.gz")) as tar:
        names = tar.getnames()
    assert f"{work.name}/manifest.json" in names and f"{work.name}/task2/results/task2.json" in names
    assert not any("/checkpoints" in name for name in names)
