"""The training objective every path shares (DeepSpeed trainer, `train_model`, the reference the
equivalence tests compare against, the benchmarks): next-token loss plus the weighted router loss,
with the MoE layers' statistics of the same forward."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.model.moe import RouterStats


class LossParts(NamedTuple):
    total: torch.Tensor  # lm + router loss: what backward runs on
    lm: torch.Tensor
    router: torch.Tensor  # aux (load-balance) + z-loss, already weighted by the model config
    router_stats: RouterStats | None  # per MoE layer, detached; None for dense models


def compute_loss(model: nn.Module, batch_BT1: torch.Tensor) -> LossParts:
    """batch [B, T + 1] token ids -> next-token loss on the first T positions.

    return_logits=False: the model computes the loss chunk by chunk and never builds the
    [B, T, vocab] logits (3.3 GB in fp32 per 4k-token sample at GPT-OSS's vocabulary).
    `model` is a GPTOSS or an engine wrapping one (`.module`)."""
    inputs, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
    _, lm_loss, router_loss = model(inputs, targets, return_logits=False)
    stats = getattr(model, "module", model).router_stats()
    return LossParts(lm_loss + router_loss, lm_loss, router_loss, stats)
