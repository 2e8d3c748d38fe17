"""Model -> DeepSpeed engine, the one way the trainer and the exporter both build it.

Order matters: expert-parallel groups exist before the model; every rank builds the *same* full
model from the same seed, so each rank's expert slice is a slice of one model and the non-expert
weights DeepSpeed broadcasts from rank 0 are the ones every rank already has; expert parallelism
and activation checkpointing are applied from outside the (pure PyTorch) model; then
`deepspeed.initialize` partitions everything under ZeRO.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.distributed as dist

from pipeline.model import GPTOSS, GPTOSSConfig
from pipeline.train.config import RunConfig
from pipeline.train.expert_parallel import (
    apply_expert_parallel,
    check_expert_parallel_size,
    create_expert_groups,
    tag_expert_parallel_parameters,
)
from pipeline.train.optim import param_groups


def quiet_library_warnings() -> None:
    """DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 deprecates, once per bucket per
    step: hundreds of identical lines that would bury the training log."""
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning
    )


def init_distributed() -> tuple[int, int]:
    """Rank and world size; gloo on CPU, NCCL on GPUs. Works under deepspeed, torchrun or alone."""
    import deepspeed

    quiet_library_warnings()
    if not dist.is_initialized():
        for key, default in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(key, default)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: RunConfig, model_cfg: GPTOSSConfig, world: int) -> GPTOSS:
    """This rank's model: non-expert weights whole, experts only its expert-parallel slice.

    Built on the meta device and materialised after the expert swap, so no rank ever allocates the
    full set of experts (gpt-oss-120b's would be ~470 GB in fp32), and DeepSpeed moves only this
    rank's share onto the GPU before partitioning it. Per-tensor seeded init makes every value equal
    to the same tensor of a model built whole from the same seed.
    """
    ep = cfg.parallel.expert_parallel_size
    check_expert_parallel_size(ep, world, model_cfg.n_experts)
    groups = create_expert_groups(ep) if ep > 1 else None
    torch.manual_seed(cfg.train.seed)  # the same init_seed on every rank
    with torch.device("meta"):
        model = GPTOSS(model_cfg)
    if groups is not None:
        apply_expert_parallel(model, groups)
    model.materialize("cpu")
    if groups is not None:
        tag_expert_parallel_parameters(model)
    if cfg.parallel.activation_checkpointing:
        model.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return model


def build_engine(cfg: RunConfig, model_cfg: GPTOSSConfig, ds_config: dict, world: int):
    """The DeepSpeed engine for `model_cfg` trained as `cfg` describes."""
    import deepspeed

    model = build_model(cfg, model_cfg, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    return engine
