#!/usr/bin/env bash
# Train on several machines listed in a DeepSpeed hostfile; run it on the first host.
#
#   bash launch/multi_node_hostfile.sh HOSTFILE CONFIG [key=value ...]
#   bash launch/multi_node_hostfile.sh launch/hostfile.example launch/configs/gpt-oss-120b-8node.yaml
#
# HOSTFILE has one `HOST slots=GPUS` line per machine (see launch/hostfile.example); the first
# host is rank 0 and, unless MASTER_ADDR is set, the rendezvous address. CONFIG is a run config
# (pipeline/train/config.py) naming its DeepSpeed JSON in `deepspeed_config`:
# launch/configs/gpt-oss-120b-8node.yaml (8 x 8 GPUs) uses ds_configs/gpt-oss-120b.json; configs
# without the key use ds_configs/zero3.json. Every argument after CONFIG is a key=value override
# passed through to `pipeline.train`.
#
# Environment:
#   MASTER_ADDR  address every node can reach rank 0 on (default: the first host in HOSTFILE)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_LAUNCHER  deepspeed --launcher backend: pdsh (default), openmpi, mvapich, slurm, ...
#   DRY_RUN=1    print the launcher command instead of running it
#
# Requirements (DeepSpeed starts the nodes with pdsh over ssh):
#   - pdsh installed on this machine, and passwordless ssh from it to every host in HOSTFILE,
#     itself included (`ssh HOST hostname` must work without a prompt).
#   - The same repository path and the same Python (same interpreter path, same packages) on
#     every node: each node runs `cd <this repo>; <this python> -m deepspeed.launcher.launch`.
#   - Data dirs and run_dir on a filesystem shared by all nodes: every rank writes its own ZeRO
#     checkpoint shards into run_dir/checkpoints, and resuming reads all of them.
#   - Environment: only variables starting with NCCL, PYTHON, UCX, MV2 or MLFLOW are forwarded to
#     the nodes. Put anything else (FI_PROVIDER, CUDA_DEVICE_MAX_CONNECTIONS, HF_HOME, ...) as
#     KEY=VALUE lines in ~/.deepspeed_env or ./.deepspeed_env (repo root) on this machine.
#   - NCCL hints: NCCL_SOCKET_IFNAME=eth0 (or ^lo,docker0) to pick the interface nodes talk on;
#     NCCL_IB_HCA=mlx5 to choose InfiniBand adapters; NCCL_DEBUG=INFO to see which transport
#     was chosen (a "NET/Socket" line on an InfiniBand cluster means IB is not being used).
set -euo pipefail

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
HOSTFILE=$1
CONFIG=$2
shift 2
[[ -f "$HOSTFILE" ]] || { echo "error: hostfile $HOSTFILE not found" >&2; exit 2; }
[[ -f "$CONFIG" ]] || { echo "error: run config $CONFIG not found" >&2; exit 2; }
HOSTFILE=$(abspath "$HOSTFILE")
CONFIG=$(abspath "$CONFIG")

# The first host named in the hostfile (comments and blank lines skipped).
first_host() { awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$1"; }

MASTER_ADDR=${MASTER_ADDR:-$(first_host "$HOSTFILE")}
[[ -n "$MASTER_ADDR" ]] || { echo "error: no hosts in $HOSTFILE" >&2; exit 2; }

# Every node `cd`s to the directory the launcher ran in: the repo root, same path everywhere.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

CMD=(deepspeed --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}"
     --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
     --module pipeline.train --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
# Not exec: this script stays to forward Ctrl-C / SIGTERM / SIGUSR1 to the whole job (launch/run_job.sh).
source "$REPO/launch/run_job.sh"
run_job "${CMD[@]}"
