"""The job scripts in slurm/ on a real Slurm cluster of one node: munge, slurmctld and slurmd on this machine,
started by the `cluster` fixture in a folder of its own and stopped by their pids afterwards.

Each test submits the project's own job scripts, unchanged, from a copy of the project, on the tiny data set and
the CPU. The node offers three GPUs that are files (/dev/null ...), so that the scripts' --gres=gpu:1 is granted as
on a real cluster; torch finds no CUDA and trains on the CPU.

Slurm holds a requeued job for a while before it may start again (its begin time is set some two minutes ahead);
the tests move that begin time to now (`scontrol update StartTime=now`), two seconds after the requeue, rather than
wait it out.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import task3
from test_resume import assert_same, outcome

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = "slurmctld slurmd slurm-client munge"

SLURM_CONF = """\
ClusterName=tests
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# What works inside a container: processes tracked by their parents, no cgroups, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=3600
GresTypes=gpu
NodeName=localhost NodeHostname={hostname} CPUs={cpus} RealMemory=16384 Gres=gpu:3 State=UNKNOWN
PartitionName=tests Nodes=localhost Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The running cluster: its environment for Slurm's commands, and helpers to submit and follow jobs."""

    def __init__(self, env):
        self.env = env

    def command(self, *argv, cwd=None, check=True):
        done = subprocess.run(argv, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: {done.stderr}")
        return done

    def submit(self, project, script, *args, options=()):
        """sbatch from the project folder, as a student would; -> the job id."""
        return self.command("sbatch", "--parsable", *options, script, *args, cwd=project).stdout.strip()

    def job(self, job_id):
        """{field: value} of `scontrol show job` for one job (or one task of an array: "<id>_<task>")."""
        text = self.command("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def wait_for(self, job_id, states, timeout=240):
        """Wait until the job is in one of `states`. A job held back by its begin time (after a requeue) is let go
        two seconds after it was requeued: a job started again within the second of its requeue is refused by
        slurmd ("Job credential revoked"), which is what Slurm's own hold is there to prevent."""
        deadline, held_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if job["JobState"] == "PENDING" and job["Reason"] == "BeginTime":
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 2:
                    self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                    held_since = None
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not {states} after {timeout} s: {self.job(job_id)}")


def start(argv, log):
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}): as root, apt-get install {PACKAGES}")
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm runs its daemons as root: run these tests as root")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("munge", "state", "spool"):
        (root / folder).mkdir(mode=0o700)
    key = root / "munge" / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), d_port=free_port(),
                                      hostname=socket.gethostname(), cpus=os.cpu_count()))
    # Three GPUs that are plain files: the job scripts' --gres=gpu:1 is granted, up to three jobs at once.
    (root / "gres.conf").write_text("".join(f"Name=gpu File={f}\n" for f in ("/dev/null", "/dev/zero", "/dev/full")))
    env = dict(os.environ, SLURM_CONF=str(conf),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the jobs' `python`: ours
    daemons = []
    with open(root / "daemons.log", "w") as log:
        daemons.append(start(["munged", "--foreground", "--force", f"--socket={root}/munge/socket",
                              f"--key-file={key}", f"--pid-file={root}/munge/pid", f"--seed-file={root}/munge/seed",
                              f"--log-file={root}/munge/log"], log))
        for _ in range(100):
            if (root / "munge" / "socket").exists():
                break
            time.sleep(0.05)
        daemons.append(start(["slurmctld", "-D", "-f", str(conf)], log))
        daemons.append(start(["slurmd", "-D", "-f", str(conf), "-N", "localhost"], log))
    cluster = Cluster(env)
    try:
        deadline = time.monotonic() + 30
        while cluster.command("sinfo", "-h", "-o", "%T", check=False).stdout.strip() != "idle":
            if time.monotonic() > deadline:
                raise AssertionError(f"the node never came up: {(root / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield cluster
    finally:
        cluster.command("scancel", "--user=root", check=False)
        for daemon in reversed(daemons):  # slurmd, slurmctld, munged: each by the pid it was started with
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def project_copy(folder):
    """What a student's clone holds that the jobs need: the scripts, slurm/ and an empty logs/."""
    folder.mkdir()
    for script in ROOT.glob("*.py"):
        shutil.copy(script, folder)
    shutil.copytree(ROOT / "slurm", folder / "slurm")
    (folder / "logs").mkdir()
    return folder


def log_of(project):
    (log,) = (project / "logs").glob("*.log")
    return log.read_text()


def wait_for_file(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


# Long enough (16 validations, each with its checkpoint) that a requeue after the first lands mid-run.
TASK2 = ["--epochs", "8", "--batch-size", "16", "--deterministic"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pickled_dir):
    """The Task 2 job's command, run once straight through."""
    project = project_copy(tmp_path_factory.mktemp("straight") / "project")
    done = subprocess.run([sys.executable, "task2.py", "--resume", "auto", *TASK2, "--data-dir", str(pickled_dir)],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return outcome(project, "task2")


def test_a_job_requeued_mid_run_ends_as_an_uninterrupted_run(cluster, tmp_path, pickled_dir, uninterrupted):
    project = project_copy(tmp_path / "project")
    job = cluster.submit(project, "slurm/task2.sbatch", *TASK2, "--data-dir", str(pickled_dir))
    wait_for_file(project / "checkpoints/task2/last.ckpt")  # the first validation's checkpoint: mid-run
    cluster.command("scontrol", "requeue", job)  # what a preemption does: SIGTERM to the job, back into the queue
    finished = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = log_of(project)
    assert finished["JobState"] == "COMPLETED" and finished["Restarts"] == "1", log
    assert "SIGTERM at step" in log and "task2: resuming at step" in log, log
    assert log.count(f"job {job} on ") == 2  # two starts, one log
    assert_same(outcome(project, "task2"), uninterrupted)


def test_a_job_warned_before_its_time_limit_saves_requeues_itself_and_finishes(cluster, tmp_path, pickled_dir,
                                                                               uninterrupted):
    project = project_copy(tmp_path / "project")
    job = cluster.submit(project, "slurm/task2.sbatch", *TASK2, "--data-dir", str(pickled_dir))
    assert cluster.job(job)["TimeLimit"] == "00:30:00"
    wait_for_file(project / "checkpoints/task2/last.ckpt")
    # What --signal=B:USR1@120 makes Slurm send two minutes before the time limit: USR1 to the batch shell alone.
    cluster.command("scancel", "--batch", "--signal=USR1", job)
    finished = cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = log_of(project)
    assert finished["JobState"] == "COMPLETED" and finished["Restarts"] == "1", log
    first, second = log.split(f"job {job} on ")[1:]
    assert "start 1:" in first and "the command ended with exit status 143" in first
    assert f"requeueing job {job} (requeue 1 of at most 3)" in first
    assert "start 2:" in second and "task2: resuming at step" in second and "exit status 0" in second
    assert_same(outcome(project, "task2"), uninterrupted)


def test_an_array_of_three_seeds_writes_three_results_and_their_summary(cluster, tmp_path, pickled_dir):
    project = project_copy(tmp_path / "project")
    job = cluster.submit(project, "slurm/task3.sbatch", "--model", "resnet", "--epochs", "1", "--batch-size", "64",
                         "--data-dir", str(pickled_dir))
    for seed in range(3):
        assert cluster.wait_for(f"{job}_{seed}", {"COMPLETED", "FAILED", "CANCELLED"})["JobState"] == "COMPLETED"
    runs = [json.loads((project / f"results/task3_resnet_seed{seed}.json").read_text()) for seed in range(3)]
    assert [run["settings"]["seed"] for run in runs] == [0, 1, 2]
    summary = (project / "results/task3_summary.md").read_text()
    accuracies = [run["final"]["test_accuracy_tta"] for run in runs]
    assert "| resnet | 0, 1, 2 |" in summary and f"| {task3.mean_std(accuracies)} |" in summary
    assert sorted(p.name for p in (project / "logs").iterdir()) == [f"task3-{job}_{seed}.log" for seed in range(3)]


def test_ablations_started_together_train_their_reference_once_and_match_a_serial_run(cluster, tmp_path, pickled_dir,
                                                                                      monkeypatch):
    flags = ["--epochs", "1", "--batch-size", "64", "--data-dir", str(pickled_dir)]
    project = project_copy(tmp_path / "project")
    job = cluster.submit(project, "slurm/ablations.sbatch", *flags, options=["--array=0-1"])
    logs = []
    for task in range(2):
        assert cluster.wait_for(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED"})["JobState"] == "COMPLETED"
        logs.append((project / f"logs/ablations-{job}_{task}.log").read_text())
    assert sum(log.count("saved results/task3_resnet_seed0.json") for log in logs) == 1, logs  # trained once
    assert sum("task3_resnet_seed0: finished already" in log for log in logs) == 1, logs  # and reused once

    serial = tmp_path / "serial"
    serial.mkdir()
    monkeypatch.chdir(serial)
    for technique in ("augmentation", "alternating_flip"):  # the same two commands, one after the other
        task3.main(["--ablate", technique, "--resume", "auto", *flags])
    for name in ("task3_resnet_seed0", "task3_resnet_without_augmentation_seed0",
                 "task3_resnet_without_alternating_flip_seed0"):
        together, alone = (json.loads((folder / f"results/{name}.json").read_text()) for folder in (project, serial))
        for key in ("final", "train_history", "validation_history", "settings"):
            assert together[key] == alone[key], (name, key)
    assert (project / "results/task3_ablation.md").read_text() == (serial / "results/task3_ablation.md").read_text()


def test_submit_all_submits_every_run_and_the_report_after_them(cluster, tmp_path):
    project = project_copy(tmp_path / "project")
    # --epochs 0 is refused at once by every training script: the jobs end in a second, and nothing downloads.
    done = subprocess.run(["bash", "slurm/submit_all.sh", "--epochs", "0"], cwd=project, env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = dict(re.findall(r"(task2|task3|ablations|task4a|report) (\d+)", done.stdout))
    assert sorted(ids) == ["ablations", "report", "task2", "task3", "task4a"], done.stdout
    report = cluster.job(ids["report"])
    for name in ("task2", "task3", "ablations", "task4a"):
        assert f"afterok:{ids[name]}" in report["Dependency"], report
    assert cluster.job(f"{ids['task3']}_2")["ArrayTaskId"] == "2"
    assert cluster.job(f"{ids['ablations']}_4")["ArrayTaskId"] == "4"
    cluster.command("scancel", *ids.values())


@pytest.mark.parametrize("script", ["task2", "task3", "ablations", "task4a", "report"])
def test_a_job_script_run_outside_slurm_says_how_to_submit_it(tmp_path, script):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    for cwd in (ROOT, tmp_path):  # from the project folder, and from anywhere else
        done = subprocess.run(["bash", str(ROOT / f"slurm/{script}.sbatch")], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2 and done.stdout == ""
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: ") and f"sbatch slurm/{script}.sbatch" in line, line
    assert not (ROOT / "logs" / f"{script}.log").exists()


def test_submit_all_without_sbatch_says_where_to_run_it(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "dirname").symlink_to(shutil.which("dirname"))  # all the script needs before it looks for sbatch
    done = subprocess.run(["/bin/bash", str(ROOT / "slurm/submit_all.sh")], env=dict(PATH=str(bin_)),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("error: sbatch is not here: run this on the cluster's")


def test_the_ablation_array_has_one_task_per_technique():
    script = (ROOT / "slurm/ablations.sbatch").read_text()
    techniques = re.search(r"^techniques=\((.*)\)", script, flags=re.M).group(1).split()
    assert techniques == list(task3.TECHNIQUES)
    assert f"#SBATCH --array=0-{len(techniques) - 1}" in script
