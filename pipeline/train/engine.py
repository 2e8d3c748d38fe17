"""Model -> DeepSpeed engine, the one way the trainer (and the benchmarks) build it.

Order matters: expert-parallel groups exist before the model; every rank builds the *same* model
structure on the meta device from the same seed, so each rank's expert slice is a slice of one
model and the non-expert weights DeepSpeed broadcasts from rank 0 are the ones every rank already
has; expert parallelism and activation checkpointing are applied from outside the (pure PyTorch)
model; under ZeRO-3 the parameters are then materialised and partitioned module by module (a rank
never holds its whole share), under ZeRO-2 `deepspeed.initialize` partitions a CPU-built model.
"""

from __future__ import annotations

import functools
import gc

import torch
from torch import nn

from pipeline.distributed.expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    check_expert_parallel_size,
    create_expert_groups,
    tag_expert_parallel_parameters,
    tag_expert_parameters,
)
from pipeline.distributed.parallel_dims import ParallelDims
from pipeline.distributed.sequence_parallel import apply_sequence_parallel, create_sequence_groups
from pipeline.model import GPTOSS, Block, GPTOSSConfig, TopKRouter
from pipeline.train.config import RunConfig
from pipeline.train.optim import check_optimizer_builds, param_groups
from pipeline.train.zero3_buckets import check_deepspeed_version, keep_bucket_per_partition_group
from pipeline.train.zero3_persistent_gather import gather_persistent_in_one_collective


def is_zero3(ds_config: dict | None) -> bool:
    return ds_config is not None and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def build_model(cfg: RunConfig, model_cfg: GPTOSSConfig, world: int, ds_config: dict | None = None,
                dims: ParallelDims | None = None) -> GPTOSS:
    """This rank's model: non-expert weights whole, experts only its expert-parallel slice.

    Built on the meta device, so no rank ever allocates the full set of experts (gpt-oss-120b's
    would be ~470 GB in fp32). Under ZeRO-3 (`ds_config` given with stage 3) each parameter is then
    materialised, initialised and partitioned one module at a time (`materialize_partitioned`), so
    a rank's start-up peak is its ZeRO partition plus one module, not its whole share; otherwise
    (ZeRO-2) the whole share is materialised on the CPU and `deepspeed.initialize` takes it from
    there. Per-tensor seeded init makes every value equal to the same tensor of a model built whole
    from the same seed, whichever path builds it. `dims`: the layout the caller already checked
    (the trainer, at start-up); without it the expert-parallel size is checked here.
    """
    ep = cfg.parallel.expert_parallel_size
    if dims is None:
        check_expert_parallel_size(ep, world, model_cfg.n_experts)
    groups = create_expert_groups(ep) if ep > 1 else None
    torch.manual_seed(cfg.train.seed)  # the same init_seed on every rank
    with torch.device("meta"):
        model = GPTOSS(model_cfg)
    if torch.cuda.is_available():  # draw initial weights on this rank's GPU (pipeline/model/init.py)
        model.init_device = torch.device("cuda", torch.cuda.current_device())
    if groups is not None:
        apply_expert_parallel(model, groups)
    if cfg.parallel.sequence_parallel_size > 1:  # no parameters added: before materialising is fine
        apply_sequence_parallel(model, create_sequence_groups(cfg.parallel.sequence_parallel_size))
    if is_zero3(ds_config):
        materialize_partitioned(model, ds_config)
    else:
        model.materialize("cpu")
        if groups is not None:
            tag_expert_parallel_parameters(model)
    if cfg.parallel.activation_checkpointing:
        model.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return model


def _post_order(module: nn.Module):
    """Children before their parent, so a module's own parameters are the only unconverted ones."""
    for child in module.children():
        yield from _post_order(child)
    yield module


@torch.no_grad()
def materialize_partitioned(model: GPTOSS, ds_config: dict) -> None:
    """Materialise a meta-built model module by module straight into ZeRO-3 partitions.

    For each module's own parameters: allocate them on this rank's device in the training dtype,
    draw their seeded init, tag expert slices for their expert-data-parallel partition group (the
    tags must be on the parameter before ZeRO partitions it, see distributed/expert_parallel.py), and hand them to
    `deepspeed.zero.Init(module=...)`, which keeps this rank's partition and frees the rest. This is
    what `deepspeed.initialize` would do to an already-built model (same `zero.Init`, same dtype), so
    the engine sees a zero.Init model and neither casts nor moves it. Peak memory: the partitions so
    far plus one module's parameters (gpt-oss-120b: the 1.2B-element embedding, in bf16).
    """
    import deepspeed

    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled", False) else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    expert_groups = {m.local: m.groups for m in model.modules() if isinstance(m, ExpertParallelExperts)}
    for module in _post_order(model):
        own = [p for p in module.parameters(recurse=False) if p.is_meta]
        # Buffers too (e.g. the router's expert bias); they keep their own dtype and stay whole.
        own_buffers = [b for b in module.buffers(recurse=False) if b.is_meta]
        if not own and not own_buffers:  # nothing here, or a tied weight already materialised
            continue
        for p in own:
            p.data = p.data.to(dtype)  # free on meta; to_empty then allocates in the training dtype
        module.to_empty(device=device, recurse=False)
        only = {module}
        if model.config.tie_word_embeddings and module is model.embed_tokens:
            model.lm_head.weight = model.embed_tokens.weight
            only.add(model.lm_head)  # a whole-model init writes the tied weight twice; the head's wins
        model.init_weights(only=only)
        if module in expert_groups:
            tag_expert_parameters(module, expert_groups[module])
        if own:
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config, dtype=dtype)


