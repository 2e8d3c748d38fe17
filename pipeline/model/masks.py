"""Who may attend to whom: causal, sliding-window and document masks, for both attention backends.

The rule is one predicate over (sample b, query position i, key position j):

    j <= i                       causal
    i - j < window               sliding-window layers (the query's own position included)
    doc[b, i] == doc[b, j]       document masking: packed documents never see each other

It is written twice, once per backend: `attention_mask` builds SDPA's explicit boolean mask and
`block_mask` builds FlexAttention's block-sparse `BlockMask` (blocks of 128 x 128 that are fully
masked are skipped, so a sliding layer costs O(T x window) rather than O(T^2)). Tests compare the
two backends on every combination.

Documents (Megatron's `--reset-attention-mask --reset-position-ids`): a document ends with its
`eos_token_id`, which belongs to the document it ends; the next token starts a new one, and RoPE
positions restart at 0 there. Everything here is computed on the device, without host syncs.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def document_ids(input_ids_BT: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, T] index of the document each token belongs to (0, 1, ... per sample); EOS ends its document."""
    is_eos = (input_ids_BT == eos_token_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos  # the EOS itself still counts as the old document


def document_positions(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token inside its document (restarts at 0 at every document start)."""
    B, T = doc_BT.shape
    t_BT = torch.arange(T, device=doc_BT.device).expand(B, T)
    is_start = torch.ones_like(doc_BT, dtype=torch.bool)
    is_start[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    # The latest document start at or before each token: a running max over start indices.
    start_BT = torch.cummax(torch.where(is_start, t_BT, torch.zeros_like(t_BT)), dim=1).values
    return t_BT - start_BT


def attention_mask(
    t_q: int,
    t_k: int,
    window: int | None,
    sinks: bool,
    device: torch.device,
    doc_BT: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """SDPA's boolean mask, True = may attend, or None for plain causal.

    Shape [t_q, t_k] (+1 sink column first), or [B, 1, t_q, t_k (+1)] with document ids `doc_BT`
    (t_q == t_k). Queries are the last `t_q` of `t_k` positions (t_k > t_q while decoding with a KV
    cache). None means the caller can use SDPA's `is_causal` (t_q == t_k) or no mask (t_q == 1).
    """
    offset = t_k - t_q
    if not sinks and window is None and doc_BT is None and (offset == 0 or t_q == 1):
        return None
    q_pos = torch.arange(offset, t_k, device=device)[:, None]  # [t_q, 1]
    k_pos = torch.arange(t_k, device=device)[None, :]  # [1, t_k]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    if doc_BT is not None:
        if offset:
            raise ValueError("document masks need the whole sequence (no KV-cache offset)")
        mask = (mask & (doc_BT[:, :, None] == doc_BT[:, None, :]))[:, None]  # [B, 1, t_q, t_k]
    if sinks:
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)
    return mask  # [t_q, t_k (+1)] or [B, 1, t_q, t_k (+1)]


def _mask_mod(window: int | None, doc_BT: torch.Tensor | None):
    """FlexAttention's mask_mod(b, h, q_idx, kv_idx) -> bool for the predicate in the module docstring."""

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    base = causal if window is None else sliding
    if doc_BT is None:
        return base

    def documents(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) & (doc_BT[b, q_idx] == doc_BT[b, kv_idx])

    return documents


@functools.lru_cache(maxsize=32)
def _static_block_mask(window: int | None, length: int, device: torch.device) -> BlockMask:
    # Causal and sliding masks depend only on (window, length, device): built once, shared by every
    # layer and every step (B=H=None broadcasts over batch and heads).
    return create_block_mask(_mask_mod(window, None), None, None, length, length, device=device)


def block_mask(
    window: int | None, length: int, device: torch.device, doc_BT: torch.Tensor | None = None
) -> BlockMask:
    """FlexAttention BlockMask for a full sequence of `length` (queries == keys).

    Without documents the mask is cached per (window, length, device). Document masks differ per
    sample and batch, so they are built per forward from `doc_BT` [B, length] (once per window,
    shared by all layers with that window).
    """
    device = torch.device(device)
    if doc_BT is None:
        return _static_block_mask(window, length, device)
    return create_block_mask(_mask_mod(window, doc_BT), doc_BT.shape[0], None, length, length, device=device)
