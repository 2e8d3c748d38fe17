"""Per-rank parameter, gradient and optimizer state under DeepSpeed ZeRO, derived from its source.

Everything here mirrors DeepSpeed 0.19.8 (the version requirements.txt pins); the rules and where
they come from:

ZeRO-3 (`runtime/zero/partition_parameters.py`, `runtime/zero/stage3.py`)
  - Each parameter is partitioned on its own over its partition group of size W_p:
    `_aligned_size = numel + (W_p - numel % W_p) % W_p`, partition = aligned / W_p = ceil(numel / W_p).
    Every rank's partition has that size; the last rank's carries the padding.
  - Our trainer's expert parameters (n_experts / ep stacked experts per rank, `pipeline/train/
    expert_parallel.py`) are partitioned over the expert-data-parallel group (W_p = world / ep);
    all others over every rank (W_p = world).
  - The flat buffers are plain concatenations of those partitions (`defragment`), so the low-precision
    params, the gradient partitions (`grad_partitions_flat_buffer`, dtype = grad_accum_dtype, which
    defaults to the model dtype: bf16 under bf16), the fp32 master copy (`fp32_partitioned_groups_flat`)
    (a separate copy in fp32 runs too, see `state_memory`) and Adam's exp_avg / exp_avg_sq all hold
    exactly sum(partition) elements per rank.
  - Parameters with numel <= stage3_param_persistence_threshold are "persistent": gathered once and
    kept whole on every rank (on top of their partition), up to stage3_model_persistence_threshold
    elements // world.
  - Working memory: the parameters of the block being run are all-gathered (DeepSpeed fetches per
    module, its direct parameters; the trainer makes each transformer block one unit, so its
    parameters are fetched together) plus up to stage3_prefetch_bucket_size prefetched elements;
    backward produces that block's full-size gradients, copied into the reduce bucket of reduce_bucket_size
    elements (preallocated with contiguous_gradients), one bucket per partition group: our trainer's
    patch (pipeline/train/zero3_buckets.py) gives the expert-data-parallel group its own. The optimizer
    step upcasts one sub-group of gradient partitions (<= sub_group_size elements) to fp32.
ZeRO-2 (`runtime/zero/stage_1_and_2.py`): parameters stay whole on every rank; each parameter group
  is flattened and padded to a multiple of 2 x world (`nccl_start_alignment_factor`), and the fp32
  master, Adam moments and gradient partitions are 1/world of it. Modelled as one group.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.model import GPTOSS, GPTOSSConfig, GroupedExperts

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}

# DeepSpeed 0.19.8 defaults (runtime/zero/config.py); tests/planning/test_plan.py checks them against it.
DS_DEFAULTS = {
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": sys.maxsize,
    "sub_group_size": 1_000_000_000,
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "contiguous_gradients": True,
    "stage3_max_reuse_distance": 1_000_000_000,
}


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a (resolved) DeepSpeed JSON that decide memory."""

    stage: int
    offload_optimizer: bool
    param_bytes: int
    """Bytes per element of the model's parameters and activations (bf16: 2, fp32: 4)."""
    grad_bytes: int
    """Bytes per element of the gradient partitions (data_types.grad_accum_dtype, default = params)."""
    persistence_threshold: int
    model_persistence_threshold: int
    sub_group_size: int
    reduce_bucket_size: int
    prefetch_bucket_size: int
    max_live_parameters: int
    contiguous_gradients: bool
    max_reuse_distance: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, ds: dict) -> ZeroSettings:
        zero = ds.get("zero_optimization", {})

        def get(key: str):
            return int(zero.get(key, DS_DEFAULTS[key]))

        bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        param_bytes = 2 if bf16 else 4
        accum = ds.get("data_types", {}).get("grad_accum_dtype")
        if accum is not None and str(accum).lower() not in DTYPE_BYTES:
            raise ConfigError(f"data_types.grad_accum_dtype ({accum!r}) must be one of fp32, bf16, fp16")
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        return cls(
            stage=int(zero.get("stage", 0)),
            offload_optimizer=offload,
            param_bytes=param_bytes,
            grad_bytes=param_bytes if accum is None else DTYPE_BYTES[str(accum).lower()],
            persistence_threshold=get("stage3_param_persistence_threshold"),
            model_persistence_threshold=get("stage3_model_persistence_threshold"),
            sub_group_size=get("sub_group_size"),
            reduce_bucket_size=get("reduce_bucket_size"),
            prefetch_bucket_size=get("stage3_prefetch_bucket_size"),
            max_live_parameters=get("stage3_max_live_parameters"),
            contiguous_gradients=bool(zero.get("contiguous_gradients", DS_DEFAULTS["contiguous_gradients"])),
            max_reuse_distance=get("stage3_max_reuse_distance"),
        )


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    """Elements of the whole (unsharded) parameter."""
    expert: bool
    """Stacked expert weight/bias: sharded over EP, partitioned over the expert-data-parallel group."""
    module: str


