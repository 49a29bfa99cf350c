"""Shared helpers: command line, seeding, device choice, checkpoints and plots."""
import argparse
import contextlib
import errno
import inspect
import io
import json
import math
import os
import pathlib
import random
import shlex
import shutil
import socket
import sys
import tarfile
import uuid

import filelock
import numpy as np
import torch


class UserError(Exception):
    """A mistake the user can fix; the message says how. Scripts print it on one line and exit 1."""


# The errors of a write that found no room: a full file system, or the user's disk quota spent (a cluster's home
# folder, a Google Drive). Windows has no EDQUOT.
OUT_OF_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class NoSpaceLeft(UserError):
    """A file could not be written for want of space in `folder` (`needed` bytes, where known). The message says
    what to do; a training script's run_cli adds the command that continues the run."""

    def __init__(self, folder, needed=None, quota=False):
        folder = pathlib.Path(folder)
        facts = [f"{human_size(needed)} needed"] if needed is not None else []
        if quota:  # the file system may have room; the user's share of it has none
            facts.insert(0, "disk quota exceeded")
        else:
            free = free_space(folder)
            facts += [f"{human_size(free)} free"] if free is not None else []
        facts = f" ({', '.join(facts)})" if facts else ""
        super().__init__(f"no space left in '{folder}'{facts}: free some space, or ask for more quota, then run the "
                         f"same command again")

    @classmethod
    def from_error(cls, error, folder, needed=None):
        """The NoSpaceLeft for an OSError that is out of space (OUT_OF_SPACE), else None."""
        if not isinstance(error, OSError) or error.errno not in OUT_OF_SPACE:
            return None
        return cls(folder, needed, quota=error.errno != errno.ENOSPC)


