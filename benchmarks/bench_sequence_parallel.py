"""Sequence parallelism on CPU: peak memory per rank and tokens/s for SP 1, 2, 4 at the same global batch.

    python benchmarks/bench_sequence_parallel.py [--nproc 4] [--seq-len 1024] [--steps 3]

Each SP size runs in its own torchrun launch of N ranks (a fresh process, so nothing of the previous
engine lingers): the trainer's own `build_model` + `deepspeed.initialize` (ZeRO-3, fp32, SDPA on CPU)
of a widened debug model, then optimizer steps of the same global batch — nproc samples of seq_len
tokens per step: SP 1 runs one sample per rank, SP N one sample per group of N ranks with N
gradient-accumulation micro-batches, so every rank handles the same tokens per step and one
micro-batch holds seq_len / N of them. Per rank it reports the resident-memory high-water mark of
the timed steps above the memory before them (activations, their gradients and the step's
temporaries; glibc is told to return freed blocks) and tokens/s; the table gives both as ratios to
SP 1 measured the same way. The goal on a GPU is memory falling close to 1/N (the SDPA mask on CPU,
[T, T+1] per layer, does not shrink; FlexAttention on CUDA has none) for a small all-to-all cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(preset="debug", n_layer=2, n_embd=512, n_head=8, n_kv_head=4, head_dim=64, intermediate_size=512,
             n_experts=4, top_k=2, sliding_window=128, vocab_size=512)


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.distributed.process_group import init_distributed
    from pipeline.planning import model_config
    from pipeline.train.config import load_run_config
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_model
    from pipeline.train.objective import compute_loss
    from pipeline.train.optim import param_groups

    sp = args.sp
    overrides = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"model.block_size={args.seq_len}", "data.train=[bench-only]", f"data.seq_len={args.seq_len}",
        "train.micro_batch_size=1", f"train.grad_accum_steps={sp}", f"parallel.sequence_parallel_size={sp}",
        "parallel.expert_parallel_size=1", "precision=fp32", "deepspeed_config=ds_configs/zero3.json"]
    run = load_run_config(None, overrides)
    view = init_distributed()
    rank, world = view.rank, view.world
    cfg = model_config(run)
    ds = build_ds_config(run, world_size=world, use_cuda=False)
    engine, *_ = deepspeed.initialize(model=(model := build_model(run, cfg, world, ds)),
                                      model_parameters=param_groups(model, 0.1), config=ds)
    g = torch.Generator().manual_seed(rank // sp)  # the ranks of an SP group share their samples

    def step():
        for _ in range(sp):
            batch = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), generator=g)
            engine.backward(compute_loss(engine, batch).total)
            engine.step()

    step()  # warm-up: optimizer state allocated, DeepSpeed's trace recorded
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - before
    tokens = args.steps * world * args.seq_len  # every rank's share of the global batch, summed
    out = torch.tensor([peak, elapsed], dtype=torch.float64)
    gathered = [torch.zeros_like(out) for _ in range(world)]
    dist.all_gather(gathered, out)
    if rank == 0:
        peaks = [int(t[0]) for t in gathered]
        seconds = max(float(t[1]) for t in gathered)
        Path(args.out).write_text(json.dumps({"sp": sp, "peak_bytes": max(peaks), "tokens_per_s": tokens / seconds}))
    dist.barrier()


def launch(nproc: int, sp: int, seq_len: int, steps: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MALLOC_MMAP_THRESHOLD_=str(2**20),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--sp", str(sp), "--seq-len", str(seq_len), "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SP {sp} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sizes = [s for s in (1, 2, 4) if args.nproc % s == 0]
    with tempfile.TemporaryDirectory() as tmp:
        results = [launch(args.nproc, sp, args.seq_len, args.steps, Path(tmp) / f"sp{sp}.json") for sp in sizes]
    base = results[0]
    print(f"sequence parallelism on {args.nproc} CPU ranks, seq_len {args.seq_len}, global batch "
          f"{args.nproc} samples per step, {args.steps} timed steps (model {MODEL})")
    print(f"{'SP':>3} {'micro-batch tokens':>18} {'peak MiB/rank':>14} {'x SP 1':>7} {'tokens/s':>10} {'x SP 1':>7}")
    for r in results:
        print(f"{r['sp']:>3} {args.seq_len // r['sp']:>18,} {r['peak_bytes'] / 2**20:>14.1f} "
              f"{r['peak_bytes'] / base['peak_bytes']:>7.2f} {r['tokens_per_s']:>10,.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}")


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
