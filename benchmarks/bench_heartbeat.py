"""Cost of the hang watchdog's heartbeats, against the cheapest collective a step already does.

    python benchmarks/bench_heartbeat.py [--nproc 2] [--beats 2000]

Starts N CPU ranks (torchrun, gloo) with the watchdog on (pipeline/distributed/hang_watchdog.py) and
times, on every rank: one heartbeat (`HangWatchdog.beat`: one set on the rendezvous store) and one
all-reduce of one float (what `health.agree` does once per step). The trainer beats about three
times per step (step, forward, plus eval / save when they run). Prints the mean of each on the
slowest rank and the ratio of a step's beats to that one all-reduce.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BEATS_PER_STEP = 3


def rank_main(beats: int) -> None:
    import torch

    from pipeline.distributed.collectives import all_reduce_sum_, gather_objects
    from pipeline.distributed.hang_policy import HangPolicy
    from pipeline.distributed.hang_watchdog import HangWatchdog
    from pipeline.distributed.process_group import init_distributed

    ranks = init_distributed()
    with tempfile.TemporaryDirectory() as run_dir:
        watchdog = HangWatchdog(HangPolicy.of(600), ranks, Path(run_dir))
        t = torch.zeros(1)
        for _ in range(100):  # warm-up
            all_reduce_sum_(t)
            watchdog.beat("step", 1)
        start = time.perf_counter()
        for i in range(beats):
            watchdog.beat("step" if i % 2 else "forward", 2 + i)
        beat_s = (time.perf_counter() - start) / beats
        start = time.perf_counter()
        for _ in range(beats):
            all_reduce_sum_(t)
        reduce_s = (time.perf_counter() - start) / beats
        watchdog.stop()
    times = gather_objects((beat_s, reduce_s))
    if ranks.rank == 0:
        beat_s, reduce_s = max(b for b, _ in times), max(r for _, r in times)
        print(f"heartbeat (store set): {beat_s * 1e6:8.1f} us   one-float all-reduce: {reduce_s * 1e6:8.1f} us")
        print(f"{BEATS_PER_STEP} beats per step / one all-reduce: {BEATS_PER_STEP * beat_s / reduce_s:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--beats", type=int, default=2000)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        from pipeline.cli import run_and_exit

        run_and_exit(lambda: rank_main(args.beats))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    __file__, "--rank", "--beats", str(args.beats)], env=env, cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    main()
