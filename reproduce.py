"""Every measurement of records/<device>/ in one call: the test suite, Task 2, Task 3 (both models, seeds 0-2), the
ablations, Task 4a at 224 and 112 pixels, benchmark.py, and Task 2 and Task 3 under each speed option; then one
archive of all their results, tables and logs.

    python reproduce.py --data-dir data/cifar10-jpeg                    # everything, on the fastest device here
    python reproduce.py --data-dir data/cifar10-jpeg --only task2 options
    python reproduce.py --smoke --data-dir DIR --skip tests             # each step's first command, tiny: a check
                                                                        # (one epoch, seed 0, resnet, 32-pixel 4a)
Each step runs its script as a user would (`python task3.py ...`), in a folder of its own under
reproduce/<device>/, with its output in logs/<step>.log there. A step that finished is not run again: called
again (on a machine lent for a few minutes, say), the script goes on with the steps left, and a training step
that was stopped midway continues from its checkpoint (--resume auto). After every step the archive
reproduce/<device>.tar.gz is made anew (checkpoints left out), so that what is done is never lost.
"""
import argparse
import importlib.util
import json
import pathlib
import platform
import re
import subprocess
import sys
import tarfile
import time

import torch

import task3
import utils

REPO = pathlib.Path(__file__).resolve().parent
OPTIONS = {  # the speed options compared on Task 2 and Task 3 (the defaults are the runs of the steps task2, task3)
    "float32": ["--precision", "float32"],
    "float16": ["--precision", "float16"],  # with the gradient scaler: a T4's default, measured on any GPU
    "nchw": ["--no-channels-last"],
    "compile": ["--compile"],
}
TASK3_OPTIONS = {"batch1024": ["--batch-size", "1024"]}  # the recipe's rates are per 1024 images: same schedule


