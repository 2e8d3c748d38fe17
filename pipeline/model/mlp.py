"""Feed-forward activations shared by experts and dense blocks, and the dense MLP.

Gated projections keep gate and up *interleaved* along the last dimension (column 2i is gate i,
column 2i+1 is up i), the layout of transformers' GptOss checkpoints, so weights convert without
reshuffling and there is one layout to get right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import GPTOSSConfig


class Activation(nn.Module):
    """Maps the first projection's output [..., 2F] (gated) or [..., F] (GELU) to [..., F]."""

    def __init__(self, config: GPTOSSConfig):
        super().__init__()
        self.gated = config.use_swiglu
        self.gpt_oss = config.gpt_oss_swiglu
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return F.gelu(h)
        gate, up = h[..., ::2], h[..., 1::2]
        if self.gpt_oss:
            # Clamping bounds activations for low-precision training/inference; the +1 on up keeps an
            # identity-like path through the expert (GPT-OSS).
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return F.silu(gate) * up

    def extra_repr(self) -> str:
        kind = "gpt_oss_swiglu" if self.gated and self.gpt_oss else "swiglu" if self.gated else "gelu"
        return kind


class MLP(nn.Module):
    """Dense FFN of non-MoE blocks. Returns (y, 0) so every block's FFN has the MoE signature."""

    def __init__(self, config: GPTOSSConfig):
        super().__init__()
        hidden = config.dense_hidden
        width = 2 * hidden if config.use_swiglu else hidden
        self.gate_up_proj = nn.Linear(config.n_embd, width, bias=config.bias)  # gated: interleaved
        self.act = Activation(config)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.dropout(self.down_proj(self.act(self.gate_up_proj(x_BTD))))
        return y, x_BTD.new_zeros(())