def free_space(folder):
    """Bytes free for writing in `folder` (or its nearest existing parent); None where that cannot be told."""
    folder = pathlib.Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_size(size):
    """1536000 -> '1.5 MB' (decimal units, as disks are sold and `df -H` shows them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


class TrainingInterrupted(Exception):
    """Training stopped on a signal (SIGINT: Ctrl-C; SIGTERM: a cluster's scheduler) after saving a
    checkpoint it can resume from."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number


def resume_command(argv):
    """The shell command that continues the run started by `python <argv>`."""
    return shlex.join(["python", *argv] + ([] if "--resume" in argv else ["--resume"]))


def resume_auto_command(argv):
    """The shell command that goes on with whatever `python <argv>` left: `--resume auto` in place of any --resume."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume":
            skip = i + 1 < len(argv) and argv[i + 1] == "auto"
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", *kept, "--resume", "auto"])


def run_cli(main, resumable=False):
    """Call `main(sys.argv[1:])`; a UserError, or a file that cannot be written, becomes a one-line message and
    exit code 1, an interrupted training a line with the command that resumes it and exit code 128 + the signal's
    number. resumable: the script trains with the Trainer, so a full disk's line names `--resume auto`, which goes
    on from the last checkpoint (running the command as it was would start the run afresh)."""
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file (a cluster job's) line by line

    def no_space(error):
        return f"error: {error}" + (f" with --resume auto: {resume_auto_command(sys.argv)}" if resumable else "")

    try:
        main(sys.argv[1:])
    except NoSpaceLeft as error:
        sys.exit(no_space(error))
    except UserError as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        if error.errno in OUT_OF_SPACE:  # a write outside save_bytes (a download, say): its folder where known
            sys.exit(no_space(NoSpaceLeft.from_error(
                error, pathlib.Path(error.filename).parent if error.filename else pathlib.Path.cwd())))
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        sys.exit(f"error: {cannot_write(error.filename, error)}")
    except TrainingInterrupted as error:
        print(f"{error}; resume with: {resume_command(sys.argv)}", file=sys.stderr)
        sys.exit(128 + error.signal_number)
    except KeyboardInterrupt:
        print("interrupted: the checkpoints saved so far are kept", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------- command line

def positive_int(text):
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text):
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text}")
    return value


def fraction(text):
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (where it has one; a flag without says in its help what happens then)
    and keeps the script's docstring as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # --precision's choices (autocast_dtype)


def common_parser(prog, description, *, epochs, batch_size, learning_rate, early_stop_count, validations_per_epoch=2,
                  recipe_default=None):
    """The flags every training script shares, with that script's defaults. A default of None leaves the value
    to the model's recipe; recipe_default(key) then says what it is, for --help."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)

    def recipe_note(default, key):
        return f" (default: {recipe_default(key)})" if default is None else ""

    parser.add_argument("--data-dir", default="data/cifar10",
                        help="CIFAR-10 folder: torchvision's cifar-10-batches-py/ or train/<class>/ + "
                             "test/<class>/ image folders; downloaded here if absent")
    parser.add_argument("--epochs", type=positive_int, default=epochs,
                        help="maximum number of epochs" + recipe_note(epochs, "epochs"))
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help="training batch size" + recipe_note(batch_size, "batch_size"))
    parser.add_argument("--lr", dest="learning_rate", type=positive_float, default=learning_rate,
                        help="learning rate" + (" per 1024 images" if learning_rate is None else "")
                             + recipe_note(learning_rate, "lr"))
    parser.add_argument("--early-stop-count", type=positive_int, default=early_stop_count,
                        help="stop when the oldest of this many recent validation losses is the lowest"
                             + recipe_note(early_stop_count, "early_stop_count"))
    parser.add_argument("--validations-per-epoch", type=positive_int, default=validations_per_epoch,
                        help="how often per epoch the validation set is evaluated"
                             + recipe_note(validations_per_epoch, "validations_per_epoch"))
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the train/validation split (kept apart from --seed on purpose)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic cuDNN kernels (slower); default lets cuDNN pick the fastest")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N, mps or cpu; default: CUDA, then Apple MPS, then CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="what the forward passes compute in: float32, or mixed precision in bfloat16 or "
                             "float16 (weights, optimizer state and reported losses stay float32; float16 with a "
                             "gradient scaler); PyTorch Lightning's 32, bf16-mixed, 16-mixed. auto: on CUDA "
                             "bfloat16 where the GPU computes it natively (Ampere and later), else float16 (a T4); "
                             "on the CPU bfloat16 where the processor computes it natively (AVX512-BF16 or AMX), "
                             "else float32; float32 on Apple MPS")
    # The flags --precision replaced, kept so that the commands of earlier runs (records/, notes, job scripts) run.
    parser.add_argument("--no-autocast", dest="precision", action="store_const", const="float32",
                        help="the same as --precision float32")
    parser.add_argument("--bfloat16", dest="precision", action="store_const", const="bfloat16",
                        help="the same as --precision bfloat16")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep PyTorch's default NCHW memory format instead of channels-last "
                             "(the default on CUDA and the CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model: a start-up that may take minutes; faster steps on some devices")
    parser.add_argument("--show", action="store_true", help="also show the plots in a window")
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                        help="continue this run (the one the other flags name) from checkpoints/<name>/last.ckpt, "
                             "exactly where it stopped. --resume auto, for batch jobs that may be requeued: "
                             "continue if there is a checkpoint, start if there is none, and do nothing if "
                             "the run's results are saved already")
    parser.add_argument("--checkpoint-every", type=positive_float, default=5.0,
                        help="minutes of training between resumable checkpoints (besides one at every validation)")
    return parser


def checkpoint_options(args, resume=None):
    """The Trainer's checkpoint keywords from the command line; `resume` overrides --resume for one run."""
    return dict(resume=args.resume if resume is None else resume, checkpoint_every_s=60 * args.checkpoint_every)


def speed_options(args, device):
    """The Trainer's speed keywords from the command line: the precision (autocast_dtype), channels-last on CUDA
    and the CPU (where it trained Task 3's VGG 1.31x as fast; docs/results.md), torch.compile."""
    return dict(autocast_dtype=autocast_dtype(device, args.precision),
                channels_last=device.type in ("cuda", "cpu") and not args.no_channels_last,
                compile_model=args.compile)


