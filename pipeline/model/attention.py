"""Causal self-attention: GQA, RoPE, sliding windows and learned attention sinks, on SDPA.

Attention sinks (GPT-OSS) add one learned logit per head to every softmax row and drop its
probability afterwards, so a head can attend to "nothing". SDPA has no sink argument, so we append a
*virtual sink key* and widen the head dimension by one column:

    q' = [q, sink_h * sqrt(d)]      k'_sink = [0, ..., 0, 1]    v'_sink = 0
    k'_j = [k_j, 0]                 v'_j = v_j

With scale 1/sqrt(d), q'.k'_j * scale is the ordinary logit and q'.k'_sink * scale = sink_h, so the
softmax is exactly transformers' `softmax([logits, sink])[..., :-1]` and autograd reaches the sinks
through q'. The sink key is the same for every kv head, which keeps GQA intact. Masks are explicit
booleans (the sink column always visible); the `is_causal` fast path is used whenever no mask is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import GPTOSSConfig
from pipeline.model.rope import apply_rope


def attention_mask(
    t_q: int, t_k: int, window: int | None, sinks: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [t_q, t_k (+1 sink column first)], True = may attend, or None for plain causal.

    Queries are the last `t_q` of `t_k` positions (t_k > t_q while decoding with a KV cache). A key j
    is visible to query i iff j <= i and, on sliding layers, i - j < window. None means the caller
    can use SDPA's `is_causal` (t_q == t_k) or no mask at all (t_q == 1).
    """
    offset = t_k - t_q
    if not sinks and window is None and (offset == 0 or t_q == 1):
        return None
    q_pos = torch.arange(offset, t_k, device=device)[:, None]  # [t_q, 1]
    k_pos = torch.arange(t_k, device=device)[None, :]  # [1, t_k]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    if sinks:
        mask = torch.cat([mask.new_ones(t_q, 1), mask], dim=1)
    return mask  # [t_q, t_k (+1)]


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

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`mask` comes from `attention_mask` for this layer's window (shared by all such layers)."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, Hkv, T_past + T, d]
        if self.sinks is not None:
            q, k, v = self._append_sink(q, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),  # explicit: q and k are one column wider with sinks
            enable_gqa=self.n_kv_head != self.n_head,
        )  # [B, H, T, d (+1 with sinks)]
        y = y[..., : self.head_dim].transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))

    def _append_sink(self, q, k, v):
        """The virtual sink key of the module docstring: q/k gain a column, k/v gain a first row."""
        B, H, T, d = q.shape
        sink_col = (self.sinks.to(q.dtype) * math.sqrt(d)).view(1, H, 1, 1).expand(B, H, T, 1)
        q = torch.cat([q, sink_col], dim=-1)  # [B, H, T, d+1]
        sink_key = k.new_zeros(B, self.n_kv_head, 1, d + 1)
        sink_key[..., -1] = 1.0
        k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)  # [B, Hkv, 1 + T_k, d+1]
        # v is widened too: SDPA's fused CPU kernel needs equal q/k/v head dims (else: slow math path).
        v = torch.cat([v.new_zeros(B, self.n_kv_head, 1, d + 1), F.pad(v, (0, 1))], dim=2)
        return q, k, v  # v: [B, Hkv, 1 + T_k, d+1]
