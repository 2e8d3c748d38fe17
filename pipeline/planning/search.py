"""`python -m pipeline.plan --search`: the fastest layouts the trainer supports that fit.

For a run config on a fixed node count it tries every expert-parallel size the trainer accepts
(divides both the expert count and the world size), every sequence-parallel size the trainer accepts
up to one node (consecutive ranks: the all-to-all stays on NVLink), micro-batch sizes 1-8 with
grad_accum_steps rescaled so the samples per optimizer step stay as configured (when the product
divides), and activation checkpointing on and off; it keeps the layouts whose memory fits and ranks them by
tokens/s (the step-time model of planner.py: compute and communication side by side).
"""

from __future__ import annotations

import dataclasses

from pipeline.errors import ConfigError
from pipeline.planning.planner import Plan, Planner
from pipeline.train.config import RunConfig

MICRO_BATCHES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
    ep: int
    sp: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    plan: Plan


def _with(run: RunConfig, ep: int, sp: int, micro: int, accum: int, ckpt: bool) -> RunConfig:
    return dataclasses.replace(
        run,
        train=dataclasses.replace(run.train, micro_batch_size=micro, grad_accum_steps=accum),
        parallel=dataclasses.replace(run.parallel, expert_parallel_size=ep, activation_checkpointing=ckpt,
                                     sequence_parallel_size=sp),
    )


def search(base: Planner, nodes: int) -> list[Candidate]:
    """Fitting layouts on `nodes` nodes, fastest first."""
    run = base.run
    world = nodes * base.gpus_per_node
    n_experts = base.config.n_experts if base.config.num_moe_layers else 1
    eps = [e for e in range(1, world + 1) if world % e == 0 and n_experts % e == 0]
    sps = [s for s in range(1, min(world, base.gpus_per_node) + 1) if world % s == 0]
    # samples per optimizer step, as configured: micro x accum x data-parallel ranks
    samples = run.train.micro_batch_size * run.train.grad_accum_steps * (world // run.parallel.sequence_parallel_size)
    out = []
    for ep in eps:
        for sp in sps:
            per_rank = samples * sp // world  # samples per data-parallel rank per step
            if (samples * sp) % world or per_rank < 1:
                continue
            for micro in MICRO_BATCHES:
                if per_rank % micro:
                    continue
                for ckpt in (True, False):
                    try:
                        planner = Planner(_with(run, ep, sp, micro, per_rank // micro, ckpt),
                                          gpus_per_node=base.gpus_per_node, gpu=base.gpu, mfu=base.mfu,
                                          headroom=base.headroom, links=base.links)
                        plan = planner.plan(nodes)
                    except ConfigError:  # e.g. EP > 1 with a ZeRO-2 JSON, SP not dividing the heads
                        continue
                    if plan.fits:
                        out.append(Candidate(ep, sp, micro, per_rank // micro, ckpt, plan))
    return sorted(out, key=lambda c: (-c.plan.tokens_per_s, c.plan.gpu_bytes))


def render_search(candidates: list[Candidate], nodes: int, gpus_per_node: int, top: int) -> str:
    if not candidates:
        return (f"no layout fits on {nodes} node(s) x {gpus_per_node} GPUs; try more nodes, a shorter "
                "data.seq_len, or optimizer offload (--offload cpu)")
    # The all-to-all column: expert- and sequence-parallel exchanges, both on the critical path.
    head = (f"{'rank':>4} {'ep':>4} {'sp':>3} {'micro':>5} {'accum':>5} {'ckpt':>4} {'GiB/GPU':>8} {'compute':>9} "
            f"{'ZeRO comm':>10} {'all-to-all':>10} {'step':>9} {'tokens/s':>11}  bound")
    rows = [f"fastest layouts that fit on {nodes} node(s) x {gpus_per_node} GPUs (tokens per step as configured):",
            head]
    for i, c in enumerate(candidates[:top], 1):
        p = c.plan
        rows.append(
            f"{i:>4} {c.ep:>4} {c.sp:>3} {c.micro_batch:>5} {c.grad_accum:>5} {'on' if c.checkpointing else 'off':>4} "
            f"{p.gpu_bytes / 1024**3:>8.2f} {p.compute_s:>8.2f}s {p.comm.seconds(overlapped=True):>9.2f}s "
            f"{p.comm.seconds(overlapped=False):>9.2f}s {p.step_time_s:>8.2f}s {p.tokens_per_s:>11,.0f}  {p.bound}"
        )
    return "\n".join(rows)
