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
    the attention kernel model.attention_backend runs on CUDA (pipeline/model/activation_memory.py),
    and the chunked LM loss (pipeline/model/loss.py: fp32 weight-sized gradient, one chunk of logits).
    Peak = checkpointed block inputs + one recomputed block (checkpointing on) or all blocks (off),
    plus the loss peak.
  - fits: GPU total <= (1 - headroom) x device memory; the headroom covers the CUDA context, NCCL
    buffers and allocator fragmentation.
  - compute: model FLOPs (pipeline/model/flops.py: 6 x active matmul params incl. the LM head, plus causal,
    window-limited attention; recomputation not counted) at the stated MFU of the dense peak. Default
    MFU 28%: NeMo AutoModel's gpt-oss-20b on 8 x H100 (Megatron-Bridge reports ~16% for gpt-oss-120b).
  - communication: bytes per collective as DeepSpeed 0.19.8 and our EP layer issue them (measured in
    tests), balanced routing, each at the bandwidth of the link its group crosses (pipeline/planning/
    comm.py); ZeRO traffic overlaps compute, the EP all-to-all adds to it. Not modelled: NCCL
    protocol/topology choices, congestion, stragglers, launch gaps, DeepSpeed keeping the last
    modules gathered between forward and backward (stage3_max_reuse_distance).
  - start-up: build_model materialises and ZeRO-3-partitions one module at a time; not counted: the
    process itself (CUDA context, libraries, NCCL: a few GB of host memory per rank)."""


KERNEL_NOTES = {
    "flex": "block-sparse, no T x T scores",
    "sdpa-math": "fp32 [B, H, T, T+1] scores per block, included above",
    "sdpa-fused": "no T x T scores",
}


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
        f"ZeRO-{z.stage}, EP {plan.ep} (expert-data-parallel {plan.edp}), SP {plan.sp}, {run.precision}, "
        f"optimizer offload {'cpu' if z.offload_optimizer else 'none'}, "
        f"activation checkpointing {'on' if ckpt else 'off'}",
        f"tokens    micro-batch {run.train.micro_batch_size} x seq {run.data.seq_len} x grad-accum "
        f"{run.train.grad_accum_steps} x {plan.dp} data-parallel ranks = {plan.tokens_per_step:,} tokens/step"
        + (f" (each sequence split over {plan.sp} ranks: {run.data.seq_len // plan.sp:,} tokens per rank)"
           if plan.sp > 1 else ""),
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
    kernel = plan.activations.attention_kernel
    line = f"  attention_backend {plan.attention_backend} -> {kernel} on CUDA ({KERNEL_NOTES[kernel]})"
    if plan.alternative:
        backend, alt_kernel, alt_bytes = plan.alternative
        line += f"; {backend} ({alt_kernel}) would need {_gib(alt_bytes)} GiB of activations"
    lines.append(line)
    lines += ["", *render_startup(plan), "", *render_checkpoint(plan), "", *render_comm(planner, plan)]
    f = plan.flops_per_token
    peak = plan.gpu.peak(run.precision)
    zero_s, a2a_s = plan.comm.seconds(overlapped=True), plan.comm.seconds(overlapped=False)
    lines += [
        "",
        f"compute   {f['total'] / 1e9:.2f} GFLOP/token (matmul {f['matmul'] / 1e9:.2f}, attention "
        f"{f['attention'] / 1e9:.2f}; forward+backward)",
        f"step      compute {_duration(plan.compute_s)} at {plan.mfu:.0%} MFU of {peak / 1e12:.1f} TFLOP/s "
        f"{run.precision} per {plan.gpu.name}  |  ZeRO communication {_duration(zero_s)} (overlaps compute)  "
        f"|  EP/SP all-to-all {_duration(a2a_s)} (on the critical path)",
        f"          -> step {_duration(plan.step_time_s)} = max(compute, ZeRO) + all-to-all, "
        f"{plan.bound}-bound, {plan.tokens_per_s:,.0f} tokens/s",
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


def render_startup(plan: Plan) -> list[str]:
    st = plan.startup
    if plan.zero.stage != 3:
        return [f"start-up (ZeRO-{plan.zero.stage}: each rank materialises its whole share in fp32 first)",
                f"  host memory per rank  {_gib(st.whole_share_fp32)} GiB, per node "
                f"{_gib(st.whole_share_fp32 * plan.gpus_per_node)} GiB"]
    return [
        "start-up (build_model: materialise + partition one module at a time)",
        f"  host memory per rank  {_gib(st.host_gpu_node)} GiB on a GPU node (largest fp32 init draw), "
        f"{_gib(st.host_cpu_only)} GiB without a GPU; per node {_gib(st.host_gpu_node * plan.gpus_per_node)} GiB",
        f"  GPU memory per rank   {_gib(st.gpu)} GiB (partitions + the largest module whole)",
        f"  (materialising the whole share first would hold {_gib(st.whole_share_fp32)} GiB fp32 per rank, "
        f"{_gib(st.whole_share_fp32 * plan.gpus_per_node)} GiB per node)",
    ]


def render_checkpoint(plan: Plan) -> list[str]:
    per_rank = plan.snapshot_host_bytes
    return ["checkpoints (train.async_save: snapshot buffers, allocated at the first save and reused)",
            f"  host memory per rank  {_gib(per_rank)} GiB, per node {_gib(per_rank * plan.gpus_per_node)} GiB "
            "(fp32 weights + Adam moments / ranks; checked at start-up; train.async_save=false needs none)"]


def render_comm(planner: Planner, plan: Plan) -> list[str]:
    links = planner.links
    lines = [
        f"communication per optimizer step, per GPU (NVLink {links.nvlink / 1e9:.0f} GB/s, network "
        f"{links.network / 1e9:.0f} GB/s per GPU)",
        f"  {'collective':<70}{'group':>9}{'GB':>9}{'on link':>9} {'link':<8}{'time':>9}",
    ]
    for t in plan.comm.transfers:
        if not t.bytes:
            continue
        lines.append(f"  {t.label:<70}{t.group + ' ' + str(t.group_size):>9}{t.bytes / 1e9:>9.2f}"
                     f"{t.link_bytes / 1e9:>9.2f} {t.link:<8}{_duration(t.seconds):>9}")
    return lines


def render_table(table: list[Plan | str]) -> str:
    head = (f"{'nodes':>5} {'GPUs':>5} {'ep':>4} {'edp':>4} {'params':>7} {'grads':>6} {'optim':>6} "
            f"{'work':>6} {'act':>6} {'total':>7}  {'fits':<4} {'tokens/step':>12} {'step':>9} {'tokens/s':>11}  bound")
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
            f"{p.tokens_per_step:>12,} {_duration(p.step_time_s):>9} {p.tokens_per_s:>11,.0f}  {p.bound}"
        )
    return "\n".join(rows)


def plan_to_dict(planner: Planner, plan: Plan, smallest: Plan | None, table: list[Plan | str]) -> dict:
    def one(p: Plan) -> dict:
        return {
            "nodes": p.nodes,
            "world": p.world,
            "ep": p.ep,
            "edp": p.edp,
            "sp": p.sp,
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
            "compute_s": p.compute_s,
            "bound": p.bound,
            "communication": [vars(t) for t in p.comm.transfers],
            "startup_bytes": vars(p.startup),
            "snapshot_host_bytes": p.snapshot_host_bytes,
        }

    return {
        "parameters": planner.counts,
        "flops_per_token": plan.flops_per_token,
        "activations": {
            "attention_backend": plan.attention_backend,
            "attention_kernel": plan.activations.attention_kernel,
            "checkpointing_on": plan.activations.total(True),
            "checkpointing_off": plan.activations.total(False),
            "loss_peak": plan.activations.loss_peak,
            "other_backend": dict(zip(("attention_backend", "attention_kernel", "activation_bytes"),
                                      plan.alternative, strict=True)) if plan.alternative else None,
        },
        "plan": one(plan),
        "smallest_fitting_nodes": smallest.nodes if smallest else None,
        "table": [p if isinstance(p, str) else one(p) for p in table],
    }
