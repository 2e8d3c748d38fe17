"""Human-readable and JSON renderings of a `Plan` (what `python -m pipeline.plan` prints)."""

from __future__ import annotations

from pipeline.planning.planner import GiB, Plan, Planner


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _duration(s: float) -> str:
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


ASSUMPTIONS = """\
assumptions:
  - memory: DeepSpeed 0.19.8 ZeRO rules (pipeline/planning/zero.py): per-parameter ceil(numel / group)
    partitions; experts partitioned over the expert-data-parallel group (world / ep), the rest over
    all ranks; bf16 params, grads in grad_accum_dtype, fp32 master + Adam moments (16 B/param, 18 with
    fp32 grads; fp32 runs 20: DeepSpeed keeps a separate master copy); persistent small params kept
    whole; gather/reduce buffers and the optimizer sub-group from the DeepSpeed JSON.
  - activations: what autograd saves in pipeline/model (measured in tests), balanced expert routing,
    a flash / memory-efficient attention kernel (no T x T scores), the [T, T+1] mask bias kept per
    block, and the fp32 log-softmax over the full vocabulary at the loss. Peak = checkpointed block
    inputs + one recomputed block (checkpointing on) or all blocks (off), plus the loss peak.
  - fits: GPU total <= (1 - headroom) x device memory; the headroom covers the CUDA context, NCCL
    buffers and allocator fragmentation.
  - compute: model FLOPs (pipeline/flops.py: 6 x active matmul params incl. the LM head, plus causal,
    window-limited attention; recomputation not counted) at the stated MFU of the dense peak."""


def render_text(planner: Planner, plan: Plan, source: str, table: list[Plan | str],
                smallest: Plan | None, max_nodes: int) -> str:
    run, cfg, c = planner.run, planner.config, planner.counts
    ckpt = run.parallel.activation_checkpointing
    z = plan.zero
    lines = [
        f"plan for {source}",
        f"model     {run.model['preset']}: {cfg.n_layer} layers, {cfg.n_experts} experts top-{cfg.top_k}, "
        f"vocab {cfg.vocab_size:,} (from the preset unless model.vocab_size is set)",
        f"params    total {_b(c['total'])}  active {_b(c['active'])}  expert {_b(c['expert'])}  "
        f"non-expert {_b(c['non_expert'])}  (embedding {_b(c['embedding'])})",
        f"layout    {plan.nodes} node(s) x {plan.gpus_per_node} GPUs = {plan.world} ranks ({plan.gpu.name}), "
        f"ZeRO-{z.stage}, EP {plan.ep} (expert-data-parallel {plan.edp}), {run.precision}, "
        f"optimizer offload {'cpu' if z.offload_optimizer else 'none'}, "
        f"activation checkpointing {'on' if ckpt else 'off'}",
        f"tokens    micro-batch {run.train.micro_batch_size} x seq {run.data.seq_len} x grad-accum "
        f"{run.train.grad_accum_steps} x {plan.world} ranks = {plan.tokens_per_step:,} tokens/step",
        "",
        f"per-rank state elements: partition {plan.elements.partition:,} (expert {plan.elements.expert_partition:,}, "
        f"non-expert {plan.elements.non_expert_partition:,}, padding on the last rank {plan.elements.padding:,})",
        "",
        f"{'memory per GPU':<58}{'GiB':>8}{'host GiB':>10}",
    ]
    for label, gpu, host in plan.state.rows:
        lines.append(f"  {label:<56}{_gib(gpu):>8}{_gib(host) if host else '':>10}")
    act_on, act_off = plan.activations.total(True), plan.activations.total(False)
    lines.append(f"  {'activations, 1 micro-batch, checkpointing ' + ('on' if ckpt else 'off'):<56}"
                 f"{_gib(plan.activation_bytes):>8}")
    lines.append(f"    (checkpointing on {_gib(act_on)} GiB / off {_gib(act_off)} GiB; of which loss peak "
                 f"{_gib(plan.activations.loss_peak)} GiB)")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<56}{_gib(plan.gpu_bytes):>8}")
    lines.append(f"  usable {_gib(plan.usable_bytes)} GiB of {_gib(plan.gpu.memory_bytes)} GiB "
                 f"({planner.headroom:.0%} headroom) -> {verdict}")
    if plan.host_bytes_per_node:
        lines.append(f"  host memory per node for offloaded state: {_gib(plan.host_bytes_per_node)} GiB")
    lines.append(f"  if SDPA fell back to its math kernel (T x T scores kept): +{_gib(plan.math_fallback_bytes)} GiB")
    f = plan.flops_per_token
    peak = plan.gpu.peak(run.precision)
    lines += [
        "",
        f"compute   {f['total'] / 1e9:.2f} GFLOP/token (matmul {f['matmul'] / 1e9:.2f}, attention "
        f"{f['attention'] / 1e9:.2f}; forward+backward)",
        f"          step {_duration(plan.step_time_s)} at {plan.mfu:.0%} MFU of {peak / 1e12:.1f} TFLOP/s "
        f"{run.precision} per {plan.gpu.name} -> {plan.tokens_per_s:,.0f} tokens/s",
        "",
        "smallest node count that fits: "
        + (f"{smallest.nodes} ({smallest.world} GPUs, {_gib(smallest.gpu_bytes)} GiB per GPU)" if smallest
           else f"none up to {max_nodes} nodes (activations alone need {_gib(plan.activation_bytes)} GiB; "
           "lower train.micro_batch_size or data.seq_len, or turn on activation checkpointing)"),
        "",
        render_table(table),
        "",
        ASSUMPTIONS,
    ]
    return "\n".join(line.rstrip() for line in lines)


