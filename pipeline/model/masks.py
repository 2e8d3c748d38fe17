"""Who may attend to whom: causal, sliding-window and document masks, for both attention backends.

The rule is one predicate over (sample b, query position i, key position j):

    j <= i                       causal
    i - j < window               sliding-window layers (the query's own position included)
    doc[b, i] == doc[b, j]       document masking: packed documents never see each other

It is written twice, once per backend: `attention_mask` builds SDPA's explicit boolean mask and
`block_mask` builds FlexAttention's block-sparse `BlockMask` (blocks of 128 x 128 that are fully
masked are skipped, so a sliding layer costs O(T x window) rather than O(T^2)). Tests compare the
two backends on every combination.

Document BlockMasks change every micro-batch. `create_block_mask` would evaluate the predicate on
all T x T pairs (0.7-1.7 s per micro-batch at T=4096 on CPU); `document_block_mask` instead
classifies each 128 x 128 block from the document starts in O(B x (T/128)^2) tensor ops on the
device, no host sync, and yields the identical BlockMask (tests/model/test_document_block_mask.py).

Documents (Megatron's `--reset-attention-mask --reset-position-ids`): a document ends with its
`eos_token_id`, which belongs to the document it ends; the next token starts a new one, and RoPE
positions restart at 0 there. Everything here is computed on the device, without host syncs.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask


def document_ids(input_ids_BT: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, T] index of the document each token belongs to (0, 1, ... per sample); EOS ends its document."""
    is_eos = (input_ids_BT == eos_token_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos  # the EOS itself still counts as the old document


def document_starts(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first token of each token's document."""
    B, T = doc_BT.shape
    t_BT = torch.arange(T, device=doc_BT.device).expand(B, T)
    is_start = torch.ones_like(doc_BT, dtype=torch.bool)
    is_start[:, 1:] = doc_BT[:, 1:] != doc_BT[:, :-1]
    # The latest document start at or before each token: a running max over start indices.
    return torch.cummax(torch.where(is_start, t_BT, torch.zeros_like(t_BT)), dim=1).values


def document_positions(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token inside its document (restarts at 0 at every document start)."""
    return torch.arange(doc_BT.shape[1], device=doc_BT.device) - document_starts(doc_BT)


def attention_mask(
    t_q: int,
    t_k: int,
    window: int | None,
    sinks: bool,
    device: torch.device,
    doc_BT: torch.Tensor | None = None,
    pad_B: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """SDPA's boolean mask, True = may attend, or None for plain causal.

    Shape [t_q, t_k] (+1 sink column first), or [B, 1, t_q, t_k (+1)] with document ids `doc_BT`
    (t_q == t_k) or left padding `pad_B` [B] (the first pad_B[b] key slots of row b are padding).
    Queries are the last `t_q` of `t_k` positions (t_k > t_q while decoding with a KV cache). None
    means the caller can use SDPA's `is_causal` (t_q == t_k) or no mask (t_q == 1).
    """
    offset = t_k - t_q
    if not sinks and window is None and doc_BT is None and pad_B is None and (offset == 0 or t_q == 1):
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
    elif pad_B is not None:
        # A padding query still sees itself: a row with no visible key (no sink) would be NaN, and
        # SDPA's 0 weight times a NaN value poisons the real rows of the next layer.
        real = (k_pos >= pad_B[:, None, None]) | (k_pos == q_pos)  # [B, t_q, t_k]
        mask = (mask & real)[:, None]  # [B, 1, t_q, t_k]
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
    # layer and every step (B=1, H=1 broadcast over batch and heads). Built from block corners as one
    # document: `create_block_mask` would materialise all T x T pairs (17 GB at T=131,072).
    one_document_1T = torch.zeros(1, length, dtype=torch.long, device=device)
    return document_block_mask(window, one_document_1T, mask_mod=_mask_mod(window, None))


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
    return document_block_mask(window, doc_BT)


def _dense_to_ordered(blocks_BHQK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block row: how many blocks are set, and their column indices first (as torch orders them)."""
    dense = blocks_BHQK.to(torch.int32)
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def document_block_mask(
    window: int | None, doc_BT: torch.Tensor, block: int = _DEFAULT_SPARSE_BLOCK_SIZE, mask_mod=None
) -> BlockMask:
    """The BlockMask `create_block_mask(_mask_mod(window, doc_BT), B, None, T, T)` builds, computed from
    block corners instead of all T x T pairs.

    Documents are contiguous, so the start s(i) of query i's document never decreases with i, and
    so do i - window + 1 and i. For a query block [a0, a1] and an earlier key block [c0, c1]:
    - some pair may attend iff the block's *first* query can reach the key block's *last* key:
      s(a0) <= c1 and a0 - c1 < window (the first query is the least constrained);
    - every pair may iff the *last* query can reach the *first* key: s(a1) <= c0 and
      a1 - c0 < window, with both blocks whole (torch pads a trailing partial block with False).
    A diagonal block always holds some pair (i attends i) and never all (causal); later key
    blocks hold none. `mask_mod` overrides the predicate FlexAttention evaluates in partial blocks
    (the static masks pass one without the document lookup).
    """
    B, T = doc_BT.shape
    device = doc_BT.device
    n = -(-T // block)  # blocks per side, the last one possibly partial
    start_BT = document_starts(doc_BT)  # s(i)
    first_n = torch.arange(n, device=device) * block  # a0 (and c0)
    last_n = (first_n + block - 1).clamp(max=T - 1)  # a1 (and c1) inside the sequence
    s_first_Bq = start_BT[:, first_n][:, :, None]  # [B, n, 1]: s(a0)
    s_last_Bq = start_BT[:, last_n][:, :, None]  # [B, n, 1]: s(a1)
    a0, a1 = first_n[:, None], last_n[:, None]  # query block rows [n, 1]
    c0, c1 = first_n[None, :], last_n[None, :]  # key block columns [1, n]
    earlier = c0 < a0
    reach = T if window is None else window  # no window: every distance (< T) is within reach
    whole = (first_n + block <= T)[:, None] & (first_n + block <= T)[None, :]
    any_BQK = (earlier & (a0 - c1 < reach) & (s_first_Bq <= c1)) | (c0 == a0)
    full_BQK = earlier & whole & (a1 - c0 < reach) & (s_last_Bq <= c0)
    partial_BQK = any_BQK & ~full_BQK
    # Both orientations straight from the dense block tables (BlockMask.from_kv_blocks would
    # rebuild the dense tables from the kv side with an index_put, 10x this whole function on CPU).
    partial_BHQK, full_BHQK = partial_BQK[:, None], full_BQK[:, None]
    return BlockMask(
        (T, T),
        *_dense_to_ordered(partial_BHQK),
        *_dense_to_ordered(full_BHQK),
        *_dense_to_ordered(partial_BHQK.transpose(-2, -1)),
        *_dense_to_ordered(full_BHQK.transpose(-2, -1)),
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod or _mask_mod(window, doc_BT),
    )
