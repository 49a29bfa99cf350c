"""Tiny CIFAR-shaped datasets written in the real file layouts, so the real loading code runs; and a script's
command line run inside the test process."""
import contextlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripts live in the repo root
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # The workers share the cores: torch's threads (it reads this at its import, later) and those of the scripts the
    # tests start are split among them, rather than each worker taking every core.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(per_class, seed):
    """Learnable images sorted by class: uint8 [N,32,32,3] (a colour and stripe pattern per class, plus noise),
    labels [N]."""
    palette = np.random.default_rng(0).integers(40, 216, size=(len(CLASSES), 3))  # the same in every split
    rng = np.random.default_rng(seed)
    rows = np.arange(32)[:, None]
    images, labels = [], []
    for label in range(len(CLASSES)):
        stripes = 40 * np.sin(rows * (label + 1) * np.pi / 16)  # [32,1], a different frequency per class
        for _ in range(per_class):
            noise = rng.normal(0, 20, size=(32, 32, 3))
            images.append(np.clip(palette[label] + stripes[..., None] + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_pickled_batches(root, train, test):
    """torchvision's layout: root/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    def batch(images, labels):  # the original stores rows of 3072 bytes: R plane, G plane, B plane
        return {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "labels": labels.tolist()}

    parts = np.array_split(np.arange(len(train[0])), 5)
    for i, part in enumerate(parts, start=1):
        dump(f"data_batch_{i}", batch(train[0][part], train[1][part]))
    dump("test_batch", batch(*test))
    dump("batches.meta", {"label_names": CLASSES})


def write_image_folder(root, train, test):
    """Image-folder layout: root/{train,test}/<class>/NNNN.png (PNG: lossless, so pixels are exact)."""
    for split, (images, labels) in (("train", train), ("test", test)):
        counts = {}
        for image, label in zip(images, labels, strict=True):
            folder = Path(root) / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            index = counts[label] = counts.get(label, -1) + 1
            Image.fromarray(image).save(folder / f"{index:04d}.png")


@pytest.fixture(scope="session")
def tiny_arrays():
    """(train images, labels), (test images, labels): 40 and 10 images per class."""
    return make_images(40, seed=1), make_images(10, seed=2)


@pytest.fixture(scope="session")
def pickled_dir(tmp_path_factory, tiny_arrays):
    root = tmp_path_factory.mktemp("pickled")
    write_pickled_batches(root, *tiny_arrays)
    return root


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory, tiny_arrays):
    root = tmp_path_factory.mktemp("folders")
    write_image_folder(root, *tiny_arrays)
    return root


@pytest.fixture
def offline(monkeypatch):
    """Every download fails at once, as on a machine without internet."""
    import urllib.error

    import torchvision

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)


TRAINING_SCRIPTS = {"task2", "task3", "task4a"}  # the scripts whose __main__ says run_cli(main, resumable=True)


def run_script(command, cwd):
    """`python <command>` from the folder `cwd`, as the script's `if __name__ == "__main__"` runs it (utils.run_cli
    around its main), but inside this process: no interpreter start, no second import of torch. -> a
    CompletedProcess with the exit status and what the script printed; an exception that escapes run_cli (one a
    user would see as a traceback) ends up as its traceback in stderr, with status 1."""
    import utils

    script, *argv = command
    main = importlib.import_module(Path(script).stem).main
    resumable = Path(script).stem in TRAINING_SCRIPTS
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    previous_argv, previous_cwd = sys.argv, os.getcwd()
    sys.argv = [script, *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                utils.run_cli(main, resumable)
                code = 0
            except SystemExit as exit_:  # as the interpreter ends on it: a message goes to stderr, status 1
                code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001  (whatever escapes is what the user would see)
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = previous_argv
        os.chdir(previous_cwd)
    return subprocess.CompletedProcess(command, code, *(stream.buffer.getvalue().decode() for stream in (out, err)))
