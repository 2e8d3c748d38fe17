"""Communication per optimizer step, and start-up host memory, for one rank of a planned run.

Volumes are what DeepSpeed 0.19.8 and our expert-parallel layer actually pass to the collectives
(tests/planning/test_comm.py counts them by wrapping torch.distributed on 4 gloo ranks and compares
byte for byte), with M = micro-batches per step (grad_accum_steps), passes = 2 (forward, backward)
or 3 with activation checkpointing (the recomputed forward gathers and exchanges again):

  ZeRO-3 all-gather   each non-persistent parameter, padded to a multiple of its partition group,
                      once per pass per micro-batch (ZeRO fetches a module's parameters when it
                      runs and releases them after; only the checkpointed blocks are recomputed,
                      so embedding, final norm and LM head make 2 passes). Persistent small
                      parameters are gathered once per step, after the optimizer updated them.
                      A partition group of one (EP = world) holds whole parameters: no gather.
  ZeRO-3 reduce-      every parameter's gradient, once per micro-batch, in the parameter dtype
  scatter             (DeepSpeed's communication_data_type defaults to it), over the same group.
  EP all-to-all       per MoE layer and micro-batch: token rows N x top_k x D out (dispatch) and back
                      (combine) in forward, again in the recompute, and their gradients in backward,
                      plus the per-expert row counts. Summed over the ranks this is exact; per rank
                      it assumes balanced routing.
  SP all-to-all       sequence parallelism over P ranks (Ulysses): per attention layer and
                      micro-batch, q, k, v and the output are each exchanged once, every rank passing
                      its [B, T/P, heads, d] tensors (H query heads; K/V with max(Hkv, P) heads, as KV
                      heads are repeated when fewer than P) in the activation dtype: forward, the
                      recompute, and the gradients in backward. Plus one all-reduce of the expert
                      counts per MoE layer and forward pass (the whole sequence's load-balancing loss).
                      EP rows are then the rank's T/P tokens.
  ZeRO-2              gradients reduce-scattered per micro-batch, updated parameters all-gathered
                      once per step, whole model each.

Which link a collective crosses follows DeepSpeed's rank layout (consecutive ranks share a node;
EP groups are consecutive ranks, expert-data-parallel groups stride by ep): a group inside one
node moves at NVLink speed, a group spanning nodes at the per-GPU inter-node bandwidth (a ring
over nodes is limited by its slowest hop). A ring all-gather / reduce-scatter over G ranks puts
(G - 1) / G of the full tensor on each rank's link; an all-to-all sends the rows bound for other
ranks, and of those the rows bound for other nodes cross the network.

What this cannot see: DeepSpeed keeping a module gathered between its forward and backward when the
reuse distance or prefetch bucket covers it (fewer gathers: `stage3_max_reuse_distance`), NCCL's
protocol and topology choices, congestion, stragglers and kernel launch gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.model import GPTOSSConfig
from pipeline.planning.zero import ParamTensor, ZeroSettings, persistent_names


@dataclass(frozen=True)
class Links:
    """Achievable bandwidth per GPU, bytes/s, one direction."""

    nvlink: float = 360e9
    """H100 SXM: NVLink 4 is 450 GB/s per direction (900 GB/s total); NCCL all-gather bus bandwidth
    inside an 8-GPU HGX node measures ~360 GB/s (nccl-tests)."""
    network: float = 45e9
    """One 400 Gb/s NDR InfiniBand / RoCE NIC per GPU (HGX H100 reference design): 50 GB/s line
    rate, ~45 GB/s achieved bus bandwidth across nodes."""


@dataclass(frozen=True)
class Transfer:
    label: str
    collective: str
    group: str
    """world | edp | ep | sp"""
    group_size: int
    bytes: int
    """Bytes this rank passes to the collective per step (all-gather: the gathered output;
    reduce-scatter and all-to-all: the input)."""
    link_bytes: int
    """Of those, bytes that leave this GPU over its slowest link."""
    link: str
    """nvlink | network | none"""
    seconds: float
    overlapped: bool
    """ZeRO prefetch / overlap_comm can hide it behind compute; the all-to-all sits on the critical path."""


@dataclass(frozen=True)
class Communication:
    transfers: list[Transfer] = field(default_factory=list)

    def seconds(self, overlapped: bool | None = None) -> float:
        return sum(t.seconds for t in self.transfers if overlapped is None or t.overlapped == overlapped)

    def bytes_of(self, collective: str, group: str | None = None) -> int:
        return sum(t.bytes for t in self.transfers
                   if t.collective == collective and (group is None or t.group == group))


def _span(group: str, size: int, world: int, gpus_per_node: int) -> str:
    """The slowest link a group of `size` ranks of DeepSpeed's layout crosses (EP and SP groups:
    consecutive ranks)."""
    if group in ("ep", "sp"):
        members_per_node = math.gcd(size, gpus_per_node)
        return "nvlink" if size <= gpus_per_node and members_per_node == size else "network"
    if size == 1:
        return "none"
    return "nvlink" if world <= gpus_per_node else "network"


def _all_to_all_leaving(size: int, gpus_per_node: int) -> float:
    """The share of an all-to-all's bytes over its group's slowest link (consecutive ranks): within
    a node all but the rank's own; across nodes what goes to the members on other nodes."""
    return (size - 1) / size if size <= gpus_per_node else (size - min(size, gpus_per_node)) / size


