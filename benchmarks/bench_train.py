"""Trainer throughput: N-rank DeepSpeed ZeRO-3 + expert parallelism vs one plain-PyTorch process.

    python benchmarks/bench_train.py [--data DIR] [--steps 30] [--nproc 2] [--ep 2]

Both sides train the same model (debug preset widened to n_embd 256) from the same init on the same
samples with the same optimizer and schedule: the trainer runs under torchrun and reports
`perf/tokens_per_s` in RUN/metrics.jsonl; the baseline is `plain_train_step` in this process, fed
each rank's micro-batch in turn (the same global batch and the same matmul shapes). It runs with
and without activation checkpointing, skips the first log intervals as warm-up, and prints tokens/s,
model TFLOP/s (and MFU on a GPU with a known peak), the ratio, and the largest loss difference
between the two runs (fp32: ~1e-6 means they computed the same thing). Rates are the median over
log intervals, so a burst of load from other processes on a shared machine moves them little;
--repeats R alternates the runs R times and keeps the best of each (for busy machines).

On CPU both sides share the same cores (ranks get cores / N threads each, the baseline all of them),
so a ratio of 1.0 would mean distribution costs nothing; on N GPUs the ideal is N. Without --data
it tokenizes a small corpus of Python stdlib sources into a temp dir first (~2 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipeline.data import MicroBatchIterator, build_dataset
from pipeline.hardware import detect_peak_tflops
from pipeline.model.flops import flops_per_token
from pipeline.train.config import load_run_config, resolve_model_config
from pipeline.train.engine import build_model
from pipeline.train.optim import lr_at, make_torch_adamw
from pipeline.train.single_process import plain_train_step

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(preset="debug", n_layer=4, n_embd=256, n_head=8, n_kv_head=2, head_dim=32, intermediate_size=256,
             n_experts=8, top_k=2, sliding_window=64)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_corpus(out: Path) -> Path:
    """~200k tokens of stdlib Python (json, email), SentencePiece BPE 512, like the tests' corpus."""
    std = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(std / pkg / "*.py") for pkg in ("json", "email")]
    cmd = [sys.executable, "-m", "pipeline.prepare", "--input", *inputs, "--output", str(out),
           "--train-tokenizer", "bpe", "--vocab-size", "512", "--valid-fraction", "0.05", "--no-progress"]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    return out


