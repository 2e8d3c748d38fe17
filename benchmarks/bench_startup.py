"""Start-up peak host memory per rank: partitioned start-up vs materialising the whole share first.

    python benchmarks/bench_startup.py [--nproc 4] [--ep 2] [--n-embd 512] [--n-layer 8] [--n-experts 16]

Runs `build_model` on N CPU ranks (torchrun, gloo), in fresh ranks for each way: with the ZeRO-3
DeepSpeed config (each module materialised, seeded and partitioned in turn) and without it (the
ZeRO-2 path: the rank's whole share in fp32). Each rank builds once to warm up, returns freed heap
to the OS, resets the kernel's RSS high-water mark and reports the peak above its RSS before the
second build. Prints both per rank, their ratio, and the planner's figures for the same layout.
With glibc's default (dynamic) mmap threshold the freed module-sized buffers of the partitioned
build fragment the heap and the peak varies by rank; --fixed-mmap-threshold shows the live memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipeline, not an installed one


def overrides(args) -> list[str]:
    return ["model.preset=debug", f"model.n_embd={args.n_embd}", f"model.intermediate_size={2 * args.n_embd}",
            f"model.n_layer={args.n_layer}", f"model.n_experts={args.n_experts}", "data.train=[unused]",
            "precision=bf16", "deepspeed_config=ds_configs/zero3.json", f"parallel.expert_parallel_size={args.ep}"]


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS before a build is what is live."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rank_main(args) -> None:
    from pipeline.distributed.process_group import init_distributed
    from pipeline.planning import model_config
    from pipeline.train.config import load_run_config
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_model

    run = load_run_config(None, overrides(args))
    view = init_distributed()
    rank, world = view.rank, view.world
    cfg = model_config(run)
    ds = build_ds_config(run, world_size=world, use_cuda=False) if args.mode == "partitioned" else None
    model = build_model(run, cfg, world, ds)  # warm-up: imports, expert groups, first zero.Init
    del model
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    build_model(run, cfg, world, ds)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps((_kib("VmHWM") - before) * 1024))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-experts", type=int, default=16)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--fixed-mmap-threshold", action="store_true",
                   help="MALLOC_MMAP_THRESHOLD_=1MiB: glibc returns freed module buffers instead of keeping them")
    args = p.parse_args()
    if "LOCAL_RANK" in os.environ:
        return rank_main(args)

    from pipeline.planning import Planner
    from pipeline.train.config import load_run_config

    peaks = {}
    for mode in ("partitioned", "whole share"):  # fresh ranks for each: no heap left over from the other
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, "--ep", str(args.ep), "--n-embd", str(args.n_embd), "--n-layer", str(args.n_layer),
                   "--n-experts", str(args.n_experts), "--out", out, "--mode", mode]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            if args.fixed_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
            peaks[mode] = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.nproc)]
    plan = Planner(load_run_config(None, overrides(args)), gpus_per_node=args.nproc).plan(1)
    mb = 1e6
    print(f"build_model start-up peak per rank, {args.nproc} CPU ranks, EP {args.ep}, bf16 (MB above the RSS before):")
    print(f"{'rank':>4} {'partitioned':>12} {'whole share':>12} {'ratio':>7}")
    for r, (part, whole) in enumerate(zip(peaks["partitioned"], peaks["whole share"], strict=True)):
        print(f"{r:>4} {part / mb:>12.1f} {whole / mb:>12.1f} {whole / max(part, 1):>6.1f}x")
    print(f"planner: partitioned {plan.startup.host_cpu_only / mb:.1f} MB (CPU-only rank), "
          f"whole share {plan.startup.whole_share_fp32 / mb:.1f} MB")


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
