"""A user's own training script: the Trainer as a library, ending by returning from the script.

    torchrun --standalone --nproc_per_node 2 library_use.py --config RUN.yaml [key=value ...]
    LATE_COLLECTIVE=1 torchrun ... library_use.py ...

No pipeline.cli.run_and_exit here: the interpreter tears down as after any user script, so a gloo
worker thread left behind by the trainer would abort a rank ("terminate called without an active
exception", exit -6) after the final checkpoint was saved.

LATE_COLLECTIVE=1 makes that deterministic (tests/scripts/late_collective.py's provoker inside a
trainer run): before leaving the `with` block, rank 1 joins an all-reduce over the trainer's
DeepSpeed data-parallel group a second late with the handle dropped, and an unreachable object's
finalizer holds teardown open for a second, so without the trainer's clean close the collective's
tensors are released by gloo's worker once teardown has begun.
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


def late_collective(rank: int) -> None:
    from deepspeed.utils import groups

    if rank == 1:
        time.sleep(1)
    # Small: it completes just as rank 1 leaves. The handle is dropped: gloo's worker holds the last reference.
    dist.all_reduce(torch.ones(2**16), group=groups._get_data_parallel_group(), async_op=True)


def main() -> None:
    args = parse_args(sys.argv[1:])
    with Trainer(load_run_config(args.config, args.overrides)) as trainer:
        trainer.fit()
        if os.environ.get("LATE_COLLECTIVE"):
            late_collective(trainer.rank)
    if os.environ.get("LATE_COLLECTIVE"):
        gc.disable()
        HoldsTeardownOpen()
    print(f"rank {trainer.rank}: script returned", flush=True)


if __name__ == "__main__":
    main()