def write_config(path: Path, data: Path, args, checkpointing: bool) -> Path:
    cfg = {
        "run_dir": str(path.parent / "run"),
        "model": {**MODEL, "block_size": args.seq_len},
        "data": {"train": [str(data)], "seq_len": args.seq_len},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5},
        "train": {"steps": args.steps, "micro_batch_size": args.micro_batch, "log_interval": args.log_interval,
                  "eval_interval": 0, "eval_iters": 0, "save_interval": args.steps + 1, "seed": 7},
        "parallel": {"expert_parallel_size": args.ep, "activation_checkpointing": checkpointing},
        "precision": "fp32",
        "tensorboard": False,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_trainer(config: Path, args) -> list[dict]:
    """torchrun --standalone; returns the per-log-interval records of RUN/metrics.jsonl."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, args.threads // args.nproc))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pipeline.train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        sys.exit(f"trainer failed ({proc.returncode}):\n{tail}\n" + "\n".join(errors))
    lines = (config.parent / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "perf/tokens_per_s" in r]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize_trainer(records: list[dict], skip_intervals: int) -> dict:
    # The median log interval: robust to other processes briefly taking the cores.
    kept = records[skip_intervals:]
    mfu = [r["perf/mfu"] for r in kept if "perf/mfu" in r]
    return {"tokens_per_s": median([r["perf/tokens_per_s"] for r in kept]),
            "tflops_per_rank": median([r["perf/model_tflops_per_rank"] for r in kept]),
            "mfu": median(mfu) if mfu else None, "loss": {r["step"]: r["loss/total"] for r in records}}


def run_plain(config: Path, args) -> dict:
    """The same run in this process with plain PyTorch; timed per step after the warm-up steps."""
    cfg = load_run_config(config, ["parallel.expert_parallel_size=1"])
    model_cfg = resolve_model_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, model_cfg, world=1).to(device)  # same seed, init and checkpointing
    optimizer = make_torch_adamw(model, cfg.optim)
    data = build_dataset(cfg.data.train, "train", cfg.data.seq_len, cfg.data.seed)
    ranks = [MicroBatchIterator(data, cfg.train.micro_batch_size, r, args.nproc, 0) for r in range(args.nproc)]
    losses, seconds = [], []
    for step in range(cfg.train.steps):
        micro = [it.next().to(device) for it in ranks]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = plain_train_step(model, optimizer, micro, lr_at(step, cfg.optim, cfg.train.steps), cfg.optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(out["total"])
    # Per log interval, as the trainer measures: its mean loss (logged at its last step) and its rate.
    n, tokens_per_step = args.log_interval, args.nproc * cfg.train.micro_batch_size * cfg.data.seq_len
    intervals = [range(i, min(i + n, len(losses))) for i in range(0, len(losses), n)]
    loss = {w[-1] + 1: sum(losses[s] for s in w) / len(w) for w in intervals}
    rates = [tokens_per_step * len(w) / sum(seconds[s] for s in w) for w in intervals[args.skip_intervals :]]
    tokens_per_s = median(rates)
    tflops = tokens_per_s * flops_per_token(model_cfg, cfg.data.seq_len)["total"] / 1e12
    peak = detect_peak_tflops()
    return {"tokens_per_s": tokens_per_s, "tflops_per_rank": tflops, "mfu": tflops / peak if peak else None,
            "loss": loss}


def add_trainer_run_args(parser: argparse.ArgumentParser, steps: int, repeats: int) -> argparse.ArgumentParser:
    """The arguments of a benchmark that times real trainer runs (here and bench_verify.py)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--skip-intervals", type=int, default=1, help="log intervals dropped as warm-up")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=repeats, help="run everything R times, keep the best of each")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="CPU threads in all (split over ranks)")
    return parser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prepared data dir (default: tokenize stdlib sources)")
    args = add_trainer_run_args(parser, steps=30, repeats=1).parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        data = args.data or prepare_corpus(tmp / "data")
        results = {}
        for repeat in range(args.repeats):
            for ckpt in (False, True):
                config = write_config(tmp / f"r{repeat}ckpt{int(ckpt)}" / "run.yaml", data, args, ckpt)
                trainer = summarize_trainer(run_trainer(config, args), args.skip_intervals)
                for name, r in (("plain", run_plain(config, args)), ("ds", trainer)):
                    if (ckpt, name) not in results or r["tokens_per_s"] > results[ckpt, name]["tokens_per_s"]:
                        results[ckpt, name] = r
            model_cfg = resolve_model_config(load_run_config(config))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    tokens_per_step = args.nproc * args.micro_batch * args.seq_len
    mflop = flops_per_token(model_cfg, args.seq_len)["total"] / 1e6
    print(f"model: debug preset, n_layer {model_cfg.n_layer}, n_embd {model_cfg.n_embd}, {model_cfg.n_experts} "
          f"experts top-{model_cfg.top_k}, {mflop:.1f} MFLOP/token; fp32; {device}")
    print(f"global batch {args.nproc} x {args.micro_batch} x {args.seq_len} = {tokens_per_step:,} tokens/step, "
          f"{args.steps} steps; median of {args.log_interval}-step intervals after the first "
          f"{args.skip_intervals * args.log_interval} steps\n")
    header = f"{'activation ckpt':<16}{'run':<34}{'tokens/s':>10}{'TFLOP/s/rank':>14}{'MFU':>8}{'max |dloss|':>13}"
    print(header)
    print("-" * len(header))
    ranks = f"ZeRO-3 + EP{args.ep}, {args.nproc} ranks x {max(1, args.threads // args.nproc)} thr"
    for ckpt in (False, True):
        plain, ds = results[ckpt, "plain"], results[ckpt, "ds"]
        diff = max(abs(ds["loss"][s] - plain["loss"][s]) for s in ds["loss"])
        for name, r, d in ((f"plain PyTorch, 1 proc x {args.threads} thr", plain, ""), (ranks, ds, f"{diff:.1e}")):
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{'on' if ckpt else 'off':<16}{name:<34}{r['tokens_per_s']:>10,.0f}{r['tflops_per_rank']:>14.4f}"
                  f"{mfu:>8}{d:>13}")
    print()
    for ckpt in (False, True):
        ratio = results[ckpt, "ds"]["tokens_per_s"] / results[ckpt, "plain"]["tokens_per_s"]
        print(f"ratio DeepSpeed / plain, activation checkpointing {'on ' if ckpt else 'off'}: {ratio:.2f}x")
    for name in ("plain", "ds"):
        cost = results[True, name]["tokens_per_s"] / results[False, name]["tokens_per_s"]
        print(f"activation checkpointing on/off, {'plain' if name == 'plain' else 'DeepSpeed'}: {cost:.2f}x")


if __name__ == "__main__":
    main()
