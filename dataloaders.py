"""CIFAR-10 decoded once into uint8 tensors that live on the training device, served in batches.

No DataLoader, no per-image Python in the training loop: a batch is an index into the tensor,
and augmentation and normalisation are a few batched tensor ops on the device (the approach
of Keller Jordan's airbench, https://github.com/KellerJordan/cifar10-airbench).
"""
import _compat_pickle  # pickle's own table of Python 2 names
import contextlib
import hashlib
import os
import pathlib
import pickle
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import utils

# The course's normalisation (the starter's, Task 2's; Task 3 keeps it), per channel: x = (pixel / 255 - mean) / std.
# Task 4 normalises with ImageNet's instead (task4a.IMAGENET_MEAN, IMAGENET_STD).
COURSE_MEAN = (0.5, 0.5, 0.5)
COURSE_STD = (0.25, 0.25, 0.25)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
CACHE_NAME = "cifar10-uint8-cache.pt"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
EVAL_BATCH_SIZE = 256  # at least: evaluation needs no gradients, so bigger batches are faster


class DatasetNotFoundError(utils.UserError):
    """CIFAR-10 is neither in the data folder nor downloadable."""


# ---------------------------------------------------------------- reading the two layouts

class CodeInPickle(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 batch does not hold: a file that would run code."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds and nothing else. A pickle can name any importable callable and have
    it called (os.system, eval, ...): that is how a crafted file runs code while it is read. A batch is a dict of
    strings, bytes, lists, numbers, which need no globals, and one numpy array, rebuilt by the few globals below;
    any other is refused before it is looked up. `_codecs.encode` is how Python 3 writes bytes in pickle
    protocol 2 (the original archive's): it turns a string into bytes and calls nothing else."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct",)} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        # Protocol 2 names some of Python 3's globals as Python 2 did (builtins as __builtin__), and the base class
        # maps them back before it imports: check, and name, what it would import.
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if (module, name) not in self.ALLOWED:
            raise CodeInPickle(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickled_batches(folder):
    """torchvision's layout (cifar-10-batches-py/) -> (train images uint8 [N,3,32,32], train labels int64 [N],
    test images, test labels, class names). Read with BatchUnpickler: a file that asks to run code is refused."""
    folder = pathlib.Path(folder)

    def read(name):
        with open(folder / name, "rb") as f:
            contents = BatchUnpickler(f, encoding="latin1").load()
        # Python 2 wrote the keys as strings (read as str here); a batch written again by Python 3 as bytes.
        return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in contents.items()}

    def images_and_labels(batch):  # rows of 3072 bytes (R plane, G plane, B plane) and their labels
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return torch.from_numpy(images), torch.from_numpy(np.asarray(batch["labels"])).long()

    def label_names(meta):
        return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in meta["label_names"]]

    parts = {}  # file name -> (images, labels), or the class names for batches.meta
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        try:
            contents = read(name)
            parts[name] = label_names(contents) if name == "batches.meta" else images_and_labels(contents)
        except CodeInPickle as error:
            raise DatasetNotFoundError(
                f"'{folder / name}' asks to run code ({error}) and is not CIFAR-10 data: nothing of it was run; "
                f"delete the folder '{folder}' and download CIFAR-10 again from {CIFAR10_URL}, or ask who put "
                f"the file there") from None
        except Exception as error:  # noqa: BLE001  (unpickling a damaged file can fail in any way)
            raise DatasetNotFoundError(
                f"'{folder / name}' is a missing or broken CIFAR-10 file ({type(error).__name__}); delete the "
                f"folder '{folder}' to download it again, or unpack {CIFAR10_URL} there") from None
    train = [torch.cat(tensors) for tensors in zip(*(parts[f"data_batch_{i}"] for i in range(1, 6)), strict=True)]
    test, classes = parts["test_batch"], parts["batches.meta"]
    return (*train, *test, list(classes))


def list_image_folder(root):
    """train/<class>/* and test/<class>/* -> ({split: [(path, label), ...]}, class names sorted)."""
    root = pathlib.Path(root)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    test_classes = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
    if not classes or classes != test_classes:
        raise DatasetNotFoundError(
            f"'{root}/train' and '{root}/test' must hold the same class folders; "
            f"found {classes} and {test_classes}")
    files = {}
    for split in ("train", "test"):
        files[split] = [(path, label) for label, name in enumerate(classes)
                        for path in sorted((root / split / name).iterdir())
                        if path.suffix.lower() in IMAGE_SUFFIXES]
    return files, classes


def fingerprint(files):
    """A digest of every file's name, size and modification time: changes when the folder does."""
    digest = hashlib.sha256()
    for split, entries in files.items():
        for path, _ in entries:
            stat = path.stat()
            digest.update(f"{split}/{path.parent.name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def decode_image(path):
    """One image file -> uint8 [3,32,32]; anything but a readable 32x32 image is an error naming the file. The size
    is read from the file's header (Image.open decodes nothing) and checked before any pixel is decoded, so a huge
    image costs no more than a small one."""
    try:
        with Image.open(path) as image:
            if image.size != (32, 32):
                raise DatasetNotFoundError(
                    f"'{path}' is {image.size[0]}x{image.size[1]} pixels; CIFAR-10 images are 32x32: replace it with "
                    f"a good copy (or delete it) and run again")
            pixels = np.array(image.convert("RGB"))
    # PIL's errors for empty, cut-short or foreign files, and for an image too large to decode safely
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetNotFoundError(
            f"'{path}' is not a readable image ({type(error).__name__}: {error}); replace it with a good copy "
            f"(or delete it) and run again") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def decode_images(entries):
    """[(path, label)] -> (images uint8 [N,3,32,32], labels int64 [N])."""
    with ThreadPoolExecutor() as pool:  # PIL lets go of the GIL while it decodes
        images = list(pool.map(decode_image, [path for path, _ in entries]))
    return torch.stack(images), torch.tensor([label for _, label in entries], dtype=torch.long)


def cache_path(root):
    """Where the decoded image folder is cached: inside it, or in the user's cache if it is read-only."""
    root = pathlib.Path(root).resolve()
    if os.access(root, os.W_OK):
        return root / CACHE_NAME
    user_cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    return user_cache / "cifar10-course" / hashlib.sha256(str(root).encode()).hexdigest()[:16] / CACHE_NAME


def read_image_folder(root):
    """Image-folder layout -> same as read_pickled_batches; decoded once, then read from a cache file."""
    files, classes = list_image_folder(root)
    key = fingerprint(files)
    cache = cache_path(root)
    if cache.is_file():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  (a truncated or foreign file: decode again and replace it)
            print(f"note: the cache '{cache}' cannot be read ({type(error).__name__}); it is made again")
            cached = {}
        if isinstance(cached, dict) and cached.get("fingerprint") == key:
            return (cached["train_images"], cached["train_labels"],
                    cached["test_images"], cached["test_labels"], cached["classes"])
    print(f"decoding the images in '{root}' once; later runs read '{cache}'")
    train_images, train_labels = decode_images(files["train"])
    test_images, test_labels = decode_images(files["test"])
    try:
        utils.save_checkpoint(dict(train_images=train_images, train_labels=train_labels,
                                   test_images=test_images, test_labels=test_labels,
                                   classes=classes, fingerprint=key), cache)
    except (OSError, utils.UserError) as error:  # a full disk, say: the cache only saves time
        print(f"note: could not write the cache '{cache}' ({error}); going on without it: the images are decoded "
              f"again on every run")
    return train_images, train_labels, test_images, test_labels, classes


def read_cifar10(data_dir):
    """Find CIFAR-10 in either layout under data_dir (downloading if absent) -> as read_pickled_batches."""
    root = pathlib.Path(data_dir)
    for batches in (root / "cifar-10-batches-py", root):
        if (batches / "data_batch_1").is_file():
            return read_pickled_batches(batches)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return read_image_folder(root)
    created = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    try:
        failure = download_once(root)
    finally:  # a mistyped --data-dir, or a full disk, leaves no empty folders behind the failed download
        if not (root / "cifar-10-batches-py" / "data_batch_1").is_file():
            for folder in created:
                with contextlib.suppress(OSError):  # not empty: what is there stays for the user to see
                    folder.rmdir()
    if failure is None:
        return read_pickled_batches(root / "cifar-10-batches-py")
    raise DatasetNotFoundError(
        f"CIFAR-10 is not in '{root}' and could not be downloaded ({failure}). "
        f"Put it there in one of two layouts: torchvision's 'cifar-10-batches-py/' (unpacked from "
        f"{CIFAR10_URL}), or image folders 'train/<class>/*.png' and 'test/<class>/*.png'; "
        f"or point to it with --data-dir DIR")


def download_once(root):
    """Download CIFAR-10 into `root` unless another process has -> None, or why it failed. The jobs of an array that
    start together download it once: the first, while the others wait for its lock. A full disk is a NoSpaceLeft."""
    import torchvision  # here, not at the top: only the download needs it, and it takes seconds to import

    try:
        lock = utils.writable_folder(root) / ".download.lock"
    except utils.UserError as error:  # a folder that cannot be made or written
        return str(error)
    failure = "stopped"  # until the download has ended, one way or another (a full disk raises)
    try:
        with utils.file_lock(lock, f"another process downloading CIFAR-10 into '{root}'"):
            if (root / "cifar-10-batches-py" / "data_batch_1").is_file():
                failure = None
            else:
                _, failure = utils.try_download(download_cifar10, root, torchvision.datasets.CIFAR10, folder=root)
    finally:
        if failure is not None:
            lock.unlink(missing_ok=True)
    return failure


def download_cifar10(root, dataset):
    """Download and unpack CIFAR-10 with torchvision's `dataset` class into a folder of its own inside `root`, and
    move the unpacked batches to root/cifar-10-batches-py when they are whole: a failed download (no network, a
    full disk) leaves nothing behind, the archive (163 MB) not even when it succeeds."""
    work = pathlib.Path(root) / f".download-{uuid.uuid4().hex}"
    try:
        dataset(root=work, train=True, download=True)
        os.replace(work / "cifar-10-batches-py", pathlib.Path(root) / "cifar-10-batches-py")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- batches on the device

class DeviceLoader:
    """Iterates over (images float [B,3,H,W], labels int64 [B]) drawn from uint8 images on one device.

    Like a DataLoader: len() is batches per epoch; with shuffle, the order changes every epoch
    and the last partial batch is dropped (unless there is no full batch at all); without it,
    every image comes exactly once, in order.

    Augmentation (training only): each image is translated by up to `crop_padding` pixels each way
    (a crop of its padded self: zeros as torchvision's RandomCrop, or a mirror of its border with
    padding_mode="reflect", which adds no black edges) and mirrored left-right. flip="random" tosses a
    coin per image and epoch; flip="alternate" tosses it once, in the first epoch, then mirrors every
    image in every other epoch, so that each image is seen both ways in any two consecutive epochs
    (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", https://arxiv.org/abs/2404.00498).
    crop_sizes (training only, with augment): the side of the crops in each epoch, crop_sizes[e] in epoch e and
    the images' own side after the list ends. A smaller crop is cut from anywhere in the padded image, at the
    same scale: objects keep their size, the network sees less around them and does (side / 32)^2 of the work.
    Progressive resizing (fast.ai's DAWNBench ImageNet runs, https://www.fast.ai/posts/2018-08-10-fastai-diu-imagenet.html),
    done by cropping rather than shrinking, so the filters learn the objects at the size they are tested at.
    """

    def __init__(self, images, labels, batch_size, *, mean, std, shuffle=False, augment=False,
                 crop_padding=4, padding_mode="zeros", flip="random", crop_sizes=(), image_size=None, seed=0,
                 classes=None):
        if padding_mode not in ("zeros", "reflect") or flip not in ("random", "alternate"):
            raise ValueError(f"padding_mode must be 'zeros' or 'reflect' and flip 'random' or 'alternate', "
                             f"got {padding_mode!r} and {flip!r}")
        self.images = images  # uint8 [N,3,H,W] on the training device
        self.labels = labels  # int64 [N]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding  # pixels, the largest translation each way
        self.padding_mode = padding_mode
        self.flip = flip
        self.crop_sizes = tuple(crop_sizes)  # pixels, the side of each epoch's crops (see above)
        side = images.shape[-1] + 2 * crop_padding
        if any(not 0 < size <= side for size in self.crop_sizes):
            raise ValueError(f"crop_sizes must lie between 1 and the padded side {side}, got {self.crop_sizes}")
        self.image_size = image_size  # None keeps 32x32; else square side after a bilinear resize
        self.classes = classes  # class names, label order
        self.mean, self.std = tuple(mean), tuple(std)  # per channel, in units of pixel / 255
        self._mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        # Random draws happen on the CPU, once per epoch, so a seed gives the same epochs on any device.
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs begun: the alternating flip's parity
        self.first_flips = None  # flip="alternate": the coin of each image in the first epoch
        self.epoch_start = dict(generator=self.generator.get_state(), epoch=0, first_flips=None)

    @property
    def device(self):
        return self.images.device

    @property
    def num_images(self):
        return len(self.labels)

    def __len__(self):
        if self.shuffle:  # drop the last partial batch, but never the only one
            return max(1, self.num_images // self.batch_size)
        return -(-self.num_images // self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start=0):
        """One epoch's batches from batch number `start` on: the epoch's random draws are made whole
        (so an epoch resumed at `start` continues exactly as it would have), the first `start` batches skipped."""
        self.epoch_start = dict(generator=self.generator.get_state(), epoch=self.epoch, first_flips=self.first_flips)
        n = self.num_images
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        if self.augment:
            # Per image: crop offsets (0 .. the padded side minus the crop's) and whether it is mirrored.
            size = self.crop_size(self.epoch)
            largest_shift = self.images.shape[-1] + 2 * self.crop_padding - size
            shifts = torch.randint(0, largest_shift + 1, (n, 2), generator=self.generator)
            shifts, flips = shifts.to(self.device), self.epoch_flips().to(self.device)
        self.epoch += 1
        for i in range(start, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[index]
            if self.augment:
                images = random_crop_and_flip(images, shifts[index], flips[index], self.crop_padding,
                                              self.padding_mode, size)
            yield self.to_model_input(images), self.labels[index]

    def crop_size(self, epoch):
        """Side of the training crops in `epoch` (0-based)."""
        return self.crop_sizes[epoch] if epoch < len(self.crop_sizes) else self.images.shape[-1]

    def state_dict(self):
        """The random state at the start of the latest epoch begun: load it, and batches(start=k)
        serves that epoch again from batch k."""
        return dict(self.epoch_start)

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.epoch, self.first_flips = state["epoch"], state["first_flips"]

    def epoch_flips(self):
        """bool [N] on the CPU: which images this epoch mirrors."""
        if self.flip == "random":
            return torch.rand(self.num_images, generator=self.generator) < 0.5
        if self.first_flips is None:
            self.first_flips = torch.rand(self.num_images, generator=self.generator) < 0.5
        return self.first_flips ^ (self.epoch % 2 == 1)

    def evaluation_view(self, batch_size):
        """The same images in order, unaugmented, every one exactly once: for evaluating on this set."""
        return DeviceLoader(self.images, self.labels, batch_size, mean=self.mean, std=self.std,
                            image_size=self.image_size, classes=self.classes)

    def to_model_input(self, images):
        """uint8 [B,3,H,W] -> float [B,3,S,S]: ToTensor() + Normalize() arithmetic, then the resize if any."""
        images = images.float().div_(255).sub_(self._mean).div_(self._std)  # in place: no temporaries
        if self.image_size is not None:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=self.image_size < images.shape[-1])
        return images


def random_crop_and_flip(images, shifts, flips, padding, padding_mode="zeros", size=None):
    """uint8 [B,C,H,W], shifts int [B,2] in [0, H+2*padding-size], flips bool [B] -> each image's size x size
    crop (size None: H) of its padded self (zeros as torchvision's RandomCrop(padding=...), or its mirrored
    border with "reflect"), at offset shifts (row, column), then mirrored left-right where flips says.

    Two gathers, rows then columns; crop-then-mirror reads padded column shift + (size-1-x) for output column x.
    """
    b, c, h, w = images.shape
    size = h if size is None else size
    mode = "constant" if padding_mode == "zeros" else "reflect"
    padded = F.pad(images, (padding,) * 4, mode=mode)  # [B, C, H+2p, W+2p]
    rows = shifts[:, 0:1] + torch.arange(size, device=images.device)  # [B, S]
    cols = torch.arange(size, device=images.device).expand(b, size)
    cols = torch.where(flips.view(b, 1), size - 1 - cols, cols) + shifts[:, 1:2]  # [B, S]
    padded = padded.gather(2, rows.view(b, 1, size, 1).expand(b, c, size, w + 2 * padding))  # [B, C, S, W+2p]
    return padded.gather(3, cols.view(b, 1, 1, size).expand(b, c, size, size))  # [B, C, S, S]


def split_indices(n, validation_fraction, split_seed):
    """Disjoint (train, validation) index tensors; the split depends only on n, fraction and split_seed."""
    if not 0 < validation_fraction < 1:
        raise utils.UserError(f"validation_fraction must lie between 0 and 1, got {validation_fraction}")
    n_val = min(n - 1, max(1, round(n * validation_fraction)))
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return permutation[n_val:].sort().values, permutation[:n_val].sort().values


def load_cifar10(batch_size, validation_fraction=0.1, *, data_dir="data/cifar10", device=None,
                 augment=False, crop_padding=4, padding_mode="zeros", flip="random", crop_sizes=(), mean=COURSE_MEAN,
                 std=COURSE_STD, image_size=None, seed=0, split_seed=0, eval_batch_size=EVAL_BATCH_SIZE):
    """(train, validation, test) DeviceLoaders. Only the training loader shuffles and augments
    (crop_padding, padding_mode, flip and crop_sizes: see DeviceLoader)."""
    device = torch.device(device) if device is not None else utils.get_device()
    train_images, train_labels, test_images, test_labels, classes = read_cifar10(data_dir)
    train_index, val_index = split_indices(len(train_labels), validation_fraction, split_seed)

    def on_device(images, labels, index=None):
        if index is not None:
            images, labels = images[index], labels[index]
        return images.to(device), labels.to(device)

    eval_batch_size = max(batch_size, eval_batch_size)
    common = dict(mean=mean, std=std, image_size=image_size, classes=classes)
    return (
        DeviceLoader(*on_device(train_images, train_labels, train_index), batch_size,
                     shuffle=True, augment=augment, crop_padding=crop_padding, padding_mode=padding_mode,
                     flip=flip, crop_sizes=crop_sizes, seed=seed, **common),
        DeviceLoader(*on_device(train_images, train_labels, val_index), eval_batch_size, **common),
        DeviceLoader(*on_device(test_images, test_labels), eval_batch_size, **common),
    )
