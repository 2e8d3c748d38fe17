"""The training objective every path shares (DeepSpeed trainer, `train_model`, the reference the
equivalence tests compare against, the benchmarks): next-token loss plus the weighted router loss,
with the MoE layers' statistics of the same forward; and the trainer's aux-loss-free balancing of
the routers (`ExpertBiasBalancer`), which steers the same objective from the step's expert loads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.distributed.collectives import all_reduce_sum_
from pipeline.model.moe import MoE, RouterStats


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


class ExpertBiasBalancer:
    """Aux-loss-free balancing (model.load_balance_bias_rate) after every applied step, from the step's
    expert loads summed over all micro-batches and all ranks: one all-reduce for all layers, the same
    update everywhere. Routing is local to each rank (also under expert parallelism), so this sum is
    the global load."""

    def __init__(self, model: nn.Module, rate: float):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.rate = rate

    def update(self, tokens_LE: torch.Tensor) -> None:
        """tokens_LE [MoE layers, experts]: this rank's routed slots of the step."""
        if self.rate <= 0 or not self.layers:
            return
        tokens_LE = all_reduce_sum_(tokens_LE.clone())  # stays on the device: no host sync for this
        for m, tokens_E in zip(self.layers, tokens_LE, strict=True):
            m.router.update_expert_bias(tokens_E, self.rate)

    def biases(self) -> list[torch.Tensor]:
        """[experts] per MoE layer with a bias (equal on every rank), for the metrics."""
        return [m.router.expert_bias for m in self.layers if m.router.expert_bias is not None]