def hook_blocks_not_submodules(model: nn.Module) -> int:
    """Under ZeRO-3, make each transformer block one unit for DeepSpeed's parameter hooks
    (`deepspeed.utils.set_z3_leaf_modules`, public API); returns how many blocks.

    DeepSpeed otherwise hooks every submodule (71-87 modules of the debug model with the EP / SP
    wrappers; 11 after this): four Python hooks per module per step, each fetching or releasing
    only that module's parameters, and 244 autograd Function calls per step that bind their
    arguments through `inspect.signature`. A block as the unit gathers its parameters at its
    pre-forward / pre-backward hook in one coalesced all-gather and releases them after it: the
    same bytes and collectives, a block's worth live at once instead of one submodule's (a block's
    experts dominate either way; the planner counts a block, planning/zero.py). Measured on 2 CPU
    ranks: steps 0.71-0.92x as long (README, "Issue 26's speed goals, measured together").
    DeepSpeed then adds a block's gradients to the bucket in parameter order, not arrival order,
    so the reduce-scatter sums each element in another rank order: gradients equal to fp32
    rounding, not bit for bit (tests/train/test_zero3_buckets.py)."""
    from deepspeed.utils import set_z3_leaf_modules

    return len(set_z3_leaf_modules(model, [Block]))


def build_engine(cfg: RunConfig, model_cfg: GPTOSSConfig, ds_config: dict, world: int,
                 dims: ParallelDims | None = None, bucket_per_partition_group: bool = True,
                 persistent_gather_in_one: bool = True, hooks_per_block: bool = True):
    """The DeepSpeed engine for `model_cfg` trained as `cfg` describes.

    `bucket_per_partition_group=False` keeps DeepSpeed's own ZeRO-3 gradient bucketing (one bucket,
    flushed at every change of partition group); `persistent_gather_in_one=False` its one all-gather
    per persistent parameter after each step (train/zero3_persistent_gather.py);
    `hooks_per_block=False` its parameter hooks on every submodule (`hook_blocks_not_submodules`);
    only tests and benchmarks compare against them.
    """
    import deepspeed

    if (bucket_per_partition_group or persistent_gather_in_one) and is_zero3(ds_config):
        check_deepspeed_version(deepspeed.__version__)  # before the (slow) model build
    check_optimizer_builds(ds_config)  # before the (slow) model build
    model = build_model(cfg, model_cfg, world, ds_config, dims)
    if hooks_per_block and is_zero3(ds_config):
        hook_blocks_not_submodules(model)  # before initialize, which registers the hooks
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    if bucket_per_partition_group:
        keep_bucket_per_partition_group(engine.optimizer)
    if persistent_gather_in_one:
        gather_persistent_in_one_collective(engine.optimizer)
    for m in engine.module.modules():  # bf16 DeepSpeed casts buffers; +-rate steps need fp32
        if isinstance(m, TopKRouter) and m.expert_bias is not None:
            m.expert_bias = m.expert_bias.float()
    return engine


def release_engine(engine) -> None:
    """Free what DeepSpeed 0.19.8 keeps of a finished ZeRO-3 engine, so a second engine in the same
    process does not need both memories (bench_gpu.py runs one per attention backend).

    `del engine; gc.collect()` is not enough there: the module stays referenced from
    `runtime/zero/parameter_offload.FWD_MODULE_STACK` and from the class-level `functools.lru_cache`
    of `PartitionedParameterCoordinator.__params_to_release`. Clears both after `engine.destroy()`.
    The caller must drop its own references to the engine (and its module, optimizer, outputs);
    the memory is returned by the `gc.collect()` here or the caller's next one.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine.destroy()
    parameter_offload.FWD_MODULE_STACK.clear()
    fn = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    if not hasattr(fn, "cache_clear"):  # wrapped by DeepSpeed's instrument_w_nvtx, which drops __wrapped__
        fn = next(c.cell_contents for c in fn.__closure__ or () if hasattr(c.cell_contents, "cache_clear"))
    fn.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
