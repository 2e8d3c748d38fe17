"""Shared helpers for the model tests."""

import torch

from pipeline.model import GPTOSS, get_preset


def tiny_gpt_oss(**overrides):
    """debug preset, made smaller/faster for tests unless overridden."""
    fields = dict(vocab_size=128, n_layer=2, sliding_window=8)
    fields.update(overrides)
    return get_preset("debug", **fields)


@torch.no_grad()
def randomize_(model: GPTOSS, seed: int = 0) -> GPTOSS:
    """Non-trivial values for parameters init leaves at 0/1 (biases, sinks, norm gains)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") or name.endswith("sinks"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model
