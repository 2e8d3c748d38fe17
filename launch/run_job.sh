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
    set -m  # the next background job gets its own process group
    "$@" &
    local job=$! rc=0 sig
    set +m
    INTERRUPTED=0
    STOP_SIGNAL=
    for sig in INT TERM USR1 HUP; do
        # shellcheck disable=SC2064  # expand $job and $sig now
        trap "kill -s $sig -- -$job 2>/dev/null || true; [[ $sig != INT ]] || INTERRUPTED=1; STOP_SIGNAL=\${STOP_SIGNAL:-$sig}" "$sig"
    done
    while :; do
        wait "$job" && rc=0 || rc=$?
        kill -0 "$job" 2>/dev/null || break  # wait also returns when a trapped signal arrives
    done
    while kill -0 -- "-$job" 2>/dev/null; do sleep 0.5; done  # ranks still writing their checkpoint
    # After Ctrl-C the job checkpointed and exited 0; a calling script (quickstart.sh) must stop too.
    [[ "$rc" != 0 || "$INTERRUPTED" == 0 ]] || rc=130
    return "$rc"
}
