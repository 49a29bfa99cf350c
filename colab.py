"""What colab.ipynb's cells call once the code is on Drive: the missing requirements installed, CIFAR-10 put on the
runtime's own disk, each step of the README's table run as its command line with --resume auto, its plots and
tables shown in the notebook, and the hand-in downloaded.

Outside Colab (a Jupyter of one's own) the same cells run; only the download to the browser needs Colab's
`google.colab.files`, imported where it is used. Importing this module needs the standard library alone: the
requirements may not be installed yet.
"""
import importlib.metadata
import io
import math
import pathlib
import shlex
import shutil
import subprocess
import sys
import time


def missing_requirements(path="requirements.txt"):
    """The lines of a requirements file that the running Python does not satisfy (Colab has torch and most of the
    rest already: installing only these takes seconds, and leaves Colab's CUDA build of torch alone)."""
    from packaging.requirements import Requirement  # pip's own parser of requirement lines; every Colab has it

    missing = []
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def install_missing(path="requirements.txt"):
    """pip install the missing requirements, and say which (or that none were)."""
    missing = missing_requirements(path)
    if not missing:
        print("every requirement is installed already")
        return []
    print(f"installing {', '.join(missing)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    return missing


def put_data(target, source=""):
    """CIFAR-10 into `target` on the runtime's own disk, where thousands of small reads are fast (on Drive they are
    not). From `source` where given: torchvision's archive cifar-10-python.tar.gz, or a folder in either layout;
    else the first training step downloads it into `target`."""
    target = pathlib.Path(target)
    if target.is_dir() and any(target.iterdir()):
        print(f"CIFAR-10: '{target}' (there already)")
        return target
    if not source:
        print(f"CIFAR-10: the first training step downloads it into '{target}'")
        return target
    source = pathlib.Path(source)
    if not source.exists():
        raise StepFailed(f"DATA_ON_DRIVE: no file or folder '{source}'; correct the path in the settings cell, or "
                         f"set it to \"\" to download CIFAR-10")
    start = time.perf_counter()
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        import utils  # here: it needs the requirements, installed by now

        utils.unpack_archive(source, target)
    print(f"CIFAR-10: copied '{source}' to '{target}' in {time.perf_counter() - start:.0f} s")
    return target


class StepFailed(Exception):
    """A step's command failed; its own output, above, says why. Shown as this one line, not a traceback."""

    def _render_traceback_(self):  # IPython shows what this returns instead of the traceback
        return [f"{type(self).__name__}: {self}"]


def run(*argv, progress_every_s=10.0):
    """Run `python <argv>` in the project folder, each line of its output printed as it comes (it sees no
    terminal, so the training prints a line per validation instead of progress bars); a failure stops "Run all".
    What a child redraws in place with carriage returns (a download's progress bar) is shown once every
    `progress_every_s` seconds, not as a scroll of hundreds of lines."""
    print(f"$ {shlex.join(['python', *argv])}", flush=True)
    start, last_progress = time.perf_counter(), -math.inf
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # newline="": lines end at \n or \r, and keep their ending, so that a redrawn line can be told apart.
    for line in io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline=""):
        if line.endswith("\r"):
            if time.perf_counter() - last_progress < progress_every_s or not line.strip():
                continue
            last_progress = time.perf_counter()
        print(line.rstrip("\r\n"), flush=True)
    if process.wait() != 0:
        raise StepFailed(f"'{shlex.join(['python', *argv])}' ended with exit status {process.returncode}; its last "
                         f"lines, above, say why")
    print(f"({time.perf_counter() - start:.0f} s)")


def show(*paths):
    """Show the PNG figures and Markdown tables among `paths` that exist, in the cell's output."""
    from IPython.display import Image, Markdown, display

    for path in map(pathlib.Path, paths):
        if not path.is_file():
            continue
        print(path)
        display(Image(filename=str(path)) if path.suffix == ".png" else Markdown(path.read_text()))


def describe_runtime():
    """Print the device the steps will train on, its name and precision; warn on a CPU runtime."""
    import torch

    import utils

    device = utils.get_device()
    dtype = utils.autocast_dtype(device)
    precision = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} mixed precision" + (
        " with a gradient scaler" if dtype is torch.float16 else "")
    print(f"device: {utils.describe_device(device)}; the steps train in {precision}")
    if device.type == "cpu":
        print("warning: no GPU in this runtime: the steps will take hours. Runtime > Change runtime type > "
              "T4 GPU (or any GPU), then Runtime > Run all")
    return device


def download(*paths):
    """Send each file to the browser's downloads (they stay on Drive as well)."""
    from google.colab import files

    for path in paths:
        files.download(str(path))
