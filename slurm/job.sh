# What the job scripts in slurm/ share; each sources it from the project folder after its #SBATCH lines.
#
# `run COMMAND...` runs the command in the background and waits for it, so that this shell can act on signals:
#   USR1, the warning that --signal=B:USR1@120 asks Slurm for two minutes before the time limit: the command is
#         told to stop (SIGTERM: the training ends its step, saves its checkpoint and exits), and then this job
#         requeues itself, at most MAX_REQUEUES times. Started again, the same command (--resume auto) continues
#         the run from its checkpoint.
#   TERM, sent by Slurm to the whole job on a preemption, a requeue (scontrol requeue) or a cancel (scancel): the
#         command saves and stops the same way. Slurm itself puts a preempted or requeued job back in the queue.
# The log (--output, --open-mode=append) gains a line at each start and each stop.

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: this is a Slurm job script: submit it from the project folder with 'sbatch slurm/${0##*/}' (every run of the assignment at once: bash slurm/submit_all.sh)" >&2
    exit 2
fi

if [ -x .venv/bin/python ]; then  # the project's environment (README, Set-up), where there is one
    PATH="$PWD/.venv/bin:$PATH"
fi
MAX_REQUEUES=${MAX_REQUEUES:-3}  # a job that reaches its time limit more often than this stops for good
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
job=${job:-$SLURM_JOB_ID}  # the name to requeue: <array job>_<task> for a task of an array
restarts=${SLURM_RESTART_COUNT:-0}

run() {
    echo "== $(date '+%F %T') job $job on $(hostname), start $((restarts + 1)): $*"
    warned=0
    trap 'warned=1; kill -TERM "$child" 2>/dev/null' USR1
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    "$@" &
    child=$!
    while true; do  # a trapped signal ends `wait` early: wait again until the command itself has ended
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    trap - USR1 TERM
    echo "== $(date '+%F %T') job $job: the command ended with exit status $status"
    if [ "$warned" = 1 ] && [ "$status" = 143 ]; then  # 143: stopped by SIGTERM, its checkpoint saved
        if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
            echo "== the time limit is near and the run is saved: requeueing job $job (requeue $((restarts + 1)) of at most $MAX_REQUEUES)"
            if scontrol requeue "$job"; then
                # Slurm now ends this job itself, as part of the requeue. Ending it first, with the run's exit
                # status, could get it counted as failed (or done), and its dependants let go, before the requeue.
                sleep 600 &
                wait
            fi
        else
            echo "== the time limit is near again, after $restarts requeues: not requeued; submit the job again to continue"
        fi
    fi
    return "$status"
}
