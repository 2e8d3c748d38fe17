"""Cost of the hang watchdog's heartbeats, against the cheapest collective a step already does.

    python benchmarks/bench_heartbeat.py [--nproc 2] [--beats 2000]

Starts N CPU ranks (torchrun, gloo) with the watchdog on (pipeline/distributed/hang_watchdog.py) and
times, on every rank: one heartbeat (`HangWatchdog.beat`, noted in the process), one poll's store
traffic (a TCP probe, the beat's store set, the verdict check: once per `poll_s`, <= 2 s, not per
step) and one all-reduce of one float (what `health.agree` does once per step). The trainer beats
about three times per step. Prints the mean of each on the slowest rank and the ratio of a step's
beats to that one all-reduce.
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
        polls = max(beats // 50, 5)  # wall time, mostly waiting (the watch thread's, not the training thread's)
        start = time.perf_counter()
        for i in range(polls):
            watchdog.beat("step", 10**6 + i)
            watchdog._store_reachable()
            watchdog._send_beat()
            watchdog.store.check(["verdict"])
        poll_s = (time.perf_counter() - start) / polls
        start = time.perf_counter()
        for _ in range(beats):
            all_reduce_sum_(t)
        reduce_s = (time.perf_counter() - start) / beats
        watchdog.stop()
    times = gather_objects((beat_s, poll_s, reduce_s))
    if ranks.rank == 0:
        beat_s, poll_s, reduce_s = (max(t[i] for t in times) for i in range(3))
        print(f"heartbeat: {beat_s * 1e6:.1f} us   one poll's store traffic: {poll_s * 1e6:.1f} us   "
              f"one-float all-reduce: {reduce_s * 1e6:.1f} us")
        print(f"{BEATS_PER_STEP} beats per step / one all-reduce: {BEATS_PER_STEP * beat_s / reduce_s:.3f}x; "
              f"one poll (watch thread, every <= 2 s) / one all-reduce: {poll_s / reduce_s:.2f}x")


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
