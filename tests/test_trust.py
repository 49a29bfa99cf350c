"""What the project does not trust (docs/design.md, "What the project trusts"): the files of a data folder are read
without running code, an image's size is checked before it is decoded, and a full disk or a spent quota, wherever
the project writes, costs one line, not a traceback, nor a file saved before, nor a temporary file left behind."""
import errno
import hashlib
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import create_submission_zip
import dataloaders
import utils
from conftest import CLASSES, run_script
from test_resume import assert_same, outcome

ROOT = Path(__file__).resolve().parent.parent
DATA = ["--data-dir", "data", "--device", "cpu", "--epochs", "1", "--batch-size", "50"]
OUT_OF_SPACE = {"ENOSPC": errno.ENOSPC, "EDQUOT": errno.EDQUOT}


def one_error_line(done):
    """The one line a refused command printed (asserting there is one, and no traceback)."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def digests(root):
    """{path: sha256} of every file under root."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in Path(root).rglob("*") if path.is_file()}


def leftovers(root):
    """Temporary files under root: what a write that failed must not leave."""
    return [path for path in Path(root).rglob("*") if path.name.endswith(".tmp") or ".download-" in str(path)]


# ---------------------------------------------------------------- a data folder runs no code

class Reduce:
    """An object that pickles as a call of `function(*args)`: what a crafted file makes the unpickler run."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {  # each creates the file `marker` when unpickled by pickle.load
    "os.system": lambda marker: Reduce(os.system, f"touch {shlex.quote(str(marker))}"),
    "builtins.eval": lambda marker: Reduce(eval, f"open({str(marker)!r}, 'w').close()"),
    "subprocess.Popen": lambda marker: Reduce(subprocess.Popen, ["touch", str(marker)]),
}


def crafted_batch(path, payload, marker):
    """A data_batch whose 'data' is the payload, as an attacker would write it (protocol 2, as the original)."""
    with open(path, "wb") as f:
        pickle.dump({"data": PAYLOADS[payload](marker), "labels": [0]}, f, protocol=2)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_pickled_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path, pickled_dir, payload):
    # The crafted file is real: read as torchvision reads it (pickle.load), it creates its marker.
    crafted_batch(tmp_path / "probe", payload, tmp_path / "made by pickle.load")
    with open(tmp_path / "probe", "rb") as f:
        loaded = pickle.load(f, encoding="latin1")
    if payload == "subprocess.Popen":
        loaded["data"].wait()
    assert (tmp_path / "made by pickle.load").exists()

    shutil.copytree(pickled_dir, tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "made by the project"
    crafted_batch(batch, payload, marker)
    line = one_error_line(run_script(["task2.py", *DATA], cwd=tmp_path))
    module = {"os.system": "posix.system"}.get(payload, payload)  # named as Python 3 would import it
    assert f"'{batch.relative_to(tmp_path)}' asks to run code ({module}) and is not CIFAR-10 data" in line, line
    assert "download CIFAR-10 again" in line
    assert not marker.exists()


def test_a_batch_written_as_the_original_archive_was_loads(tmp_path, tiny_arrays):
    """The original cifar-10-batches-py: pickle protocol 2, bytes keys, a uint8 array of rows under 'data', a list
    under 'labels', read with encoding="latin1" (as torchvision reads it)."""
    (train_images, train_labels), (test_images, test_labels) = tiny_arrays
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def dump(name, contents):
        with open(folder / name, "wb") as f:
            pickle.dump(contents, f, protocol=2)

    def batch(images, labels, name):
        return {b"batch_label": name.encode(), b"labels": labels.tolist(),
                b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                b"filenames": [f"{i:04d}.png".encode() for i in range(len(labels))]}

    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        dump(f"data_batch_{i}", batch(train_images[part], train_labels[part], f"training batch {i} of 5"))
    dump("test_batch", batch(test_images, test_labels, "testing batch 1 of 1"))
    dump("batches.meta", {b"label_names": [name.encode() for name in CLASSES], b"num_cases_per_batch": 80,
                          b"num_vis": 3072})
    images, labels, test, test_labels_read, classes = dataloaders.read_pickled_batches(folder)
    assert torch.equal(images, torch.from_numpy(train_images).permute(0, 3, 1, 2))
    assert labels.tolist() == train_labels.tolist() and test_labels_read.tolist() == test_labels.tolist()
    assert torch.equal(test, torch.from_numpy(test_images).permute(0, 3, 1, 2))
    assert classes == CLASSES


# ---------------------------------------------------------------- images: size first, then pixels

@pytest.fixture
def decodes(monkeypatch):
    """The list of images PIL decoded (their pixels, not their header) while the test ran."""
    decoded, load = [], ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.filename)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return decoded


def test_an_image_of_another_size_is_refused_before_a_pixel_is_decoded(tmp_path, decodes):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.new("RGB", (32, 32)).save(small)
    Image.new("RGB", (3000, 2000)).save(big)
    assert dataloaders.decode_image(small).shape == (3, 32, 32) and set(decodes) == {str(small)}
    with pytest.raises(dataloaders.DatasetNotFoundError, match="'.*big.png' is 3000x2000 pixels; CIFAR-10 images"):
        dataloaders.decode_image(big)
    assert set(decodes) == {str(small)}


def test_a_decompression_bomb_is_one_line(tmp_path, folder_dir, monkeypatch):
    for split in ("train", "test"):
        shutil.copytree(folder_dir / split, tmp_path / "data" / split)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 32x32 image counts as a bomb now
    line = one_error_line(run_script(["task2.py", *DATA], cwd=tmp_path))
    assert "is not a readable image (DecompressionBombError" in line and ".png'" in line, line


# ---------------------------------------------------------------- a full disk or a spent quota

class FillingFile:
    """A file being written whose disk fills up: `write` stores `room` bytes in all, then fails with `number`,
    as a file system does (and as torch's zip writer would meet it)."""

    def __init__(self, file, number, room):
        self.file, self.number, self.room = file, number, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if data.nbytes > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(self.number, os.strerror(self.number))
        self.room -= data.nbytes
        return self.file.write(data)

    def __getattr__(self, name):  # flush, fileno, close
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()


def fill_the_disk(monkeypatch, number, of, room=1000):
    """From now on, the project's writes (utils.atomic_file) of files whose names start with `of` fail with
    `number` after `room` bytes."""
    real_open = open

    def opening(path, mode="r", **kwargs):
        file = real_open(path, mode, **kwargs)
        return FillingFile(file, number, room) if Path(path).name.startswith(f".{of}") else file

    monkeypatch.setattr(utils, "open", opening, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pickled_dir):
    """A Task 2 run that nothing stopped, to compare with."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(pickled_dir, root / "data")
    assert run_script(["task2.py", *DATA], cwd=root).returncode == 0
    return root


@pytest.mark.parametrize("number", OUT_OF_SPACE.values(), ids=OUT_OF_SPACE)
def test_a_full_disk_when_checkpointing_is_one_line_and_keeps_the_earlier_run(tmp_path, reference, number,
                                                                               monkeypatch):
    for folder in ("data", "checkpoints", "results"):
        shutil.copytree(reference / folder, tmp_path / folder)
    before = digests(tmp_path)
    fill_the_disk(monkeypatch, number, of="best.ckpt")
    line = one_error_line(run_script(["task2.py", *DATA, "--seed", "1"], cwd=tmp_path))
    facts = "disk quota exceeded, 1.6 MB needed" if number == errno.EDQUOT else "1.6 MB needed, "
    assert line.startswith(f"error: no space left in '{Path('checkpoints/task2')}' ({facts}"), line
    assert line.endswith("free some space, or ask for more quota, then run the same command again with --resume "
                         "auto: python task2.py --data-dir data --device cpu --epochs 1 --batch-size 50 --seed 1 "
                         "--resume auto"), line
    assert digests(tmp_path) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("number", OUT_OF_SPACE.values(), ids=OUT_OF_SPACE)
def test_a_full_disk_when_saving_results_keeps_the_old_file_and_resume_auto_ends_the_run(tmp_path, reference, number,
                                                                                         monkeypatch):
    shutil.copytree(reference / "data", tmp_path / "data")
    assert run_script(["task2.py", *DATA, "--seed", "1"], cwd=tmp_path).returncode == 0  # an earlier results file
    earlier = (tmp_path / "results/task2.json").read_bytes()
    fill_the_disk(monkeypatch, number, of="task2.json")
    line = one_error_line(run_script(["task2.py", *DATA], cwd=tmp_path))
    assert line.startswith(f"error: no space left in 'results' ({'disk quota exceeded, ' * (number != errno.ENOSPC)}")
    assert (tmp_path / "results/task2.json").read_bytes() == earlier and not leftovers(tmp_path)
    monkeypatch.undo()  # space freed
    done = run_script(["task2.py", *DATA, "--resume", "auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same(outcome(tmp_path, "task2"), outcome(reference, "task2"))


@pytest.mark.parametrize("number", OUT_OF_SPACE.values(), ids=OUT_OF_SPACE)
def test_a_cache_that_cannot_be_written_is_a_note_and_the_run_goes_on(tmp_path, folder_dir, number, monkeypatch):
    for split in ("train", "test"):
        shutil.copytree(folder_dir / split, tmp_path / "data" / split)
    fill_the_disk(monkeypatch, number, of=dataloaders.CACHE_NAME, room=100_000)
    done = run_script(["task2.py", *DATA], cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.startswith("note: could not write the cache")]
    assert len(notes) == 1 and "no space left in" in notes[0] and "going on without it" in notes[0], done.stdout
    assert not (tmp_path / "data" / dataloaders.CACHE_NAME).exists() and not leftovers(tmp_path)
    assert (tmp_path / "results/task2.json").is_file()


def test_a_full_disk_during_the_download_leaves_nothing(tmp_path, monkeypatch):
    import torchvision

    def fills_the_disk(root, train, download):
        archive = Path(root) / "cifar-10-python.tar.gz"
        archive.parent.mkdir(parents=True)
        archive.write_bytes(b"\x1f\x8b" * 500)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(archive))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fills_the_disk)
    line = one_error_line(run_script(["task2.py", "--data-dir", "data/cifar10", "--device", "cpu"], cwd=tmp_path))
    assert line.startswith(f"error: no space left in '{Path('data/cifar10')}' (") and "--resume auto" in line, line
    assert not (tmp_path / "data").exists()


def test_an_archive_is_unpacked_whole_or_not_at_all(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"):
            info = tarfile.TarInfo(name)
            info.size = 100_000
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))  # random: the gzip stream stays as long
    utils.unpack_archive(archive, tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "whole" / "cifar-10-batches-py").iterdir()) == ["data_batch_1",
                                                                                              "test_batch"]
    cut = tmp_path / "cut.tar.gz"  # a copy from Drive that stopped halfway: the first member whole, not the second
    cut.write_bytes(archive.read_bytes()[:150_000])
    with pytest.raises((EOFError, tarfile.TarError)):
        utils.unpack_archive(cut, tmp_path / "data" / "cifar10")
    assert list((tmp_path / "data").iterdir()) == []  # no half folder for a later run to take for the data
    escaping = tmp_path / "escaping.tar"
    with tarfile.open(escaping, "w") as tar:
        info = tarfile.TarInfo("../outside")
        tar.addfile(info, io.BytesIO())
    with pytest.raises(tarfile.TarError):  # the "data" filter: no name outside the folder
        utils.unpack_archive(escaping, tmp_path / "data" / "cifar10")
    assert not (tmp_path / "data" / "outside").exists() and list((tmp_path / "data").iterdir()) == []


def test_a_full_disk_when_writing_the_zip_keeps_the_old_one(tmp_path, monkeypatch):
    old = tmp_path / "assignment_code.zip"
    old.write_bytes(b"the zip made before")
    monkeypatch.setattr(create_submission_zip, "check_zip", lambda archive: None)
    fill_the_disk(monkeypatch, errno.ENOSPC, of="assignment_code.zip")
    line = one_error_line(run_script(["create_submission_zip.py", "--yes", "--output", str(old)], cwd=tmp_path))
    assert line.startswith(f"error: no space left in '{tmp_path}' (") and line.endswith("run the same command again")
    assert old.read_bytes() == b"the zip made before" and not leftovers(tmp_path)


def test_an_out_of_space_error_from_elsewhere_is_one_line(tmp_path, monkeypatch):
    import task1

    def full(argv):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "somewhere" / "file"))

    monkeypatch.setattr(task1, "main", full)
    line = one_error_line(run_script(["task1.py"], cwd=tmp_path))
    assert line.startswith(f"error: no space left in '{tmp_path / 'somewhere'}' (disk quota exceeded)"), line


# ---------------------------------------------------------------- the whole command on a real, small file system

def test_task2_on_a_full_file_system_stops_with_one_line_and_resume_auto_ends_it_exactly(tmp_path, pickled_dir):
    """checkpoints/ on a 4 MB tmpfs: room for the first validation's two checkpoints (1.6 MB each), not for the
    next one's temporary file. Then the file system is made larger, as freeing space would, and --resume auto
    ends the run as if the disk had never been full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root (CI runs as root)")
    command = [sys.executable, str(ROOT / "task2.py"), *DATA, "--epochs", "2"]
    env = dict(os.environ, MPLBACKEND="Agg")
    for folder in ("reference", "run"):
        shutil.copytree(pickled_dir, tmp_path / folder / "data")
    reference = subprocess.run(command, cwd=tmp_path / "reference", env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(checkpoints)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        full = subprocess.run(command, cwd=tmp_path / "run", env=env, capture_output=True, text=True)
        line = one_error_line(full)
        assert line.startswith(f"error: no space left in '{Path('checkpoints/task2')}' (1.6 MB needed, "), line
        assert line.endswith(f"--resume auto: {shlex.join(['python', *command[1:], '--resume', 'auto'])}"), line
        assert not leftovers(checkpoints) and (checkpoints / "task2" / "last.ckpt").is_file()
        subprocess.run(["mount", "-o", "remount,size=64m", str(checkpoints)], check=True)  # space freed
        resumed = subprocess.run([*command, "--resume", "auto"], cwd=tmp_path / "run", env=env, capture_output=True,
                                 text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming at step 4" in resumed.stdout, resumed.stdout
        assert_same(outcome(tmp_path / "run", "task2"), outcome(tmp_path / "reference", "task2"))
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


def test_a_folder_that_cannot_hold_file_locks_trains_unlocked_after_a_note(tmp_path, pickled_dir, monkeypatch):
    """Google Drive as Colab mounts it has no flock: the training goes on, unlocked, and says so."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    shutil.copytree(pickled_dir, tmp_path / "data")
    done = run_script(["task2.py", *DATA], cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert f"note: '{Path('checkpoints/task2')}' cannot hold file locks" in done.stdout, done.stdout
    assert (tmp_path / "results/task2.json").is_file()
