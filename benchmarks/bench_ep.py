"""Expert parallelism's step time against no expert parallelism, at equal work, on the same ranks.

    python benchmarks/bench_ep.py [--nproc 2] [--steps 20] [--warmup 3] [--repeats 2] [--profile]
    python benchmarks/bench_ep.py --repeats 3 --micro-batch 2 --set model.n_embd=256 model.intermediate_size=512

Both runs train the same model (debug preset, fp32) through the real ZeRO-3 engine on the same
ranks, the same micro-batches and the same global batch; only parallel.expert_parallel_size differs
(1 vs --nproc). They alternate --repeats times in the same processes (freeing each engine) and keep
each one's best median step time, so load from other processes on a shared machine moves the ratio
little. Prints EP / no-EP step time; 1.0 would mean expert parallelism costs nothing beyond the
work it moves (on CPU the ranks share the cores, so its all-to-all is pure overhead here). With
--profile it also prints, per run, rank 0's operators by self CPU time (torch profiler).

Run with plain python: it launches the ranks itself (torchrun --standalone).

Runs, side by side: EP 1 and EP N, each with DeepSpeed's own ZeRO-3 code and with our changes
to it (what the trainer uses): one gradient bucket per partition group (pipeline/train/zero3_buckets.py,
docs/deepspeed_zero3_ep_buckets.md), one all-gather per partition group for the persistent
parameters after each step (pipeline/train/zero3_persistent_gather.py), and parameter hooks per
transformer block instead of per submodule (train/engine.py `hook_blocks_not_submodules`).

What the profile showed (2 shared CPU cores, rank 0, per step; EP1 -> EP2): the collectives that
synchronise the two ranks go from 71 all-gathers + 1 reduce-scatter to 55 all-gathers (the local
experts need none) + 20 all-to-alls + 9 reduce-scatters with DeepSpeed's bucketing, which flushes
its gradient bucket whenever the next gradient belongs to another partition group, so every MoE
layer forced a blocking reduce-scatter mid-backward (AccumulateGrad, where ZeRO-3's gradient hooks
run: 3.2 -> 40 ms/step). With a bucket per partition group: 2 reduce-scatters, AccumulateGrad 7 ms/step.
What is left is waiting in the all-to-alls' autograd functions (66-111 ms/step; the gloo transfer
itself is a few ms): every all-to-all lets the slower rank (more routed tokens, or descheduled on
busy cores) hold the other, and on CPU the ranks share the cores, so the exchange is pure overhead;
capacity_factor=1.0 bounds the routing imbalance.

The persistent-parameter gather (every debug-preset parameter is below
stage3_param_persistence_threshold): DeepSpeed re-gathers them after each step one parameter at a
time, 71 all-gathers (55 with EP 2) of 2.9 ms CPU in all but ~130 ms of waiting on loaded cores at
EP 1 (step 201 -> 70 ms in one profiled pair); with one collective per partition group EP 1 loses
that wait, and EP 2 is left with its 20 all-to-alls as the ranks' meeting points.

Which model: the debug preset's experts (4 x 64 x 128) are below the persistence threshold, so
ZeRO-3 never partitions them at EP 1 and expert parallelism has nothing to save: the all-to-alls are
all it adds. In every real MoE the experts are far above it (gpt-oss-20b: 32 x 2880 x 5760 per
layer); `--set model.n_embd=256 model.intermediate_size=512` gives the debug model experts that
ZeRO-3 partitions (1M and 0.5M elements per layer): EP 1 then gathers them and reduce-scatters
their gradients every step, EP 2 keeps its half whole and pays the all-to-alls instead. With
--micro-batch 2 (256 tokens per rank) the step is nearer a GPU node's balance of communication to
compute, where issue 26's goals are measured (README, "Issue 26's speed goals, measured together").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_step_loop_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of a side-by-side step-time run (here and bench_hf_trainer.py)."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="run-config overrides for every run, e.g. parallel.activation_checkpointing=true or "
                             "model.n_embd=256 (the model is the debug preset with the model.* keys applied)")
    return parser


def parse_args(argv=None):
    parser = add_step_loop_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--profile", action="store_true")
    return parser.parse_args(argv)


def run_config(args, ep: int):
    from pipeline.config_utils import apply_overrides, from_dict
    from pipeline.train.config import RunConfig

    # --set model.KEY=VALUE changes the debug preset (e.g. experts above the persistence threshold).
    model = {"preset": "debug", "block_size": max(128, args.seq), "capacity_factor": args.capacity_factor}
    raw = {
        "model": model, "data": {"train": ["unused"], "seq_len": args.seq},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0},
        "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.micro_batch, "seed": 0},
        "parallel": {"expert_parallel_size": ep}, "precision": "fp32",
    }
    return from_dict(RunConfig, apply_overrides(raw, args.set))


def check_settings(args, world: int) -> None:
    """Builds the run and model configs of every run here, before any rank starts: a bad --set value is
    one line (ConfigError), not a traceback from each rank after the launch."""
    from pipeline.train.config import resolve_model_config

    for ep in (1, world):
        resolve_model_config(run_config(args, ep), from_data=False)


def measure(args, ep: int, world: int, rank: int, patched: bool = True) -> tuple[float, str | None]:
    """(median step seconds, profiler table or None) of one engine with expert_parallel_size=ep;
    `patched=False`: DeepSpeed's own ZeRO-3 code (train/zero3_buckets.py, train/zero3_persistent_gather.py and
    hooks per block off)."""
    from pipeline.train.config import resolve_model_config
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_engine, release_engine
    from pipeline.train.objective import compute_loss

    run = run_config(args, ep)
    model_cfg = resolve_model_config(run, from_data=False)
    engine = build_engine(run, model_cfg, build_ds_config(run, world), world, bucket_per_partition_group=patched,
                          persistent_gather_in_one=patched, hooks_per_block=patched)
    gen = torch.Generator().manual_seed(rank)  # each rank its own samples, the same for both runs
    batches = [torch.randint(0, model_cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
               for _ in range(4)]
    profiler = torch.profiler.profile() if args.profile else None
    times = []
    try:
        for step in range(args.warmup + args.steps):
            if profiler is not None and step == args.warmup:
                profiler.__enter__()
            dist.barrier()  # every step starts together: the time is the step's, not the last one's straggler
            start = time.perf_counter()
            loss = compute_loss(engine, batches[step % len(batches)]).total
            engine.backward(loss)
            engine.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
        release_engine(engine)
    table = None
    if profiler is not None:
        table = profile_summary(profiler, args.steps)
    return statistics.median(times), table


# Where expert parallelism's extra time can go: its all-to-alls (the autograd functions' time is
# mostly waiting for the other ranks), ZeRO-3's gradient hooks (run inside AccumulateGrad: bucket
# copies and, when a bucket is flushed, a blocking reduce-scatter), and the collectives themselves.
WATCHED = ("_AllToAll", "_AllToAllBackward", "torch::autograd::AccumulateGrad", "c10d::alltoall_base_",
           "c10d::_reduce_scatter_base_", "c10d::_allgather_base_", "c10d::allreduce_", "aten::_grouped_mm",
           "aten::mm", "aten::index_add_", "aten::index_put_")


def profile_summary(profiler, steps: int) -> str:
    rows = {e.key: e for e in profiler.key_averages()}
    total = sum(e.self_cpu_time_total for e in rows.values())
    lines = [f"  {'operator':<34}{'calls/step':>11}{'self ms/step':>14}{'ms/call':>10}",
             f"  {'(all operators)':<34}{'':>11}{total / 1e3 / steps:>14.1f}"]
    # Every collective that ran, not only the watched ones (ZeRO-3's coalesced gathers have names of their own).
    names = list(WATCHED) + sorted(k for k in rows if k.startswith("c10d::") and k not in WATCHED)
    for name in names:
        e = rows.get(name)
        if e is not None:
            lines.append(f"  {name:<34}{e.count / steps:>11.1f}{e.self_cpu_time_total / 1e3 / steps:>14.1f}"
                         f"{e.self_cpu_time_total / 1e3 / max(e.count, 1):>10.2f}")
    return "\n".join(lines)


def rank_main(args) -> None:
    from pipeline.distributed.process_group import init_distributed

    view = init_distributed()

    rank, world = view.rank, view.world
    # (ep, our ZeRO-3 patches on); with EP 1 (one partition group) only the persistent gather changes.
    runs = [(1, False), (1, True), (world, False), (world, True)]
    names = {(ep, patched): f"expert_parallel_size={ep}, {'our ZeRO-3 patches' if patched else 'DeepSpeed code'}"
             for ep, patched in runs}
    best: dict[tuple[int, bool], float] = {}
    for _ in range(args.repeats):
        for run in runs:
            seconds, table = measure(args, run[0], world, rank, patched=run[1])
            best[run] = min(best.get(run, float("inf")), seconds)
            if rank == 0 and table is not None:
                print(f"\n--- profile, {names[run]}, rank 0, {args.steps} steps ---\n{table}", flush=True)
    if rank == 0:
        tokens = args.micro_batch * args.seq * world
        print(f"\ndebug model, fp32, ZeRO-3, {world} ranks, micro-batch {args.micro_batch} x {args.seq} tokens "
              f"per rank, capacity_factor {args.capacity_factor}, {' '.join(args.set) or 'no overrides'}; "
              f"best of {args.repeats} medians over {args.steps} steps; load average {os.getloadavg()[0]:.1f}")
        for run in runs:
            print(f"  {names[run]:<44}{1e3 * best[run]:7.1f} ms/step  {tokens / best[run]:9,.0f} tokens/s")
        print(f"  EP{world} / EP1 step time: {best[(world, False)] / best[(1, False)]:.2f}x with DeepSpeed's code, "
              f"{best[(world, True)] / best[(1, True)]:.2f}x with our patches", flush=True)
        print(f"  ours / DeepSpeed's step time: EP1 {best[(1, True)] / best[(1, False)]:.2f}x, "
              f"EP{world} {best[(world, True)] / best[(world, False)]:.2f}x", flush=True)


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    from pipeline.cli import fail
    from pipeline.errors import ConfigError

    try:
        check_settings(args, args.nproc)
    except ConfigError as e:
        raise SystemExit(fail(e)) from None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, *sys.argv[1:]]
    raise SystemExit(subprocess.run(cmd, env=env, cwd=REPO_ROOT).returncode)


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