def communication(
    config: GPTOSSConfig,
    params: list[ParamTensor],
    zero: ZeroSettings,
    *,
    world: int,
    ep: int,
    gpus_per_node: int,
    micro_batch: int,
    seq_len: int,
    grad_accum: int,
    checkpointing: bool,
    links: Links,
    sp: int = 1,
) -> Communication:
    pb = zero.param_bytes
    bw = {"nvlink": links.nvlink, "network": links.network, "none": math.inf}
    edp = world // ep
    out: list[Transfer] = []

    def add(label, collective, group, size, nbytes, overlapped, leaving_fraction=None):
        link = _span(group, size, world, gpus_per_node)
        if leaving_fraction is None:
            leaving_fraction = (size - 1) / size if size > 1 else 0.0
        link_bytes = int(nbytes * leaving_fraction)
        seconds = link_bytes / bw[link] if link_bytes else 0.0
        out.append(Transfer(label, collective, group, size, nbytes, link_bytes, link, seconds, overlapped))

    def padded(p: ParamTensor) -> tuple[str, int, int]:
        local = p.numel // ep if p.expert else p.numel
        group, size = ("edp", edp) if (p.expert and ep > 1) else ("world", world)
        return group, size, math.ceil(local / size) * size

    if zero.stage == 3:
        persistent = persistent_names(params, zero, world, ep)
        def passes(p: ParamTensor) -> int:  # only the blocks are checkpointed (and recomputed)
            return 3 if checkpointing and p.module.startswith("blocks.") else 2

        for group, size in (("world", world), ("edp", edp)) if ep > 1 else (("world", world),):
            mine = [(p, padded(p)[2]) for p in params if padded(p)[0] == group]
            # A partition group of one holds its parameters whole: DeepSpeed gathers nothing.
            gathered = sum(n * passes(p) for p, n in mine if p.name not in persistent) if size > 1 else 0
            kept = sum(n for p, n in mine if p.name in persistent) if size > 1 else 0
            what = "experts" if group == "edp" else "non-expert params"
            how = "fwd + recompute + bwd" if checkpointing else "fwd + bwd"
            add(f"ZeRO-3 all-gather {what}: {how} x {grad_accum} micro-batches", "all_gather", group,
                size, gathered * pb * grad_accum, True)
            add(f"ZeRO-3 all-gather persistent {what} after the step", "all_gather", group, size, kept * pb, True)
            add(f"ZeRO-3 reduce-scatter {what.replace('params', 'grads')}: {grad_accum} micro-batches",
                "reduce_scatter", group, size, sum(n for _, n in mine) * pb * grad_accum, True)
    else:
        total = sum(p.numel for p in params)
        flat = math.ceil(total / (2 * world)) * 2 * world
        add(f"ZeRO-2 reduce-scatter grads: {grad_accum} micro-batches", "reduce_scatter", "world", world,
            flat * pb * grad_accum, True)
        add("ZeRO-2 all-gather updated params after the step", "all_gather", "world", world, flat * pb, True)

    if ep > 1 and config.num_moe_layers:
        rows = micro_batch * seq_len // sp * config.top_k  # token slots each rank sends per layer
        exchanges = (4 if checkpointing else 2) + 2  # fwd (+ recompute) dispatch and combine; 2 in backward
        token_bytes = rows * config.n_embd * pb * exchanges * config.num_moe_layers * grad_accum
        counts = ep * (config.n_experts // ep) * 8 * (2 if checkpointing else 1) * config.num_moe_layers * grad_accum
        leaving = _all_to_all_leaving(ep, gpus_per_node)
        add(f"EP all-to-all tokens: {exchanges} exchanges x {config.num_moe_layers} MoE layers x "
            f"{grad_accum} micro-batches", "all_to_all", "ep", ep, token_bytes, False, leaving)
        add("EP all-to-all per-expert row counts", "all_to_all", "ep", ep, counts, False, leaving)
    if sp > 1:
        passes = 3 if checkpointing else 2  # forward, recompute, backward
        heads = 2 * config.n_head + 2 * max(config.kv_heads, sp)  # q and output; k and v
        per_layer = micro_batch * (seq_len // sp) * heads * config.head_size * pb
        leaving = _all_to_all_leaving(sp, gpus_per_node)
        add(f"SP all-to-all q/k/v/out: {passes} passes x {config.n_layer} layers x {grad_accum} micro-batches",
            "all_to_all", "sp", sp, per_layer * passes * config.n_layer * grad_accum, False, leaving)
        if config.num_moe_layers:
            per_seq = micro_batch * 4 if config.aux_loss_granularity == "sequence" else 8  # fp32 [B, E] or int64 [E]
            forwards = 2 if checkpointing else 1
            add("SP all-reduce of expert counts (load-balancing loss)", "all_reduce", "sp", sp,
                per_seq * config.n_experts * forwards * config.num_moe_layers * grad_accum, False)
    return Communication(out)


@dataclass(frozen=True)
class StartupMemory:
    """Peak memory of one rank while `build_model` materialises and partitions the model."""

    host_gpu_node: int
    """Host bytes per rank on a GPU node: parameters are allocated on the GPU; the host holds the
    fp32 draw of the largest single tensor (seeded init draws on the CPU, pipeline/model/init.py)."""
    host_cpu_only: int
    """Host bytes per rank with no GPU (what tests measure): the partitions built so far, the
    largest module's own parameters whole in the training dtype plus a staging copy for the
    broadcast zero.Init runs before partitioning, and the largest fp32 draw."""
    gpu: int
    """GPU bytes at the start-up peak on a GPU node: partitions + the largest module whole."""
    whole_share_fp32: int
    """What the previous start-up held per rank: its whole share (non-expert + its experts) in fp32."""


def startup_memory(params: list[ParamTensor], zero: ZeroSettings, partition_elements: int, ep: int,
                   n_experts: int) -> StartupMemory:
    pb = zero.param_bytes
    per_module: dict[str, int] = {}
    for p in params:
        per_module[p.module] = per_module.get(p.module, 0) + (p.numel // ep if p.expert else p.numel)
    largest_module = max(per_module.values()) * pb
    # Expert weights are drawn one expert at a time (GroupedExperts.reset_parameters).
    draw = max(p.numel // n_experts if p.expert else p.numel for p in params) * 4
    share = sum(p.numel // ep if p.expert else p.numel for p in params) * 4
    if zero.stage != 3:  # ZeRO-2 materialises the whole share before deepspeed.initialize
        return StartupMemory(share, share, share, share)
    partitions = partition_elements * pb
    return StartupMemory(
        host_gpu_node=draw,
        host_cpu_only=partitions + 2 * largest_module + draw,
        gpu=partitions + largest_module,
        whole_share_fp32=share,
    )


def checkpoint_snapshot_bytes(params: list[ParamTensor], world: int) -> int:
    """Host bytes per rank an asynchronous checkpoint holds (pipeline/checkpoint/async_writer.py): its
    share of the fp32 weights and both Adam moments, dealt over all ranks (non-expert tensors whole,
    round-robin; each expert by one rank of its group), in buffers kept for the whole run."""
    return -(-sum(p.numel for p in params) * 3 * 4 // world)
