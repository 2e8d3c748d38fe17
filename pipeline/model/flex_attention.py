"""The FlexAttention backend: fused block-sparse attention with GPT-OSS sinks applied from the lse.

Why not SDPA on the GPU: our SDPA path widens q/k to head_dim + 1 for the virtual sink column and
passes an explicit mask. Flash attention takes no mask and cuDNN / memory-efficient attention need
head_dim % 8 == 0, so CUDA falls back to SDPA's math kernel (fp32 upcast, [B, H, T, T+1] scores).

FlexAttention keeps head_dim at 64, handles GQA natively and skips fully masked 128 x 128 blocks
(pipeline/model/masks.py). It also returns the log-sum-exp of each query row, which is all the
sink needs. With s = sink logit of the head and lse over the row's visible logits,

    softmax([logits, s])[:-1] = softmax(logits) * exp(lse) / (exp(lse) + exp(s))
                              = softmax(logits) * sigmoid(lse - s)

so `out = flex_out * sigmoid(lse - s)` is exact, and the lse gradient carries the sink's effect back
to q and k (torchtitan's gpt_oss does the same). Compiled on CUDA; on CPU torch 2.13 only has the
eager forward (no backward), so CPU training uses SDPA, and asking for flex there is an error.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from pipeline.errors import ConfigError
from pipeline.model.config import ATTENTION_BACKENDS


def resolve_attention_backend(requested: str, device: torch.device, training: bool, dropout: float) -> str:
    """"sdpa" or "flex" for `requested` on `device`; ConfigError if the device cannot run it.

    auto = flex on CUDA (unless attention dropout is on: FlexAttention has none), sdpa elsewhere.
    `training` means gradients will be needed (CPU FlexAttention has no backward in torch 2.13).
    """
    if requested == "sdpa":
        return "sdpa"
    if requested == "auto":
        return "flex" if device.type == "cuda" and dropout == 0 else "sdpa"
    if requested != "flex":
        raise ConfigError(f"attention_backend ({requested!r}) must be one of {ATTENTION_BACKENDS}")
    if device.type == "cpu" and training:
        raise ConfigError(
            "model.attention_backend='flex' cannot train on CPU (torch's FlexAttention has no CPU "
            "backward); use model.attention_backend=auto (sdpa on CPU, flex on CUDA) or sdpa"
        )
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"model.attention_backend='flex' does not run on {device.type}; use model.attention_backend=sdpa"
        )
    return "flex"


@functools.cache
def compiled_flex_attention(backend: str = "inductor"):
    """flex_attention compiled once per process (per dynamo backend; tests count graphs with "eager").

    dynamic=None (automatic dynamic shapes): the first shape gets a kernel specialised to it, which
    is what a training run, all of one length, uses; the first call at another length recompiles
    once into a kernel for any length. Generation prefills and evaluations at many lengths therefore
    add one graph per mask kind (full, sliding, with or without documents), where dynamic=False
    compiled one per length until dynamo's recompile limit (8) sent every later call to the slow
    eager flex_attention.
    """
    return torch.compile(flex_attention, dynamic=None, backend=backend)


def _flex(q, k, v, block_mask, scale, return_lse):
    kwargs = dict(
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        return_aux=AuxRequest(lse=True) if return_lse else None,
    )
    if q.device.type == "cuda":
        return compiled_flex_attention()(q, k, v, **kwargs)
    with warnings.catch_warnings():
        # Off CUDA the unfused eager kernel is the only one (forward only): its performance warning
        # says to compile, which CPU cannot do with lse.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)


def flex_attention_with_sinks(
    q_BHTd: torch.Tensor,
    k_BGTd: torch.Tensor,
    v_BGTd: torch.Tensor,
    block_mask: BlockMask,
    sinks_H: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention [B, H, T, d] of q [B, H, T, d] over k/v [B, Hkv, T, d] under `block_mask`, with the
    sink logits [H] (or None) applied exactly through the per-row log-sum-exp."""
    if sinks_H is None:
        return _flex(q_BHTd, k_BGTd, v_BGTd, block_mask, scale, return_lse=False)
    out_BHTd, aux = _flex(q_BHTd, k_BGTd, v_BGTd, block_mask, scale, return_lse=True)
    return apply_sinks(out_BHTd, aux.lse, sinks_H)


def apply_sinks(out_BHTd: torch.Tensor, lse_BHT: torch.Tensor, sinks_H: torch.Tensor) -> torch.Tensor:
    """Rescale attention output by the probability mass the sink leaves: sigmoid(lse - sink)."""
    keep_BHT = torch.sigmoid(lse_BHT.float() - sinks_H.float()[None, :, None])
    return out_BHTd * keep_BHT.unsqueeze(-1).to(out_BHTd.dtype)