def render_table(table: list[Plan | str]) -> str:
    head = (f"{'nodes':>5} {'GPUs':>5} {'ep':>4} {'edp':>4} {'params':>7} {'grads':>6} {'optim':>6} "
            f"{'work':>6} {'act':>6} {'total':>7}  {'fits':<4} {'tokens/step':>12} {'step':>9} {'tokens/s':>11}")
    rows = ["by node count (GiB per GPU; params = partition + persistent, optim = master + Adam + step "
            "buffer, work = ZeRO-3 gather/reduce buffers, act = activations; micro-batch and grad-accum "
            "as configured, so tokens/step grow with the node count):", head]
    for p in table:
        if isinstance(p, str):
            rows.append(f"  cannot run: {p}")
            continue
        r = {label.split(":")[0]: 0 for label, _, _ in p.state.rows}
        for label, gpu, _ in p.state.rows:
            r[label.split(":")[0]] += gpu
        params, grads = r.get("parameters", 0), r.get("gradients", 0)
        optim = r.get("optimizer", 0) + r.get("optimizer step", 0)
        work = p.state.gpu - params - grads - optim
        rows.append(
            f"{p.nodes:>5} {p.world:>5} {p.ep:>4} {p.edp:>4} {_gib(params):>7} {_gib(grads):>6} {_gib(optim):>6} "
            f"{_gib(work):>6} {_gib(p.activation_bytes):>6} {_gib(p.gpu_bytes):>7}  {'yes' if p.fits else 'no':<4} "
            f"{p.tokens_per_step:>12,} {_duration(p.step_time_s):>9} {p.tokens_per_s:>11,.0f}"
        )
    return "\n".join(rows)


def plan_to_dict(planner: Planner, plan: Plan, smallest: Plan | None, table: list[Plan | str]) -> dict:
    def one(p: Plan) -> dict:
        return {
            "nodes": p.nodes,
            "world": p.world,
            "ep": p.ep,
            "edp": p.edp,
            "zero_stage": p.zero.stage,
            "elements": vars(p.elements),
            "memory_bytes": {label: {"gpu": gpu, "host": host} for label, gpu, host in p.state.rows},
            "activation_bytes": p.activation_bytes,
            "gpu_bytes": p.gpu_bytes,
            "usable_bytes": p.usable_bytes,
            "fits": p.fits,
            "tokens_per_step": p.tokens_per_step,
            "step_time_s": p.step_time_s,
            "tokens_per_s": p.tokens_per_s,
        }

    return {
        "parameters": planner.counts,
        "flops_per_token": plan.flops_per_token,
        "activations": {
            "checkpointing_on": plan.activations.total(True),
            "checkpointing_off": plan.activations.total(False),
        },
        "plan": one(plan),
        "smallest_fitting_nodes": smallest.nodes if smallest else None,
        "table": [p if isinstance(p, str) else one(p) for p in table],
    }
