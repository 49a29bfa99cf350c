"""colab.ipynb executed headless, top to bottom, by a real Jupyter kernel on the tiny data, with its settings
overridden as papermill injects parameters; a runtime reset (the kernel and what it started, killed) during the
Task 3 cell; and the notebook executed again, as "Run all" after a reset: it resumes, and ends as an uninterrupted
run would, to the bit.

Colab itself cannot be reached here: a stand-in `google.colab` (importable only by the kernel of these tests)
records what the notebook asks of Drive and of the browser, and plays the uploads a student would make."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from PIL import Image

import create_submission_zip
from test_resume import assert_same, outcome

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colab.ipynb"

# google/colab/__init__.py for the kernel: drive.mount, drive.flush_and_unmount, files.upload, files.download.
STAND_IN = '''
import json, os, pathlib

def _record(call, *args):
    with open(os.environ["COLAB_STAND_IN_LOG"], "a") as log:
        log.write(json.dumps([call, *args]) + "\\n")

class drive:
    @staticmethod
    def mount(mountpoint):
        _record("drive.mount", mountpoint)

    @staticmethod
    def flush_and_unmount():
        _record("drive.flush_and_unmount")

class files:
    @staticmethod
    def upload():  # the next of the files the test laid out to be uploaded, in the order of their names
        queue = pathlib.Path(os.environ["COLAB_STAND_IN_UPLOADS"])
        path = sorted(queue.iterdir())[0]
        name, data = path.name.split("-", 1)[1], path.read_bytes()
        path.unlink()
        _record("files.upload", name)
        return {name: data}

    @staticmethod
    def download(path):
        _record("files.download", str(pathlib.Path(path).resolve()), pathlib.Path(path).is_file())
'''


def test_the_committed_notebook_carries_no_outputs_and_no_execution_counts():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells) == 1


def with_parameters(parameters):
    """The notebook with a cell of `parameters` after its cell tagged "parameters", as papermill injects them."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{key} = {value!r}" for key, value in parameters.items()),
                                         metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)
    return notebook


def cell_output(cell):
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def cell_seconds(cell):
    """The seconds a cell took, from the timestamps nbclient records."""
    from datetime import datetime

    timing = cell.metadata["execution"]
    start, end = (datetime.fromisoformat(timing[key].replace("Z", "+00:00"))
                  for key in ("iopub.execute_input", "shell.execute_reply"))
    return (end - start).total_seconds()


@pytest.fixture
def colab_runtime(tmp_path, monkeypatch, pickled_dir):
    """A 'runtime': the stand-in google.colab on the kernel's path alone, the uploads a student would make (the
    code as assignment_code.zip, then zebra.jpg), CIFAR-10 on the 'local disk', weights for Task 4a."""
    stand_in = tmp_path / "stand_in" / "google" / "colab"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(STAND_IN)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = create_submission_zip.source_files(ROOT)
    (uploads / "1-assignment_code.zip").write_bytes(create_submission_zip.zip_bytes(ROOT, files))
    zebra = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 200, 60)).save(zebra, format="JPEG")
    (uploads / "2-zebra.jpg").write_bytes(zebra.getvalue())
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    shutil.copytree(pickled_dir, tmp_path / "local_disk" / "cifar10")
    log = tmp_path / "colab_calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "stand_in"),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("COLAB_STAND_IN_LOG", str(log))
    monkeypatch.setenv("COLAB_STAND_IN_UPLOADS", str(uploads))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    flags = ["--device", "cpu", "--epochs", "2", "--batch-size", "64", "--validations-per-epoch", "1"]
    parameters = dict(DRIVE=str(tmp_path / "drive"), PROJECT=str(tmp_path / "drive" / "project"),
                      DATA=str(tmp_path / "local_disk" / "cifar10"), SEEDS=[0], ABLATIONS=["lookahead"],
                      EXTRA_FLAGS=flags, TASK4A_FLAGS=["--weights", str(tmp_path / "resnet18.pth"), "--image-size",
                                                       "32"])
    return dict(root=tmp_path, log=log, parameters=parameters, flags=flags)


def execute(notebook, cwd, kill_when=None):
    """Run every cell in a new kernel; with kill_when (a path), SIGKILL the kernel and every process it started as
    soon as that file exists, as a runtime reset ends them -> the executed notebook."""
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    if kill_when is None:
        return client.execute()
    died = []

    def run():
        try:
            client.execute()
        except DeadKernelError:
            died.append(True)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not kill_when.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert kill_when.exists(), "the notebook never reached the Task 3 cell's first checkpoint"
    os.killpg(os.getpgid(client.km.provisioner.process.pid), signal.SIGKILL)  # the kernel and its children
    thread.join(timeout=120)
    assert died, "the kernel was not killed"
    return notebook


