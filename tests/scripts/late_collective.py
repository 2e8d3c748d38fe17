"""Rank script for tests/test_cli.py: two gloo ranks whose last collective finishes while rank 1 is
already leaving the interpreter.

    torchrun --standalone --nproc_per_node 2 late_collective.py [run_and_exit|sys_exit]

Rank 1 joins the all-reduce a second late, returns from main at once, and an unreachable object's
finalizer holds interpreter teardown open for a second (GIL released), so gloo's worker releases
the collective's tensors once teardown has begun. Ending with sys.exit, rank 1 aborts with
"terminate called without an active exception" (the abort that failed CI after a real 2-rank
training had saved): 8 runs of 8 on idle 2 cores. Ending with pipeline.cli.run_and_exit: 0 of 8.
"""

from __future__ import annotations

import atexit
import gc
import sys
import time

import torch
import torch.distributed as dist


class HoldsTeardownOpen:
    def __init__(self):
        self.cycle = self  # unreachable only through a cycle: freed by teardown's own collection

    def __del__(self):
        time.sleep(1)


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        time.sleep(1)
    tensor = torch.ones(2**16)  # small: it completes just as rank 1 starts teardown (2**22 completes earlier)
    dist.all_reduce(tensor, async_op=True)  # the handle is dropped: gloo's worker holds the last reference
    gc.disable()
    HoldsTeardownOpen()
    atexit.register(print, f"rank {rank}: atexit handlers ran", flush=True)
    print(f"rank {rank}: main returned", end="")  # no newline, no flush: run_and_exit must flush it
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["sys_exit"]:
        sys.exit(main())
    from pipeline.cli import run_and_exit

    run_and_exit(main)
