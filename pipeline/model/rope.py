"""Rotary position embeddings, optionally with YaRN scaling, numerically as transformers computes them.

GPT-OSS rotates the two *halves* of each head (not interleaved pairs) and YaRN multiplies cos/sin by
an attention factor (0.1*ln(32)+1 = 1.3466 for GPT-OSS), which scales every q.k logit by its square.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.model.config import YaRNScaling


def rope_frequencies(head_dim: int, theta: float, scaling: YaRNScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32, CPU) and the cos/sin multiplier.

    Mirrors `transformers.modeling_rope_utils._compute_yarn_parameters` operation for operation so our
    logits match GptOssForCausalLM to float rounding.
    """
    cpu = torch.device("cpu")  # explicit: a `with torch.device("meta")` model build must not affect it
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=cpu).float() / head_dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    if scaling is None:
        return inv_freq_extrapolation, 1.0

    factor = scaling.factor
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations: float) -> float:
        # Dimension whose wavelength completes `num_rotations` turns over the original context.
        original = scaling.original_max_position_embeddings
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp(
        (torch.arange(head_dim // 2, device=cpu, dtype=torch.float32) - low) / (high - low), 0, 1
    )
    # High-frequency dims (ramp 0) keep their RoPE frequency; low-frequency dims are interpolated.
    extrapolation_weight = 1 - ramp
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Holds no parameters or buffers.

    The frequencies live in a plain CPU attribute rather than a buffer so that building the model on
    the meta device (parameter counting) or materialising it with `to_empty` never loses them.
    """

    def __init__(self, head_dim: int, theta: float, scaling: YaRNScaling | None):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(head_dim, theta, scaling)
        # One copy per device: a host-to-device copy every forward would be a sync per micro-batch.
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {self.inv_freq.device: self.inv_freq}

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 inverse frequencies on `device`, copied there once."""
        cached = self._inv_freq_on.get(device)
        if cached is None:
            cached = self._inv_freq_on[device] = self.inv_freq.to(device)
        return cached

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [..., head_dim/2] in `dtype` for integer positions [...] ([T] or [B, T])."""
        inv_freq = self.inv_freq_on(positions.device)
        freqs = positions.float()[..., None] * inv_freq  # [..., hd/2], fp32 like transformers
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    return torch.cat((x1 * cos_Th - x2 * sin_Th, x2 * cos_Th + x1 * sin_Th), dim=-1)
