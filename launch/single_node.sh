#!/usr/bin/env bash
# Train on one machine: one rank per GPU, or NPROC CPU ranks (gloo) on a machine with no GPU.
#
#   bash launch/single_node.sh CONFIG [key=value ...]
#   bash launch/single_node.sh launch/configs/gpt-oss-20b-1node.yaml train.steps=100
#   NPROC=2 bash launch/single_node.sh run.yaml train.steps=3      # CPU: 2 ranks
#
# CONFIG is a run config (pipeline/train/config.py) that names its DeepSpeed JSON in
# `deepspeed_config`: launch/configs/gpt-oss-20b-1node.yaml (8 GPUs) uses ds_configs/gpt-oss-20b.json;
# configs without the key use ds_configs/zero3.json (also: zero2.json, zero3_offload.json).
# Every argument after CONFIG is a key=value override passed through to `pipeline.train`.
#
# Environment:
#   NPROC        ranks to start (default: the GPU count from `nvidia-smi -L`, or the GPUs listed in
#                CUDA_VISIBLE_DEVICES when it is set; 2 CPU ranks on a machine with no GPU)
#   MASTER_PORT  rendezvous port (default 29500; change it to run two jobs on one machine)
#   DRY_RUN=1    print the launcher command instead of running it
#
# The script runs from the repository root, so relative paths inside CONFIG (data dirs, run_dir,
# deepspeed_config) resolve against it; a relative CONFIG path is taken from where you call it.
#
# On CPU, `deepspeed --num_gpus N` starts N ranks (DeepSpeed's CPU accelerator reports one
# device, but --num_gpus overrides the count) and passes --local_rank to each. We do not use
# --bind_cores_to_rank, which needs numactl; instead each rank gets an equal share of the cores
# through OMP_NUM_THREADS. Without the deepspeed launcher the equivalent command is
#   torchrun --standalone --nproc_per_node N -m pipeline.train --config CONFIG [key=value ...]
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG=$1
shift
[[ -f "$CONFIG" ]] || { echo "error: run config $CONFIG not found" >&2; exit 2; }
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

gpu_count() {
    # `nvidia-smi -L` prints one "GPU i: ..." line per GPU (MIG slices are indented below them).
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

GPUS=$(gpu_count)
RANK_ARGS=()
if [[ "$GPUS" -gt 0 ]]; then
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && -z "${NPROC:-}" ]]; then
        # --num_gpus would make deepspeed ignore CUDA_VISIBLE_DEVICES and use GPUs 0..N-1.
        RANK_ARGS=(--include "localhost:$CUDA_VISIBLE_DEVICES")
    else
        RANK_ARGS=(--num_gpus "${NPROC:-$GPUS}")
    fi
else
    NPROC=${NPROC:-2}
    RANK_ARGS=(--num_gpus "$NPROC")
    # Without a cap every rank starts one thread per core and N ranks fight over the same cores.
    CORES=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
fi

CMD=(deepspeed "${RANK_ARGS[@]}" --master_port "${MASTER_PORT:-29500}"
     --module pipeline.train --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
# Not exec: this script stays to forward Ctrl-C / SIGTERM / SIGUSR1 to the whole job (launch/run_job.sh).
source "$REPO/launch/run_job.sh"
run_job "${CMD[@]}"
