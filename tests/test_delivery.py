"""task1.py's answers, create_submission_zip.py, every script's --help, and every script from the command line."""
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import create_submission_zip
import task1
import task4a
import utils

REPO = Path(__file__).resolve().parent.parent


def reference_convolution(image, kernel, mode):
    """Independent of task1: flip the kernel once, then slide it (correlation) over the padded image."""
    flipped = kernel[::-1, ::-1]
    padded = np.pad(image, 1, mode=mode)
    return np.array([[np.sum(padded[i:i + 3, j:j + 3] * flipped) for j in range(image.shape[1])]
                     for i in range(image.shape[0])])


def test_task1a_matches_an_independent_convolution():
    for mode in ("constant", "reflect"):
        expected = reference_convolution(task1.IMAGE, task1.SOBEL, mode)
        assert np.array_equal(task1.convolve(task1.IMAGE, task1.SOBEL, mode), expected)
        assert np.array_equal(task1.convolve_with_torch(task1.IMAGE, task1.SOBEL, mode), expected)
    zero = task1.convolve(task1.IMAGE, task1.SOBEL, "constant")
    # By hand at the top-left corner, zeros outside: the flipped kernel's right column (-1, -2, -1)
    # meets (0, 0, 2) and its left column meets zeros: -1*0 - 2*0 - 1*2 = -2.
    assert zero[0, 0] == -2 and zero[1, 4] == 18 and zero.shape == (3, 5)
    assert not np.array_equal(zero, reference_convolution(task1.IMAGE, task1.SOBEL[::-1, ::-1], "constant"))


def test_task1_answers_and_their_printout(tmp_path, capsys):
    results = task1.main(["--output", str(tmp_path / "task1.md")])
    assert results["1b"][0] == "max pooling"
    assert results["1c"][0].startswith("2 ") and results["1d"][0] == "9x9"
    assert results["1e"][0] == "252x252" and results["1f"][0] == "250x250"
    assert results["1g"][0] == "390,410 parameters"
    changes = task1.translation_sensitivity()
    assert changes["max pooling (2x2, stride 2)"] < min(changes["convolution (3x3)"], changes["activation (ReLU)"])
    out = capsys.readouterr().out
    zero = reference_convolution(task1.IMAGE, task1.SOBEL, "constant")
    zero_rows = [" ".join(f"{v:4d}" for v in row) for row in zero]
    assert all(row in out for row in zero_rows)
    markdown = (tmp_path / "task1.md").read_text()
    assert "### Task 1g" in markdown and "390,410" in markdown and zero_rows[0] in markdown


def test_a_zip_missing_a_module_is_caught(tmp_path):
    source = tmp_path / "code"
    source.mkdir()
    for name in ("utils.py", "task2.py", "trainer.py"):  # task2 also needs dataloaders.py
        shutil.copy(REPO / name, source / name)
    files = create_submission_zip.source_files(source)
    data = create_submission_zip.zip_bytes(source, files)
    # a complete zip passes: the smoke pass
    assert create_submission_zip.check_zip(io.BytesIO(data)) == ("dataloaders", "task2")


def test_zip_never_asks_without_a_terminal_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assignment_code.zip").write_bytes(b"an older zip")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    monkeypatch.setattr(create_submission_zip, "check_zip", lambda path: ("dataloaders", "task2"))
    with pytest.raises(utils.UserError, match="lack dataloaders, which task2.py imports"):
        create_submission_zip.main([])
    monkeypatch.setattr(create_submission_zip, "check_zip", lambda path: ("fpdf", "report"))
    with pytest.raises(utils.UserError, match="needs the package 'fpdf', which is not installed"):
        create_submission_zip.main([])
    assert (tmp_path / "assignment_code.zip").read_bytes() == b"an older zip"
    assert [p.name for p in tmp_path.iterdir()] == ["assignment_code.zip"]


@pytest.mark.parametrize("script", ["task2", "task3", "task4a", "task4b", "benchmark", "report",
                                    "create_submission_zip"])
def test_help_states_every_default_and_no_none(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage:" in text
    assert "(default: " in text and "(default: None)" not in text  # a flag without a default says what then


SCRIPTS = ["task1", "task2", "task3", "task4a", "task4b", "report", "create_submission_zip"]


def help_flags(script, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out)) - {"--help"}