def test_the_notebook_runs_to_the_hand_in_and_a_reset_mid_task3_costs_only_the_lost_minutes(colab_runtime):
    root, parameters = colab_runtime["root"], colab_runtime["parameters"]
    project = Path(parameters["PROJECT"])
    vgg_checkpoint = project / "checkpoints" / "task3_vgg_seed0" / "last.ckpt"
    execute(with_parameters(parameters), root, kill_when=vgg_checkpoint)
    assert not (project / "results" / "task3_vgg_seed0.json").exists()  # killed mid-run

    done = execute(with_parameters(parameters), root)  # "Run all" after the reset
    cells = {cell.source.split("#")[0].strip(): cell for cell in done.cells if cell.cell_type == "code"}
    task2 = cells['if "task2" in STEPS:']
    assert "task2: finished already" in cell_output(task2) and cell_seconds(task2) < 30
    task3 = cell_output(cells['if "task3" in STEPS:'])
    assert "task3_vgg_seed0: resuming at step" in task3 and "| vgg | 0 |" in task3
    assert "epoch" in task3 and "\r" not in task3  # a line per validation, no progress bars
    for made in ("results/task1.md", "results/task2.json", "plots/task2_plot.png", "results/task3_summary.md",
                 "results/task3_ablation_lookahead.json", "plots/task3_ablation_lookahead.png", "results/task4a.json",
                 "plots/task4b.png", "plots/task4c.png", "report/report.pdf", "report/answers.md",
                 "assignment_code.zip"):
        assert (project / made).is_file(), made
    images = [output for cell in done.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) >= 6  # the plots shown inline

    # The run the reset cut off ends as the same command, uninterrupted, ends it.
    reference = root / "reference"
    reference.mkdir()
    command = [sys.executable, str(ROOT / "task3.py"), "--model", "vgg", "--seeds", "0", "--data-dir",
               parameters["DATA"], "--resume", "auto", "--checkpoint-every", "3", *colab_runtime["flags"]]
    assert subprocess.run(command, cwd=reference, capture_output=True).returncode == 0
    assert_same(outcome(project, "task3_vgg_seed0"), outcome(reference, "task3_vgg_seed0"))

    calls = [json.loads(line) for line in colab_runtime["log"].read_text().splitlines()]
    assert calls.count(["drive.mount", parameters["DRIVE"]]) == 2  # once per execution
    assert ["files.upload", "assignment_code.zip"] in calls and ["files.upload", "zebra.jpg"] in calls
    assert calls.count(["files.upload", "assignment_code.zip"]) == 1  # the code is fetched once, then on Drive
    downloads = [call[1:] for call in calls if call[0] == "files.download"]
    assert downloads == [[str(project / "report" / "report.pdf"), True], [str(project / "assignment_code.zip"), True]]
    assert calls[-1] == ["drive.flush_and_unmount"]


def test_only_the_requirements_this_python_lacks_are_installed(tmp_path):
    import colab

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.0  # installed\nnumpy<1.0\ntorch>=2.4,<3\nno-such-package-here>=1\n\n")
    assert colab.missing_requirements(requirements) == ["numpy<1.0", "no-such-package-here>=1"]


def test_the_data_is_copied_to_the_runtimes_disk_from_an_archive_on_drive(tmp_path, pickled_dir):
    import tarfile

    import colab
    import dataloaders

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # as the original: the batches in cifar-10-batches-py/
        tar.add(pickled_dir / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    target = colab.put_data(tmp_path / "local" / "cifar10", archive)
    assert len(dataloaders.read_cifar10(target)[1]) == 400
    assert colab.put_data(target, archive) == target  # there already: nothing copied
    with pytest.raises(colab.StepFailed, match="DATA_ON_DRIVE: no file or folder") as error:
        colab.put_data(tmp_path / "elsewhere", tmp_path / "missing.tar.gz")
    assert error.value._render_traceback_() == [f"StepFailed: {error.value}"]  # IPython shows this line alone


def test_progress_bars_in_a_jupyter_kernel_not_in_a_process_that_imported_one(tmp_path):
    import ipykernel  # noqa: F401  (as jupyter_client imports it to find its kernels)

    import trainer

    assert not trainer.progress_bars_wanted()  # pytest's stderr is no terminal
    cell = nbformat.v4.new_code_cell(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                                     "import trainer; print(trainer.progress_bars_wanted())")
    done = execute(nbformat.v4.new_notebook(cells=[cell]), tmp_path)
    assert cell_output(done.cells[0]).strip() == "True"


def test_a_steps_progress_bar_is_shown_now_and_then_not_as_a_scroll(tmp_path, capsys):
    import colab

    child = tmp_path / "child.py"
    child.write_text("import sys, time\n"
                     "for i in range(200):\n"
                     "    sys.stdout.write(f'download {i}%\\r'); sys.stdout.flush()\n"
                     "print('validation line'); print('done')\n")
    colab.run(str(child), progress_every_s=3600)
    out = capsys.readouterr().out.splitlines()
    assert out[1:4] == ["download 0%", "validation line", "done"] and "\r" not in "".join(out), out
    child.write_text("import sys; print('the last line'); sys.exit(3)\n")
    with pytest.raises(colab.StepFailed, match="ended with exit status 3"):
        colab.run(str(child))