# ---------------------------------------------------------------- seeding and devices

def set_seed(seed, deterministic=False):
    """Seed Python, NumPy and torch; choose deterministic or fastest cuDNN kernels, not both."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device, CUDA and MPS included
    # benchmark=True autotunes conv algorithms per input shape, which may pick a different,
    # non-deterministic kernel from run to run; the two settings contradict each other.
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def get_device(name=None):
    """The torch.device to train on: `name` if given, else CUDA, then Apple MPS, then CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to torch here; "
                        "leave out --device to use what there is")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available here; leave out --device")
    if device.type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {name}: use cuda, cuda:N, mps or cpu")
    return device


def autocast_dtype(device, precision="auto"):
    """The dtype of `device`'s forward passes for --precision (PRECISIONS), None for float32 throughout.
    "bfloat16" and "float16" are taken as asked, emulated or not (float16 on a CPU: a check of the gradient
    scaler's logic, not a speed-up). "auto": on CUDA bfloat16 on GPUs that compute it natively (Ampere and
    later), float16 on older ones (a T4: bfloat16 there is emulated, slower than float32); on the CPU bfloat16
    where the processor computes it natively (cpu_computes_bfloat16), float32 elsewhere; on MPS float32."""
    if precision == "float32":
        return None
    if precision != "auto":
        if device.type == "mps":
            raise UserError(f"--precision {precision}: mixed precision is not supported on Apple MPS here; "
                            f"use --precision float32 (what auto gives there)")
        return getattr(torch, precision)
    if device.type == "cuda":  # the GPU in use (--device cuda:1 on a machine of mixed GPUs), not the current one
        native = torch.cuda.get_device_capability(device)[0] >= 8  # Ampere (sm_80) and later
        return torch.bfloat16 if native else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_computes_bfloat16() else None
    return None


def cpu_flags():
    """The processor's feature flags as Linux lists them in /proc/cpuinfo; empty where there is no such file."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_computes_bfloat16():
    """Whether this CPU computes bfloat16 in hardware: x86 processors with AVX512-BF16 (AMD Zen 4 and later,
    Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later), by the flags Linux reports (`lscpu`:
    avx512_bf16, amx_bf16), elsewhere by PyTorch's own CPU check. Without them bfloat16 is emulated, and
    slower than float32."""
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return any(getattr(torch.cpu, check, lambda: False)() for check in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def describe_device(device):
    """'cuda (NVIDIA H100 80GB HBM3)', 'mps' or 'cpu (2 threads)': what a results file should name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def try_download(fetch, *args, folder, timeout_s=60, **kwargs):
    """fetch(*args, **kwargs), which downloads into `folder` -> (its result, None), or (None, why it failed); a
    silent network fails in timeout_s. A full disk is no download failure but a NoSpaceLeft naming `folder`."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        return fetch(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001  (any failure means: tell the user what to do instead)
        full = NoSpaceLeft.from_error(error, folder)
        if full is not None:
            raise full from None
        return None, f"{type(error).__name__}: {error}"
    finally:
        socket.setdefaulttimeout(previous)


def unpack_archive(archive, folder):
    """Unpack the tar `archive` (CIFAR-10's, say) into `folder`, which appears only once the archive is unpacked
    whole: an interrupted unpack leaves no half folder that a later run would take for the data. The "data" filter
    (Python 3.12, and the security releases of 3.10 and 3.11 before it) keeps every name inside the folder. A full
    disk is a NoSpaceLeft naming the folder."""
    folder = pathlib.Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.unpacking")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(work, folder)  # onto nothing, or an empty folder
    except OSError as error:
        full = NoSpaceLeft.from_error(error, folder.parent)
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- checkpoints and results

@contextlib.contextmanager
def atomic_file(path, mode="w", size=None):
    """Open a new file beside `path` to write, and put it in the place of `path` once written: a reader never
    sees half a file, a kill mid-write leaves the old one, and jobs writing the same file at once (on any node
    of a cluster) each write a temporary file of their own name. A full disk or spent quota leaves the old file
    and no temporary one, and is a NoSpaceLeft naming the folder (and `size`, the bytes to be written, if given)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else dict(encoding="utf-8"))) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        full = NoSpaceLeft.from_error(error, path.parent, size)
        if full is not None:
            raise full from None
        raise


