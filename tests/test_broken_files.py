"""Every file the project reads, broken the ways files break: one line naming it, no traceback, nothing lost.

Each kind of file is one entry of KINDS: how to lay out a folder with a good copy of it, which file to break,
the command that reads it, and what the user should then get. The ways of breaking are BREAKS. Each command
runs as its script's command line does (conftest.run_script: run_cli around main, its exit status and output),
inside the test process.
"""
import hashlib
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script

BREAKS = {
    "empty": lambda good: b"",
    "cut short": lambda good: good[:200],  # a copy stopped by a full disk or a killed scp
    "random bytes": lambda good: random.Random(0).randbytes(1000),
}


def tiny_image(path, size=32):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def image_folders(root, data):
    """The image-folder layout of the tiny data set (a class folder each split)."""
    for split in ("train", "test"):
        shutil.copytree(data["folders"] / split, root / "data" / split)
    return root / "data" / "train" / "airplane" / "0003.png"


def pickled_batches(root, data):
    shutil.copytree(data["pickled"], root / "data")
    return root / "data" / "cifar-10-batches-py" / "data_batch_3"


def decoded_cache(root, data):
    image_folders(root, data)
    cache = root / "data" / "cifar10-uint8-cache.pt"
    shutil.copy(data["cache"], cache)
    return cache


def checkpoint(root, data):
    pickled_batches(root, data)
    shutil.copytree(data["checkpoints"], root / "checkpoints")
    return root / "checkpoints" / "task2" / "last.ckpt"


def results_file(root, data):
    shutil.copytree(data["results"], root / "results")
    return root / "results" / "task2.json"


def weights(root, data):
    path = root / "resnet18.pth"
    torch.save(data["weights"], path)
    return path


def image(root, data):
    path = root / "zebra.jpg"
    tiny_image(path, 64)
    return path


def task4a_checkpoint(root, data):
    image(root, data)
    path = root / "best.ckpt"
    torch.save(dict(model={}), path)
    return path


DATA = ["--data-dir", "data", "--device", "cpu", "--epochs", "1", "--batch-size", "50"]
# kind: (lay out a folder -> the file to break, the command, what the user gets: "error" (exit 1 and one line
# naming the file) or "note" (a line naming the file, and the command goes on))
KINDS = {
    "image in the folders": (image_folders, ["task2.py", *DATA], "error"),
    "pickled batch": (pickled_batches, ["task2.py", *DATA], "error"),
    "decoded-image cache": (decoded_cache, ["task2.py", *DATA], "rebuilt"),
    "checkpoint (--resume)": (checkpoint, ["task2.py", *DATA, "--resume"], "error"),
    "results file (report.py)": (results_file, ["report.py"], "note"),
    "--weights": (weights, ["task4a.py", *DATA, "--weights", "resnet18.pth"], "error"),
    "--image": (image, ["task4b.py", "--image", "zebra.jpg", "--weights", "none.pth"], "error"),
    "--checkpoint (task4b.py)": (task4a_checkpoint, ["task4b.py", "--image", "zebra.jpg", "--checkpoint", "best.ckpt"],
                                 "error"),
}


@pytest.fixture(scope="session")
def good_files(tmp_path_factory, pickled_dir, folder_dir):
    """Good copies of every kind, made once: a real cache, checkpoint and results file from a tiny run."""
    root = tmp_path_factory.mktemp("good")
    run = root / "run"
    shutil.copytree(pickled_dir, run / "data")
    done = run_script(["task2.py", *DATA], cwd=run)
    assert done.returncode == 0, done.stderr
    folders = root / "folders"
    for split in ("train", "test"):
        shutil.copytree(folder_dir / split, folders / split)
    import dataloaders

    dataloaders.read_image_folder(folders)  # writes its cache
    return dict(pickled=pickled_dir, folders=folders, cache=folders / dataloaders.CACHE_NAME,
                checkpoints=run / "checkpoints", results=run / "results",
                weights={k: v.clone() for k, v in __import__("torchvision").models.resnet18().state_dict().items()})


def snapshot(root, leave_out):
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*")
            if path.is_file() and path != leave_out}


@pytest.mark.parametrize("way", BREAKS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_file_gets_one_line_naming_it_and_nothing_is_lost(tmp_path, good_files, kind, way):
    lay_out, command, _ = KINDS[kind]
    broken = lay_out(tmp_path, good_files)
    broken.write_bytes(BREAKS[way](broken.read_bytes()))
    root, before = tmp_path, snapshot(tmp_path, broken)
    done = run_script(command, cwd=tmp_path)
    outcome = KINDS[kind][2]
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    name = str(broken.relative_to(root))
    if outcome == "error":
        assert done.returncode == 1, output
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], done.stderr
    else:
        assert done.returncode == 0, output
        assert any(name in line for line in done.stdout.splitlines()), done.stdout
    after = snapshot(root, broken)
    assert all(after.get(path) == digest for path, digest in before.items()), "a saved file changed or went"
    if outcome == "rebuilt":
        assert torch.load(broken, weights_only=True)["train_images"].shape[1:] == (3, 32, 32)
