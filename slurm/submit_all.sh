#!/bin/bash
# Every run of the assignment on a Slurm cluster, and the report once they have all ended well:
#     bash slurm/submit_all.sh [flags for every training script, e.g. --data-dir /shared/cifar10]
# Run it on the cluster's login node, from anywhere in the project. Watch with `squeue --me` and `tail -f logs/*`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v sbatch > /dev/null; then
    echo "error: sbatch is not here: run this on the cluster's login node (on your own machine, run the scripts as the README says)" >&2
    exit 2
fi
mkdir -p logs
submit() { sbatch --parsable "$@" | cut -d';' -f1; }  # the job id alone (a multi-cluster site appends ';cluster')
task2=$(submit slurm/task2.sbatch "$@")
task3=$(submit slurm/task3.sbatch "$@")
ablations=$(submit slurm/ablations.sbatch "$@")
task4a=$(submit slurm/task4a.sbatch "$@")
report=$(submit --dependency="afterok:$task2:$task3:$ablations:$task4a" slurm/report.sbatch)
echo "submitted: task2 $task2, task3 $task3 (seeds 0-2), ablations $ablations (5 techniques), task4a $task4a;"
echo "the report $report once all of them have ended well. Watch: squeue --me; logs: logs/"