def model_param_tensors(config: GPTOSSConfig) -> list[ParamTensor]:
    """Every distinct parameter of the model, in registration order, built on the meta device."""
    with torch.device("meta"):
        model = GPTOSS(config)
    seen: set[int] = set()
    out = []
    for mod_name, module in model.named_modules():
        expert = isinstance(module, GroupedExperts)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied LM head is the embedding: one parameter
                continue
            seen.add(id(p))
            out.append(ParamTensor(f"{mod_name}.{p_name}" if mod_name else p_name, p.numel(), expert, mod_name))
    return out


@dataclass(frozen=True)
class RankElements:
    """Element counts one rank holds (identical on every rank; padding sits on the last one)."""

    partition: int
    """ZeRO-3: sum of per-parameter partitions; ZeRO-2: this rank's slice of the padded flat group.
    The fp32 master copy, Adam's two moments and the gradient partitions each have this many."""
    expert_partition: int
    non_expert_partition: int
    padding: int
    """Padding elements inside the last rank's partitions."""
    full_params: int
    """Low-precision parameter elements held whole: ZeRO-3 persistent params, ZeRO-2 everything."""
    persistent_count: int
    largest_module: int
    """Parameters ZeRO-3 gathers at once for the biggest unit it hooks: a transformer block, or a
    module outside the blocks (experts: this rank's slice)."""
    optimizer_sub_group: int
    """Largest set of partitions upcast to fp32 together in the optimizer step."""
    gradient_buckets: int = 1
    """Reduce buckets of reduce_bucket_size allocated: ZeRO-3 keeps one per partition group
    (pipeline/train/zero3_buckets.py), so expert parallelism adds the expert-data-parallel group's."""


def rank_elements(params: list[ParamTensor], zero: ZeroSettings, world: int, ep: int) -> RankElements:
    if zero.stage == 3:
        return _zero3_elements(params, zero, world, ep)
    if ep > 1:
        raise ConfigError(f"expert parallelism (ep={ep}) needs ZeRO stage 3 (the trainer refuses stage {zero.stage})")
    total = sum(p.numel for p in params)
    align = 2 * world  # stage_1_and_2.py: nccl_start_alignment_factor (2) x dp world size
    padded = math.ceil(total / align) * align
    expert = sum(p.numel for p in params if p.expert)
    part = padded // world
    return RankElements(
        partition=part,
        expert_partition=expert * part // max(total, 1),  # one flat group: a proportional share
        non_expert_partition=part - expert * part // max(total, 1),
        padding=padded - total,
        full_params=total,
        persistent_count=0,
        largest_module=_largest_module(params, 1),
        optimizer_sub_group=part,
    )


def persistent_names(params: list[ParamTensor], zero: ZeroSettings, world: int, ep: int) -> set[str]:
    """Parameters ZeRO-3 keeps whole on every rank (`_convert_to_deepspeed_param`'s rule)."""
    budget = zero.model_persistence_threshold // world  # Init divides it by num_partitions
    names, used = set(), 0
    for p in params:
        local = p.numel // ep if p.expert else p.numel
        if local <= zero.persistence_threshold and used + local <= budget:
            names.add(p.name)
            used += local
    return names


