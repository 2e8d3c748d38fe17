#!/usr/bin/env bash
# Sourced by the launch scripts: `run_job CMD...` runs the training job so that no signal is lost.
#
# - The job (the deepspeed / torchrun launcher and its ranks) runs in a process group of its own;
#   SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGHUP sent to this script are forwarded to that whole
#   group, so every rank gets the signal once, checkpoints at an agreed step and exits. The script
#   waits until every process of the job is gone and exits with the launcher's code (130 after a
#   Ctrl-C, so that a calling script stops too).
# - If this script dies without a chance to forward (SIGKILL), the ranks notice within a second:
#   its pid is in PIPELINE_LAUNCHER_PIDS, which every rank watches (pipeline/train/stop_signal.py).
# - RESTARTS=N (N > 0): supervised: a job that fails (not a user error, exit 2) is started again up
#   to N times, each restart logged to the console and RUN/supervise.log (pipeline/supervise.py;
#   RESTART_BACKOFF_S sets the first wait, default 10 s, doubled each time).
# - STOP_SIGNAL holds the name of the first signal forwarded (launch/slurm.sbatch requeues on USR1).
run_job() {
    if [[ "${RESTARTS:-0}" != 0 ]]; then
        set -- python -m pipeline.supervise --restarts "$RESTARTS" -- "$@"
    fi
    export PIPELINE_LAUNCHER_PIDS="$$${PIPELINE_LAUNCHER_PIDS:+ $PIPELINE_LAUNCHER_PIDS}"
    INTERRUPTED=0
    STOP_SIGNAL=
    RUN_JOB_PID=
    local job rc=0 sig
    # Trapped before the job starts: a signal in between would otherwise end this script by default.
    for sig in INT TERM USR1 HUP; do
        # shellcheck disable=SC2064  # expand $sig now
        trap "_run_job_forward $sig" "$sig"
    done
    set -m  # the next background job gets its own process group
    "$@" &
    job=$!
    set +m
    RUN_JOB_PID=$job
    [[ -z "$STOP_SIGNAL" ]] || kill -s "$STOP_SIGNAL" -- "-$job" 2>/dev/null || true  # came while starting
    while kill -0 "$job" 2>/dev/null; do
        wait "$job" || true  # returns also when a trapped signal arrives (128 + its number)
    done
    wait "$job" && rc=0 || rc=$?  # the job's own exit code (bash keeps it after the job is reaped)
    while kill -0 -- "-$job" 2>/dev/null; do sleep 0.5; done  # ranks still writing their checkpoint
    # After Ctrl-C the job checkpointed and exited 0; a calling script (quickstart.sh) must stop too.
    [[ "$rc" != 0 || "$INTERRUPTED" == 0 ]] || rc=130
    return "$rc"
}

# The trap of run_job: forward the signal to the job's process group, note what came.
_run_job_forward() {
    [[ $1 != INT ]] || INTERRUPTED=1
    STOP_SIGNAL=${STOP_SIGNAL:-$1}
    [[ -z "$RUN_JOB_PID" ]] || kill -s "$1" -- "-$RUN_JOB_PID" 2>/dev/null || true
}
