"""Cost of in-loop downstream evaluation, relative to a training step of the same run.

    python benchmarks/bench_downstream.py [--data DIR] [--steps 20] [--interval 10] [--nproc 2]

Trains the quickstart recipe (debug preset, ZeRO-3, expert parallelism over 2 ranks, activation
checkpointing, bf16) under torchrun with `eval.tasks=[pycode_tiny]` (the shipped 40-item
multiple-choice task: 32 questions x 4 choices = 128 requests, 0-shot) every `--interval` steps, and
prints the seconds each evaluation took (`downstream/seconds` in metrics.jsonl, harness and all
forwards) against the median seconds of a training step (from `perf/tokens_per_s`). Without --data
it tokenizes a small corpus of Python stdlib sources into a temp dir first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_train import prepare_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="questions per evaluation (default: all 32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else prepare_corpus(tmp / "data")
        run_dir = tmp / "run"
        overrides = [f"run_dir={run_dir}", f"data.train=[{data}]", f"train.steps={args.steps}",
                     "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=0", "train.save_interval=0",
                     f"eval.downstream_interval={args.interval}"]
        if args.limit:
            overrides.append(f"eval.limit={args.limit}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "pipeline.train", "--config", str(REPO_ROOT / "launch/configs/quickstart.yaml"), *overrides]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 8 * args.nproc * 128  # quickstart: micro-batch 8 x seq 128 per rank
    step_s = statistics.median(tokens_per_step / r["perf/tokens_per_s"] for r in records[2:]
                               if "perf/tokens_per_s" in r)
    evals = [(r["step"], r["downstream/seconds"], r["downstream/pycode_tiny/acc"]) for r in records
             if "downstream/seconds" in r]
    print(f"training step (median): {step_s:.3f} s")
    for step, seconds, acc in evals:
        print(f"downstream eval at step {step}: {seconds:.2f} s = {seconds / step_s:.1f} training steps "
              f"(pycode_tiny acc {acc:.3f})")


if __name__ == "__main__":
    main()