def readme_flags(text):
    """Every flag the text names in backticks; `--[no-]x` names --x and --no-x."""
    flags = set()
    for flag in re.findall(r"`(--(?:\[no-\])?[a-z][a-z0-9-]*)", text):
        flags |= {flag.replace("[no-]", ""), flag.replace("[no-]", "no-")} if "[no-]" in flag else {flag}
    return flags - {"--help"}


def test_the_readme_names_each_scripts_flags_as_its_help_does(capsys):
    readme = (REPO / "README.md").read_text()
    slurm = readme[readme.index("## On a Slurm cluster"):readme.index("## Further reading")]
    readme = readme.replace(slurm, "")  # that section names sbatch's own flags (--signal, --dependency)
    helps = {script: help_flags(script, capsys) for script in SCRIPTS}
    named = readme_flags(readme)
    assert named <= set().union(*helps.values()), named - set().union(*helps.values())  # no flag that is not
    assert set().union(*helps.values()) <= named, set().union(*helps.values()) - named  # every flag explained
    shared = readme_flags(readme[readme.index("## Flags of the training scripts"):readme.index("## Task 1")])
    for script in ("task2", "task3", "task4a"):
        assert shared <= helps[script], (script, shared - helps[script])
    assert helps["task1"] == {"--output"}


def test_every_script_runs_from_the_command_line_as_a_student_runs_it(tmp_path, pickled_dir):
    """The smoke pass: each script as `python <script> ...`, in an interpreter of its own (task2.py and task3.py run
    so in test_resume, stopped by signals and resumed); the report last."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(
        tmp_path / "zebra.jpg")
    # A Task 4a model to look into, as task4a.py saves it (a run of it is test_task4's and test_reproduce's).
    utils.save_checkpoint({"model": task4a.TransferResNet18(num_classes=10).state_dict()},
                          tmp_path / "checkpoints/task4a/best.ckpt")
    env = dict(os.environ, MPLBACKEND="Agg")

    def run(command):
        done = subprocess.run([sys.executable, str(REPO / command[0]), *command[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr)
        return done

    # Side by side: most of each command is its interpreter importing torch.
    lanes = [[["task1.py"], ["task4a.py", "--data-dir", str(pickled_dir), "--device", "cpu", "--epochs", "1",
                             "--no-pretrained", "--image-size", "32", "--batch-size", "128"]],
             [["task4b.py", "--image", "zebra.jpg", "--device", "cpu"],
              ["benchmark.py", "--data-dir", str(pickled_dir), "--device", "cpu", "--models", "task2", "--levers",
               "channels_last", "--steps", "1", "--warmup-steps", "1", "--repeats", "1", "--pipeline-batches", "1",
               "--full-run-epochs", "1", "--workers", "0", "--out", "benchmark.md"]],
             [["create_submission_zip.py", "--yes"]]]
    with ThreadPoolExecutor(len(lanes)) as pool:
        list(pool.map(lambda lane: [run(command) for command in lane], lanes))
    report = run(["report.py"])
    assert "pages)" in report.stdout
    for made in ("results/task1.md", "results/task4a.json", "plots/task4b.png", "plots/task4c.png", "benchmark.md",
                 "assignment_code.zip", "report/report.pdf"):
        assert (tmp_path / made).is_file(), made

    # The zip holds the project's sources, made where the runs' outputs lie, and nothing from any run.
    names = set(zipfile.ZipFile(tmp_path / "assignment_code.zip").namelist())
    expected = {"dataloaders.py", "trainer.py", "utils.py", "task1.py", "task2.py", "task3.py", "task4a.py",
                "task4b.py", "optim.py", "report.py", "create_submission_zip.py", "benchmark.py", "requirements.txt",
                "README.md", "tests/conftest.py", "pyproject.toml", "slurm/job.sh", "slurm/task3.sbatch"}
    assert expected <= names and names == {p.as_posix() for p in create_submission_zip.source_files(REPO)}
    assert not any(name.split("/")[0] in ("data", "checkpoints", "results", "plots", ".venv", "report", "logs")
                   or name.endswith((".pt", ".ckpt", ".png", ".pyc", ".zip")) for name in names)
