"""Checkpoint save / load: our reshardable format vs DeepSpeed's own per-rank shards, same engine.

    python benchmarks/bench_checkpoint.py [--nproc 2] [--ep 2] [--repeats 3] [--n-embd 512]

Starts N CPU ranks (torchrun) that build one ZeRO-3 + expert-parallel engine (debug preset widened),
take one optimizer step so Adam's moments exist, then alternate, `--repeats` times: our
`save_state` (per-parameter fp32 weights + moments, experts per global id) and DeepSpeed's
`save_checkpoint`, then our `load_state` and DeepSpeed's `load_checkpoint`. Prints the best time of
each (the slowest rank's, after a barrier), the ratio ours / DeepSpeed, and the bytes on disk. Our
format carries the same state (fp32 master, exp_avg, exp_avg_sq) and can be read by any shape;
DeepSpeed's also stores the working copy and needs the same world size to load.

It also measures the cost of integrity: our save with and without the per-tensor xxh3-64
checksums, and our load without any check, with the finiteness check only (a checkpoint written
before checksums) and with checksums + finiteness (the default); printed as ratios to the
unchecked save / load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT))
    from pipeline.checkpoint.format import entries, load_state, save_state
    from pipeline.config_utils import from_dict
    from pipeline.distributed.process_group import init_distributed
    from pipeline.model import get_preset
    from pipeline.train.config import RunConfig
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_engine

    view = init_distributed()

    rank, world = view.rank, view.world
    model = dict(preset="debug", n_layer=4, n_embd=args.n_embd, n_head=8, n_kv_head=2, head_dim=args.n_embd // 8,
                 intermediate_size=args.n_embd, n_experts=8, top_k=2, vocab_size=4096)
    cfg = from_dict(RunConfig, {"run_dir": args.out, "model": model, "data": {"train": ["unused"], "seq_len": 32},
                                "train": {"micro_batch_size": 2}, "parallel": {"expert_parallel_size": args.ep}})
    model_cfg = get_preset("debug", **{k: v for k, v in model.items() if k != "preset"})
    engine = build_engine(cfg, model_cfg, build_ds_config(cfg, world), world)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
    _, loss, router = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss + router)
    engine.step()
    n_params = sum(getattr(e.param, "ds_numel", e.param.numel()) * (args.ep if e.expert_offset is not None else 1)
                   for e in entries(engine.module))  # the whole model: expert slices times ep

    out = Path(args.out)
    times = {"ours save": [], "deepspeed save": [], "ours load": [], "deepspeed load": [],
             "save no checksum": [], "load no check": [], "load finite only": []}

    def timed(name, fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times[name].append(time.perf_counter() - t0)

    for r in range(args.repeats):
        ours, ds = out / f"ours_{r}", out / "ds"
        if rank == 0:
            ours.mkdir(parents=True)
        dist.barrier()
        timed("ours save", lambda: save_state(engine.module, ours))  # noqa: B023
        timed("deepspeed save", lambda: engine.save_checkpoint(str(ds), tag=f"t{r}", save_latest=False))  # noqa: B023
        timed("ours load", lambda: load_state(engine, ours))  # noqa: B023
        timed("deepspeed load", lambda: engine.load_checkpoint(str(ds), tag=f"t{r}", load_lr_scheduler_states=False))  # noqa: B023
        plain = out / f"plain_{r}"
        if rank == 0:
            plain.mkdir(parents=True)
        dist.barrier()
        timed("save no checksum", lambda: save_state(engine.module, plain, checksums=False))  # noqa: B023
        timed("load no check", lambda: load_state(engine, ours, verify=False))  # noqa: B023
        timed("load finite only", lambda: load_state(engine, plain))  # noqa: B023
    if rank == 0:
        best = {k: min(v) for k, v in times.items()}
        size_ours, size_ds = disk_bytes(out / "ours_0"), disk_bytes(out / "ds" / "t0")
        print(f"{world} ranks, ep {args.ep}, {n_params / 1e6:.1f}M parameters (fp32 + Adam), best of {args.repeats}")
        for what in ("save", "load"):
            o, d = best[f"ours {what}"], best[f"deepspeed {what}"]
            print(f"  {what}: ours {o:.3f} s, DeepSpeed {d:.3f} s, ours / DeepSpeed {o / d:.2f}x")
        print(f"  disk: ours {size_ours / 2**20:.1f} MiB, DeepSpeed {size_ds / 2**20:.1f} MiB, "
              f"ratio {size_ours / size_ds:.2f}x")
        print(f"  integrity: save with checksums / without {best['ours save'] / best['save no checksum']:.2f}x "
              f"({best['ours save']:.3f} s vs {best['save no checksum']:.3f} s); load with checksums + finite "
              f"check / unchecked {best['ours load'] / best['load no check']:.2f}x, finite check only / unchecked "
              f"{best['load finite only'] / best['load no check']:.2f}x ({best['ours load']:.3f} s, "
              f"{best['load finite only']:.3f} s, {best['load no check']:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        rank_main(args)
        return
    out = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--ep", str(args.ep), "--repeats", str(args.repeats), "--n-embd", str(args.n_embd),
               "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("OMP_NUM_THREADS", "1")
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
