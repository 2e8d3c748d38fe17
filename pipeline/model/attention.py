"""Causal self-attention: GQA, RoPE, sliding windows and learned attention sinks, on two backends.

`Attention.forward` runs FlexAttention when its mask is a `BlockMask` (the fast path on CUDA, see
pipeline/model/flex_attention.py) and SDPA otherwise (CPU training, KV-cache decoding, and the
numerical reference). The SDPA path is described here.

Attention sinks (GPT-OSS) add one learned logit per head to every softmax row and drop its
probability afterwards, so a head can attend to "nothing". SDPA has no sink argument, so we append a
*virtual sink key* and widen the head dimension by one column:

    q' = [q, sink_h * sqrt(d)]      k'_sink = [0, ..., 0, 1]    v'_sink = 0
    k'_j = [k_j, 0]                 v'_j = v_j

With scale 1/sqrt(d), q'.k'_j * scale is the ordinary logit and q'.k'_sink * scale = sink_h, so the
softmax is exactly transformers' `softmax([logits, sink])[..., :-1]` and autograd reaches the sinks
through q'. The sink key is the same for every kv head, which keeps GQA intact. Masks are explicit
booleans (the sink column always visible); the `is_causal` fast path is used whenever no mask is needed.

The seam for sequence parallelism: projections and RoPE stay in `Attention`, the softmax part runs in
`Attention.core` (an `AttentionCore`: q/k/v/mask/sinks -> output, both backends). pipeline/train swaps
`core` for a module that exchanges sequence shards for head shards around the same local core, so
the model itself never imports torch.distributed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from pipeline.model.config import GPTOSSConfig
from pipeline.model.flex_attention import flex_attention_with_sinks
from pipeline.model.masks import attention_mask
from pipeline.model.rope import apply_rope

__all__ = ["Attention", "AttentionCore", "DecodeCache", "KVCache", "attention_mask"]


class KVCache:
    """Preallocated keys/values [B, H_kv, max_len, d] of one attention layer, for incremental decoding."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H_kv, T, d] keys/values; return all cached ones [B, H_kv, length, d]."""
        end = self.length + k_new.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; cannot grow to {end}")
        self.k[:, :, self.length : end] = k_new
        self.v[:, :, self.length : end] = v_new
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class DecodeCache:
    """What incremental decoding keeps between forwards of the whole model: one `KVCache` per layer and,
    for a batch of prompts of different lengths (left-padded to one length), how many padding slots
    each row starts with, pad_B [B]. Padding keys are masked and a row's positions count from its first
    real token, so each row decodes as it would alone (pipeline/model/masks.py `attention_mask`)."""

    def __init__(self, layers: list[KVCache], pad_B: torch.Tensor | None = None):
        self.layers = layers
        self.pad_B = pad_B

    @property
    def length(self) -> int:
        """Slots filled so far (padding included), the same in every layer."""
        return self.layers[0].length


class Attention(nn.Module):
    """Multi-head causal self-attention; projection names follow transformers' GptOssAttention."""

    def __init__(self, config: GPTOSSConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.window = config.layer_window(layer_idx)
        self.use_rope = config.position_embedding == "rope"
        self.dropout = config.dropout
        d, bias = config.n_embd, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.use_attention_sinks else None
        self.resid_dropout = nn.Dropout(config.dropout)
        self.core: nn.Module = AttentionCore()  # replaced by sequence parallelism (pipeline/train)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | BlockMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`mask` is this layer's window mask (shared by all such layers), built by pipeline/model/masks.py:
        a `BlockMask` selects FlexAttention, a boolean tensor or None selects SDPA.

        cos/sin are [T, d/2], or [B, 1, T, d/2] when positions differ per sample (documents)."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, Hkv, T_past + T, d]
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout = self.dropout if self.training else 0.0
        y = self.core(q, k, v, mask, self.sinks, scale, dropout)  # [B, H, T, d]
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H * d]
        return self.resid_dropout(self.o_proj(y))


class AttentionCore(nn.Module):
    """softmax(q k^T * scale + mask, with sinks) v for q [B, H, T, d], k/v [B, Hkv, S, d] -> [B, H, T, d].

    A `BlockMask` selects FlexAttention, a boolean mask or None selects SDPA. Holds no parameters:
    the sinks [H] are passed in by the owning `Attention`, so a replacement core may take a slice
    of them (the heads it runs) without changing the state dict."""

    def forward(self, q, k, v, mask, sinks_H, scale: float, dropout: float = 0.0) -> torch.Tensor:
        if isinstance(mask, BlockMask):
            return flex_attention_with_sinks(q, k, v, mask, sinks_H, scale)
        return sdpa_attention_with_sinks(q, k, v, mask, sinks_H, scale, dropout)


def sdpa_attention_with_sinks(
    q_BHTd: torch.Tensor,
    k_BGSd: torch.Tensor,
    v_BGSd: torch.Tensor,
    mask: torch.Tensor | None,
    sinks_H: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA of q [B, H, T, d] over k/v [B, Hkv, S, d] with the virtual sink key of the module
    docstring when sinks_H [H] is given; `mask` from `attention_mask` (sink column included)."""
    T = q_BHTd.shape[2]
    q, k, v = (q_BHTd, k_BGSd, v_BGSd) if sinks_H is None else _append_sink(q_BHTd, k_BGSd, v_BGSd, sinks_H, scale)
    y = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        dropout_p=dropout,
        scale=scale,  # explicit: with sinks q and k are one column wider
        enable_gqa=q.shape[1] != k.shape[1],
    )  # [B, H, T, d (+1 with sinks)]
    return y[..., : q_BHTd.shape[-1]]


def _append_sink(q, k, v, sinks_H, scale):
    """The virtual sink key of the module docstring: q/k gain a column, k/v gain a first row."""
    B, H, T, d = q.shape
    G = k.shape[1]
    sink_col = (sinks_H.to(q.dtype) / scale).view(1, H, 1, 1).expand(B, H, T, 1)  # q'.k'_sink * scale = sink
    q = torch.cat([q, sink_col], dim=-1)  # [B, H, T, d+1]
    sink_key = k.new_zeros(B, G, 1, d + 1)
    sink_key[..., -1] = 1.0
    k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)  # [B, Hkv, 1 + S, d+1]
    # v is widened too: SDPA's fused CPU kernel needs equal q/k/v head dims (else: slow math path).
    v = torch.cat([v.new_zeros(B, G, 1, d + 1), F.pad(v, (0, 1))], dim=2)
    return q, k, v  # v: [B, Hkv, 1 + S, d+1]