def save_bytes(data, path):
    """Write `data` (bytes, or a buffer of them) to `path` atomically (atomic_file). Every file the project makes
    goes through here: made in memory whole first, so that a full disk meets Python's own write, never a
    library's writer halfway through (torch's zip writer turns the OSError into a RuntimeError)."""
    data = memoryview(data).cast("B")
    with atomic_file(path, "wb", size=data.nbytes) as f:
        f.write(data)


def save_checkpoint(checkpoint, path):
    """Write a checkpoint dict atomically (save_bytes)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    save_bytes(buffer.getbuffer(), path)


def save_json(data, path):
    """Write `data` as indented JSON, atomically (save_bytes)."""
    save_text(json.dumps(data, indent=1, default=str) + "\n", path)


def save_text(text, path):
    """Write a text file (a table, a report), UTF-8, atomically (save_bytes)."""
    save_bytes(text.encode("utf-8"), path)


# What flock says on a file system without locks.
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextlib.contextmanager
def file_lock(path, waiting_for):
    """Hold the lock file `path` while the block runs: processes that share a folder (the jobs of a cluster
    array, two terminals) take turns. One that has to wait says so once, naming `waiting_for`. filelock's locks
    are the operating system's (flock on Linux and macOS, also across a cluster's NFS; msvcrt on Windows), so a
    lock held by a process that was killed is released with it.

    Some file systems have no such locks (Google Drive as Colab mounts it, among others): there the block runs
    unlocked, after a line saying so. A lock file of filelock's own kind instead (its soft fallback) would outlive
    a process killed by a runtime reset and make the next run wait forever."""
    settings = {"fallback_to_soft": False} if "fallback_to_soft" in inspect.signature(filelock.FileLock).parameters \
        else {}  # filelock 4 falls back to its soft lock where flock fails; filelock 3 raises instead
    lock = filelock.FileLock(path, **settings)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for {waiting_for} (lock '{path}')")
        lock.acquire()
    except (NotImplementedError, OSError) as error:  # filelock 3's word for no flock, and filelock 4's
        if isinstance(error, OSError) and error.errno not in NO_LOCKS:
            raise
        print(f"note: '{pathlib.Path(path).parent}' cannot hold file locks: nothing stops two runs in it at once, "
              f"so run one at a time there")
        yield
        return
    try:
        yield
    finally:
        lock.release()


def cannot_write(path, error):
    """The message for a file or folder that cannot be written."""
    return (f"cannot write '{path}' ({error.strerror or error}): make that folder writable, or run from a "
            f"folder you can write in")


def writable_folder(folder):
    """Make `folder` (and its parents) if need be and check that a file can be created in it; a UserError naming
    it if not, before any work is done that could not be saved."""
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{uuid.uuid4().hex}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise UserError(cannot_write(folder, error)) from None
    return folder


def read_results(results_dir):
    """{file stem: contents} of every results file in `results_dir`. One that cannot be read (empty, cut short,
    not JSON) is left out with a line saying so: the others still make their tables and the report."""
    results = {}
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a results file")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            print(f"note: left out '{path}': it cannot be read as a results file ({type(error).__name__}); "
                  f"run its command again to remake it")
            continue
        results[path.stem] = data
    return results


def load_checkpoint(path, device="cpu", remedy="run the command that made it again (without --resume)"):
    """Read a checkpoint dict onto `device`; only tensors and plain values are unpickled. A missing, empty,
    cut-short or foreign file is a UserError naming it and saying what to do (`remedy`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at '{path}': train the model first")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001  (whatever torch.load says of a damaged file, it is damaged)
        # PyTorch's own message for a foreign file advises weights_only=False: never do that with a file one
        # cannot trust, so the message is not passed on.
        raise UserError(f"'{path}' is not a readable checkpoint (empty, cut short or damaged: "
                        f"{type(error).__name__}); {remedy}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"'{path}' is not a checkpoint of this project; {remedy}")
    return checkpoint


# ---------------------------------------------------------------- plots

def smooth(values, weight=0.9):
    """Exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot_history(ax, history, label, smoothing=0.0, **style):
    """Draw one {step: value} history on `ax`; with smoothing, the raw curve stays as a faint shadow."""
    steps, values = list(history.keys()), list(history.values())
    if smoothing > 0:
        line, = ax.plot(steps, values, alpha=0.2, linewidth=1, **style)
        ax.plot(steps, smooth(values, smoothing), label=f"{label} (smoothed)", **dict(style, color=line.get_color()))
    else:
        ax.plot(steps, values, label=label, marker="o", markersize=3, **style)


def add_epoch_axis(ax, steps_per_epoch):
    """A second x axis on top of a steps axis, in epochs."""
    epochs = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch,
                                                  lambda e: e * steps_per_epoch))
    epochs.set_xlabel("epoch")


# Inches. A report figure is printed at its own size (16.3 cm wide), so its 10-point text stays 10 points.
REPORT_FIGURE_SIZE = (6.4, 3.2)


def new_figure(ncols=1, size=(7, 5)):
    """A figure with `ncols` axes side by side, each `size` inches."""
    import matplotlib.pyplot as plt  # here, not at the top: importing the loaders or the Trainer draws nothing

    return plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=False, layout="constrained")


def save_figure(fig, path, show=False):
    """Save `fig` as a PNG (creating its folder); show it only when asked, so headless runs never block."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format=pathlib.Path(path).suffix.lstrip(".") or "png", dpi=150)
    save_bytes(buffer.getbuffer(), path)
    print(f"saved {path}")
    if show:
        plt.show()
    plt.close(fig)


def finish_axes(ax, ylabel, steps_per_epoch, best_step=None):
    """Label a plot over training steps: epochs on the top axis, the kept model's step dashed, grid, legend."""
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle="--", linewidth=1, label="best model (kept)")
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel(ylabel)
    add_epoch_axis(ax, steps_per_epoch)
    ax.grid(alpha=0.3)
    ax.legend()


def draw_loss(ax, train_history, validation_history, steps_per_epoch, best_step=None):
    """Training loss (per batch, smoothed) and validation loss (whole set) over training steps."""
    plot_history(ax, train_history["loss"], "train batches", smoothing=0.95)
    plot_history(ax, validation_history["loss"], "validation (whole set)")
    finish_axes(ax, "cross-entropy loss", steps_per_epoch, best_step)


def draw_accuracy(ax, train_history, validation_history, steps_per_epoch, best_step=None):
    """Validation accuracy (whole set) over training steps, with the training batches' accuracy (smoothed)."""
    plot_history(ax, train_history["accuracy"], "train batches", smoothing=0.95)
    plot_history(ax, validation_history["accuracy"], "validation (whole set)")
    finish_axes(ax, "accuracy", steps_per_epoch, best_step)


def plot_training(train_history, validation_history, steps_per_epoch, path, best_step=None, show=False):
    """Loss panel and accuracy panel over training steps (draw_loss, draw_accuracy); saved to `path`."""
    fig, axes = new_figure(ncols=2)
    draw_loss(axes[0][0], train_history, validation_history, steps_per_epoch, best_step)
    draw_accuracy(axes[0][1], train_history, validation_history, steps_per_epoch, best_step)
    save_figure(fig, path, show)


def create_plots(trainer, name, show=False):
    """plots/<name>_plot.png: train and validation loss, and validation accuracy, over training steps."""
    plot_training(trainer.train_history, trainer.validation_history, trainer.steps_per_epoch,
                  f"plots/{name}_plot.png", trainer.best_step, show)


def steps_as_numbers(history):
    """{"12": value} -> {12: value}: a results file's history as the plots take it (JSON keeps keys as strings)."""
    return {int(step): value for step, value in history.items()}


def draw_ablation(ax, ablation):
    """Task 3d on `ax`: training and validation loss with and without the technique of an ablation results file
    (results/task3_ablation_<technique>.json). The run without is drawn first and dashed, in colours of its own,
    so that neither hides the other where they overlap."""
    technique = ablation["technique"].replace("_", " ")
    for label, train_colour, validation_colour, line in (("without", "tab:red", "tab:purple", "--"),
                                                         ("with", "tab:blue", "tab:green", "-")):
        histories = ablation["loss_histories"][label]
        plot_history(ax, steps_as_numbers(histories["train"]), f"train batches, {label} {technique}",
                     smoothing=0.95, color=train_colour, linestyle=line)
        plot_history(ax, steps_as_numbers(histories["validation"]), f"validation, {label} {technique}",
                     color=validation_colour, linestyle=line)
    ax.set_title(f"{ablation['model']}: with and without {technique}, seed {ablation['seed']}")
    finish_axes(ax, "cross-entropy loss", ablation["steps_per_epoch"])


def plot_ablation(ablation, path, show=False):
    """plots/task3_ablation_<technique>.png from an ablation results file (see draw_ablation)."""
    fig, axes = new_figure()
    draw_ablation(axes[0][0], ablation)
    save_figure(fig, path, show)


# ---------------------------------------------------------------- model summaries

def layer_rows(model, input_shape=(1, 3, 32, 32)):
    """One row per layer in forward order: (type, filters or units, kernel/stride/padding, output shape, parameters)."""
    rows = []

    def describe(module, inputs, output):
        size = "–"
        if isinstance(module, torch.nn.Conv2d):
            size = str(module.out_channels)
        elif isinstance(module, torch.nn.Linear):
            size = str(module.out_features)
        elif isinstance(module, torch.nn.BatchNorm2d):
            size = str(module.num_features)
        geometry = "–"
        if hasattr(module, "kernel_size"):
            k, s, p = (getattr(module, name) for name in ("kernel_size", "stride", "padding"))
            k, s, p = (v if isinstance(v, int) else v[0] for v in (k, s, p))
            geometry = f"{k}x{k} / {s} / {p}"
        rows.append((type(module).__name__, size, geometry, "x".join(map(str, output.shape[1:])),
                     sum(p.numel() for p in module.parameters(recurse=False))))

    # Leaves, and containers that ask for a row of their own (a residual addition, say): a forward hook
    # fires when a module's forward ends, so a container's row follows the rows of its contents.
    rows_of = [m for m in model.modules() if not list(m.children()) or getattr(m, "table_row", False)]
    handles = [m.register_forward_hook(describe) for m in rows_of]
    was_training = model.training
    model.eval()  # no batch-norm statistics change for a summary
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def layer_table_data(model, input_shape=(1, 3, 32, 32)):
    """(header, rows of strings) describing the model layer by layer, the parameter total last."""
    rows = layer_rows(model, input_shape)
    header = ["#", "layer", "filters / units", "kernel / stride / padding", "output (C x H x W)", "parameters"]
    body = [[str(i), kind, size, geometry, shape, f"{params:,}"]
            for i, (kind, size, geometry, shape, params) in enumerate(rows, start=1)]
    body.append(["", "total", "", "", "", f"{sum(row[4] for row in rows):,}"])
    return header, body


def layer_table(model, input_shape=(1, 3, 32, 32)):
    """The model's layers as a Markdown table, as a report describes a network, with the parameter total."""
    return markdown_table(*layer_table_data(model, input_shape))


def markdown_table(header, rows):
    """A Markdown table from a header and rows of strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
