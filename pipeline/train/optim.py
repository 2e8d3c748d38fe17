"""Pieces every training path shares: parameter groups, the LR schedule, AdamW (the loss is in loss.py).

The DeepSpeed trainer, the plain-PyTorch `train_model` API, the single-process reference the
equivalence tests compare against, and the benchmark all call these, so "the same run" means
the same decay groups and the same learning rate at every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, sinks and embeddings are not decayed (Megatron/OLMo)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embed" in name or "pos_embed" in name
        # Stacked expert weights are 3-D [E, in, out]; their biases are 2-D [E, out].
        # A parameter ZeRO-3 partitioned at start-up is a flat shard: its ds_shape is the real one.
        ndim = len(getattr(p, "ds_shape", p.shape))
        is_bias_or_norm = ndim < 2 or name.endswith("bias") or "sinks" in name
        (no_decay if is_embedding or is_bias_or_norm else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine to optim.min_lr; `step` counts from 0.

    A pure function of the step, so a resumed run follows the same schedule with no state to save.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = optim.decay_steps or max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_torch_adamw(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """The optimizer the DeepSpeed config asks for on CPU (`torch_adam`), for plain-PyTorch runs."""
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps
    )


def cuda_include_hint() -> str:
    """Where the pip CUDA wheels keep their headers (what a FusedAdam build needs on CPATH), if installed."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    found = sorted({d for root in roots for d in glob.glob(f"{root}/cu*/include")})
    return ":".join(found) or "<site-packages>/nvidia/cu13/include"


def check_optimizer_builds(ds_config: dict) -> None:
    """optim.implementation=fused: build (or load) DeepSpeed's FusedAdam now, at start-up, and turn a
    failed build into one line that says what to set, instead of a compiler log at the first step."""
    from pipeline.errors import ConfigError

    params = ds_config.get("optimizer", {}).get("params", {})
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if params.get("torch_adam", False) or offload not in ("none", None) or not torch.cuda.is_available():
        return
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
    except Exception as e:  # noqa: BLE001 (any build failure ends in the same advice)
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(
            f"optim.implementation=fused: DeepSpeed could not build FusedAdam ({first[:200]}); on a CUDA 13 "
            f"toolkit set CPATH={cuda_include_hint()} and DS_SKIP_CUDA_CHECK=1, or use optim.implementation=auto "
            "(torch's fused AdamW, no build)"
        ) from e
