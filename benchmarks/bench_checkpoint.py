"""Checkpoint save / load: our reshardable format vs DeepSpeed's own per-rank shards, same engine;
and (--stall) the training stall per save, synchronous vs asynchronous (train.async_save).

    python benchmarks/bench_checkpoint.py [--nproc 2] [--ep 2] [--repeats 3] [--n-embd 512]
    python benchmarks/bench_checkpoint.py --stall --nproc 1 --ep 1 --n-embd 896 [--repeats 3]

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

--stall: CheckpointManager.save as the trainer calls it, alternating a synchronous and an
asynchronous manager on the same engine (each into its own checkpoint dir, keep_last 2); prints per
save the time the training loop is blocked (sync: the whole save; async: the snapshot into host
buffers, reused from the second save on), the async save's background time until its commit, and a
training step run while the files are written against one without. `--n-embd 896` gives ~92M
parameters: 1.1 GB of fp32 weights + Adam moments on one rank (bf16 training copy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
    precision = "bf16" if args.stall else "fp32"  # a smaller live engine beside the >= 1 GB checkpoint
    model = dict(preset="debug", n_layer=4, n_embd=args.n_embd, n_head=8, n_kv_head=2, head_dim=args.n_embd // 8,
                 intermediate_size=args.n_embd, n_experts=8, top_k=2, vocab_size=4096)
    cfg = from_dict(RunConfig, {"run_dir": args.out, "model": model, "data": {"train": ["unused"], "seq_len": 32},
                                "train": {"micro_batch_size": 2}, "parallel": {"expert_parallel_size": args.ep},
                                "precision": precision})
    model_cfg = get_preset("debug", **{k: v for k, v in model.items() if k != "preset"})
    engine = build_engine(cfg, model_cfg, build_ds_config(cfg, world), world)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))

    def train_step():
        _, loss, router = engine(ids[:, :-1], ids[:, 1:])
        engine.backward(loss + router)
        engine.step()

    train_step()
    n_params = sum(getattr(e.param, "ds_numel", e.param.numel()) * (args.ep if e.expert_offset is not None else 1)
                   for e in entries(engine.module))  # the whole model: expert slices times ep

    out = Path(args.out)
    if args.stall:
        stall(engine, train_step, out, n_params, args.repeats)
        return
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


def stall(engine, train_step, out: Path, n_params: int, repeats: int) -> None:
    """Sync vs async CheckpointManager.save, alternating on one engine (see the module docstring)."""
    import torch.distributed as dist

    from pipeline.checkpoint.format import owned_bytes
    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.checkpoint.run_state import RunState

    managers = {"sync": CheckpointManager(out / "sync", 2), "async": CheckpointManager(out / "async", 2, True)}
    rows = {"sync": [], "async": [], "background": [], "step while writing": [], "step": []}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return max_over_ranks(time.perf_counter() - t0)

    for r in range(repeats + 1):  # save 0 allocates the async buffers: reported apart
        rows["step"].append(timed(train_step))
        rows["sync"].append(timed(lambda: managers["sync"].save(engine, RunState(step=r), {})))  # noqa: B023
        t0 = time.perf_counter()
        rows["async"].append(timed(lambda: managers["async"].save(engine, RunState(step=r), {})))  # noqa: B023
        rows["step while writing"].append(timed(train_step))
        managers["async"].wait()
        rows["background"].append(max_over_ranks(time.perf_counter() - t0))
    if dist.get_rank() == 0:
        med = {k: statistics.median(v[1:]) for k, v in rows.items()}
        print(f"{dist.get_world_size()} rank(s), {n_params / 1e6:.1f}M parameters, "
              f"{owned_bytes(engine.module) / 1e9:.2f} GB of checkpoint state on rank 0 (async host buffers: "
              f"{managers['async'].saver.buffers.nbytes / 1e9:.2f} GB); median of {repeats} saves after the first")
        print(f"  stall per save: sync {med['sync']:.2f} s, async {med['async']:.2f} s "
              f"(first async save, allocating its buffers: {rows['async'][0]:.2f} s); "
              f"async / sync {med['async'] / med['sync']:.1%}")
        print(f"  async save until committed {med['background']:.2f} s; a training step while it writes "
              f"{med['step while writing']:.2f} s vs {med['step']:.2f} s without")
        print("  per save (sync / async stall, s): "
              + ", ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(rows["sync"], rows["async"], strict=True)))


def max_over_ranks(seconds: float) -> float:
    """The slowest rank's time: the loop waits for it at its next collective."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--stall", action="store_true", help="sync vs async save stall (train.async_save)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:
        rank_main(args)
        return
    out = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--ep", str(args.ep), "--repeats", str(args.repeats), "--n-embd", str(args.n_embd),
               "--out", str(out), *(["--stall"] if args.stall else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("OMP_NUM_THREADS", "1")
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