def _zero3_elements(params: list[ParamTensor], zero: ZeroSettings, world: int, ep: int) -> RankElements:
    edp = world // ep
    expert_part = non_expert_part = padding = persistent = persistent_count = 0
    model_budget = zero.model_persistence_threshold // world  # Init divides it by num_partitions
    parts_by_group: dict[bool, list[int]] = {True: [], False: []}
    for p in params:
        local = p.numel // ep if p.expert else p.numel
        group = edp if p.expert else world
        part = math.ceil(local / group)
        padding += part * group - local
        parts_by_group[p.expert and ep > 1].append(part)  # only tagged experts get their own group
        if p.expert:
            expert_part += part
        else:
            non_expert_part += part
        if local <= zero.persistence_threshold and persistent + local <= model_budget:
            persistent += local
            persistent_count += 1
    # stage3 splits the optimizer's param groups by partition group (expert / not) and each into
    # sub-groups that close once they reach sub_group_size (_create_fp16_sub_groups).
    sub_groups = [0]
    for parts in parts_by_group.values():
        if sum(parts) <= zero.sub_group_size:
            sub_groups.append(sum(parts))
            continue
        current = 0
        for part in parts:
            current += part
            if current >= zero.sub_group_size:
                sub_groups.append(current)
                current = 0
        sub_groups.append(current)
    return RankElements(
        partition=expert_part + non_expert_part,
        expert_partition=expert_part,
        non_expert_partition=non_expert_part,
        padding=padding,
        full_params=persistent,
        persistent_count=persistent_count,
        largest_module=_largest_module(params, ep),
        optimizer_sub_group=max(sub_groups),
        gradient_buckets=sum(1 for parts in parts_by_group.values() if parts),
    )


def _hook_unit(module: str) -> str:
    """The unit whose parameters ZeRO-3 gathers at once: the trainer hooks each transformer block as
    one (pipeline/train/engine.py `hook_blocks_not_submodules`), every module outside them alone."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else module


def _largest_module(params: list[ParamTensor], ep: int) -> int:
    per_unit: dict[str, int] = {}
    for p in params:
        unit = _hook_unit(p.module)
        per_unit[unit] = per_unit.get(unit, 0) + (p.numel // ep if p.expert else p.numel)
    return max(per_unit.values())


@dataclass(frozen=True)
class StateMemory:
    """Bytes of model state per rank: on the GPU and in host memory (optimizer offload)."""

    rows: list[tuple[str, int, int]]
    """(label, GPU bytes, host bytes) per component."""

    @property
    def gpu(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def host(self) -> int:
        return sum(r[2] for r in self.rows)


def state_memory(el: RankElements, zero: ZeroSettings) -> StateMemory:
    pb, gb = zero.param_bytes, zero.grad_bytes
    p_name = "bf16" if pb == 2 else "fp32"
    g_name = "bf16" if gb == 2 else "fp32"
    off = zero.offload_optimizer

    def place(label: str, nbytes: int, on_host: bool) -> tuple[str, int, int]:
        return (label, 0, nbytes) if on_host else (label, nbytes, 0)

    rows = []
    if zero.stage == 3:
        rows.append(("parameters: ZeRO-3 partition (" + p_name + ")", el.partition * pb, 0))
        rows.append((f"parameters: {el.persistent_count} persistent small params, whole", el.full_params * pb, 0))
    else:
        rows.append(("parameters: whole model (" + p_name + ")", el.full_params * pb, 0))
    # With offload the gradient partitions live next to the optimizer, in host memory (stage3.py: self.device).
    rows.append(place(f"gradients: partition ({g_name})", el.partition * gb, off))
    # Always a separate copy, also in fp32: stage3.py would reuse an fp32 partition as the master only
    # if `tensor.device == self.device`, which compares a torch.device with a device *name* and is
    # never true in 0.19.8 (tests/planning checks the data pointers).
    rows.append(place("optimizer: fp32 master weights", el.partition * 4, off))
    rows.append(place("optimizer: Adam exp_avg + exp_avg_sq (fp32)", el.partition * 8, off))
    rows.append(place("optimizer step: fp32 grads of one sub-group", el.optimizer_sub_group * 4, off))
    if zero.stage == 3:
        prefetch = min(zero.prefetch_bucket_size, max(0, zero.max_live_parameters - el.largest_module))
        rows.append(("ZeRO-3 gathered params: largest block + prefetch", (el.largest_module + prefetch) * pb, 0))
        full_grads = el.largest_module * pb
    else:
        full_grads = 0
    buckets = el.gradient_buckets
    bucket = buckets * zero.reduce_bucket_size * pb if zero.contiguous_gradients else 0
    label = "bucket" if buckets == 1 else f"{buckets} buckets"  # one per partition group
    rows.append((f"gradient reduce: full grads of one block + {label}", full_grads + bucket, 0))
    return StateMemory(rows)
