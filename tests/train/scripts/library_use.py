"""Rank script for tests/train/test_library_use.py, written as a user's own training script: the
Trainer as a library, ending by returning from the script (so, unlike the other rank scripts, not
through pipeline.cli.run_and_exit).

    torchrun --standalone --nproc_per_node 2 library_use.py --config RUN.yaml [key=value ...]
    LATE_COLLECTIVE=1 torchrun ... library_use.py ...

The interpreter tears down as after any user script, so a gloo
worker thread left behind by the trainer would abort a rank ("terminate called without an active
exception", exit -6) after the final checkpoint was saved.

LATE_COLLECTIVE=1 makes that deterministic: before leaving the `with` block each rank starts an
all-reduce over the engine's data-parallel group and drops the handle (gloo's worker holds the last
reference), rank 0 a second late. Rank 1 then keeps the GIL (no thread switch) until the all-reduce
has finished, so the worker's release of its tensors waits for the GIL, and an unreachable object's
finalizer releases the GIL only once teardown has begun: without a clean close, rank 1 aborts every
time (tests/scripts/late_collective.py does the same to a bare process group).
"""

import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from pipeline.train.__main__ import parse_args
from pipeline.train.config import load_run_config
from pipeline.train.trainer import Trainer


class HoldsTeardownOpen:
    def __init__(self):
        self.cycle = self  # unreachable only through a cycle: freed by teardown's own collection

    def __del__(self):
        time.sleep(1)


def start_late_collective(trainer: Trainer) -> float:
    """Returns when rank 1 may let go of the GIL (the all-reduce has finished by then)."""
    if trainer.rank == 0:
        time.sleep(1)
    dist.all_reduce(torch.ones(2**16), group=trainer.engine.data_parallel_group, async_op=True)
    return time.perf_counter() + 2


def hold_gil_until(deadline: float) -> None:
    sys.setswitchinterval(1000)
    while time.perf_counter() < deadline:
        pass
    gc.disable()
    HoldsTeardownOpen()


def main() -> None:
    args = parse_args(sys.argv[1:])
    late = bool(os.environ.get("LATE_COLLECTIVE"))
    with Trainer(load_run_config(args.config, args.overrides)) as trainer:
        trainer.fit()
        deadline = start_late_collective(trainer) if late else 0.0
    print(f"rank {trainer.rank}: script returned", flush=True)
    if late and trainer.rank == 1:
        hold_gil_until(deadline)  # last: writing to a stream would let the worker have the GIL


if __name__ == "__main__":
    main()