def steps(data, smoke):
    """{step: [(work folder, command), ...]}, in the order they run. `data`: the flags every training script takes."""
    tiny = ["--epochs", "1", "--batch-size", "128"] if smoke else []
    seeds = ["0"] if smoke else ["0", "1", "2"]
    auto = [*data, "--resume", "auto"]
    parallel = ["-n", "auto", "--dist", "loadfile"] if importlib.util.find_spec("xdist") else []
    plan = {  # the test suite with pytest-xdist where it is installed, and without it where it is not
        "tests": [("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                             *parallel, str(REPO / "tests")])],
        "task2": [("task2", ["task2.py", *auto, *tiny])],
        "task3": [("task3", ["task3.py", "--seeds", *seeds, *auto, *tiny, *(["--model", "resnet"] if smoke else [])])],
        # In task3's folder: the ablations' reference is the resnet run of seed 0 that the step task3 trained.
        "ablations": [("task3", ["task3.py", "--ablate", technique, *auto, *tiny]) for technique in task3.TECHNIQUES],
        "task4a": [(f"task4a_{size}", ["task4a.py", "--no-pretrained", "--image-size", str(32 if smoke else size),
                                       *auto, *tiny]) for size in (224, 112)],
        "benchmark": [("benchmark", ["benchmark.py", *data, "--out", "benchmark.md", *(
            ["--steps", "2", "--warmup-steps", "1", "--repeats", "1", "--pipeline-batches", "2", "--full-run-epochs",
             "1", "--workers", "0", "--levers", "channels_last", "--models", "task2"] if smoke else [])])],
        "options": [],
    }
    options = {name: flags for name, flags in OPTIONS.items() if not (smoke and name == "compile")}  # minutes
    for name, flags in options.items():
        plan["options"].append((f"options/task2_{name}", ["task2.py", *auto, *tiny, *flags]))
    for model in task3.MODELS:
        for name, flags in {**options, **TASK3_OPTIONS}.items():
            plan["options"].append((f"options/task3_{model}_{name}",
                                    ["task3.py", "--model", model, "--seeds", "0", *auto, *tiny, *flags]))
    return plan


def device_name(device):
    """'nvidia-h200', 'cpu-amd-epyc': the folder name of a device's records."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}-{cpu_model() or platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_model():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")


def in_a_process(argv, cwd, log):
    """Run `argv` in a process of its own, its output into the open file `log` -> its exit status."""
    return subprocess.run(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode


def run_step(name, commands, work, device_flags, run=in_a_process):
    """Run a step's commands in order, each in its folder, the output appended to logs/<name>.log -> exit status."""
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        for folder, command in commands:
            cwd = work / folder
            cwd.mkdir(parents=True, exist_ok=True)
            argv = command if name == "tests" else [sys.executable, str(REPO / command[0]), *command[1:],
                                                    *device_flags]
            log.write(f"== {time.strftime('%F %T')} in {cwd.relative_to(work)}: {' '.join(argv)}\n")
            log.flush()
            status = run(argv, REPO if name == "tests" else cwd, log)
            if status != 0:
                return status
    return 0


def options_table(work):
    """(header, rows): each Task 2 and Task 3 run against its speed option, from the results files under work/."""
    rows = []
    for path in sorted(work.glob("**/results/*.json")):
        if not re.fullmatch(r"task2|task3_[a-z]+_seed0", path.stem):  # seed 0 of the full recipes only
            continue
        results = json.loads(path.read_text())
        folder = path.parent.parent  # options/task3_vgg_float32, or the step's own folder (the defaults)
        option = folder.name.rsplit("_", 1)[1] if folder.parent.name == "options" else "default"
        images = results["dataset_sizes"]["train"] * results["epochs_run"]
        final = results["final"]
        accuracy = final.get("test_accuracy_tta", final["test_accuracy"])
        rows.append([results["name"], option, results["settings"]["precision"],
                     str(results["settings"]["channels_last"]), str(results["settings"]["batch_size"]),
                     str(results["settings"]["compiled"]), f"{images / results['train_time_s']:,.0f}",
                     f"{results['train_time_s']:.1f}", f"{accuracy:.4f}"])
    header = ["run", "option", "precision", "channels-last", "batch", "compiled", "train images/s", "train s",
              "test accuracy (TTA where measured)"]
    return header, rows


def pack(work):
    """work/../<device>.tar.gz: everything under work but checkpoints."""
    archive = work.with_suffix(".tar.gz")
    with utils.atomic_file(archive, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        tar.add(work, arcname=work.name, filter=lambda info: None if "/checkpoints" in info.name else info)
    return archive


def main(argv=(), run=in_a_process):
    """Run the steps not finished yet, record each, pack the archive; `argv` as on the command line. `run` runs one
    command (in_a_process: as a user would)."""
    parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--data-dir", default="data/cifar10", help="CIFAR-10, as for the task scripts")
    parser.add_argument("--data-archive", default=None,
                        help="a .tar.gz of CIFAR-10 to unpack into --data-dir first, where that folder is missing")
    parser.add_argument("--device", default=None, help="cuda, cuda:N, mps or cpu; default: the fastest here")
    parser.add_argument("--only", nargs="+", choices=list(steps([], False)), default=None, help="run these steps")
    parser.add_argument("--skip", nargs="+", choices=list(steps([], False)), default=[], help="leave these out")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings (one epoch, batches of 64, 32-pixel Task 4a, no compile): checks the "
                             "script, measures nothing")
    parser.add_argument("--output", default="reproduce", help="the folder of the devices' work folders")
    args = parser.parse_args(argv)
    data_dir = pathlib.Path(args.data_dir)
    if args.data_archive and not data_dir.exists():
        utils.unpack_archive(args.data_archive, data_dir)
    device = utils.get_device(args.device)
    work = pathlib.Path(args.output) / (device_name(device) + ("-smoke" if args.smoke else ""))
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = work / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else dict(steps={})
    manifest.update(device=utils.describe_device(device), torch=torch.__version__, python=platform.python_version(),
                    data_dir=str(data_dir.resolve()), smoke=args.smoke)
    device_flags = ["--device", args.device] if args.device else []
    plan = steps(["--data-dir", str(data_dir.resolve())], args.smoke)
    if args.smoke:  # each step's first command
        plan = {name: commands[:1] for name, commands in plan.items()}
    chosen = [name for name in plan if (args.only is None or name in args.only) and name not in args.skip]
    for name in chosen:
        if manifest["steps"].get(name, {}).get("exit_status") == 0:
            print(f"{name}: done before (logs/{name}.log)")
            continue
        print(f"{name}: running ({len(plan[name])} command(s)); output in {work / 'logs' / (name + '.log')}")
        start = time.perf_counter()
        status = run_step(name, plan[name], work, device_flags, run)
        manifest["steps"][name] = dict(commands=[" ".join(command) for _, command in plan[name]],
                                       exit_status=status, wall_time_s=round(time.perf_counter() - start, 1),
                                       finished=time.strftime("%F %T"))
        if name in ("task2", "task3", "options"):
            utils.save_text(utils.markdown_table(*options_table(work)) + "\n", work / "options.md")
        utils.save_json(manifest, manifest_path)
        archive = pack(work)
        print(f"{name}: exit status {status} in {manifest['steps'][name]['wall_time_s']} s; packed {archive}")
    failed = [name for name in chosen if manifest["steps"].get(name, {}).get("exit_status") != 0]
    if failed:
        raise utils.UserError(f"steps that failed: {', '.join(failed)}; their logs are in '{work / 'logs'}'; "
                              "run the same command again to retry them (finished steps are kept)")
    return work


if __name__ == "__main__":
    utils.run_cli(main)
