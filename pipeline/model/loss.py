"""The LM head and a chunked linear + cross-entropy that never holds the full logits.

With GPT-OSS's 201,088-token vocabulary the plain `cross_entropy(lm_head(x).float(), targets)`
materialises [B*T, V] fp32 logits (3.3 GB for 4,096 tokens) plus a gradient of the same size.
`linear_cross_entropy` walks the rows in chunks instead: per chunk it computes the logits, the loss
and, when gradients are needed, the gradient of the logits (softmax - one_hot) right away, folds it
into the gradients of the hidden states and the weight, and frees the chunk. Backward then only
scales the stored gradients by the incoming one, so nothing is recomputed (the approach of Liger
Kernel's fused linear cross-entropy). Peak extra memory: one chunk of logits plus a weight-sized
fp32 gradient buffer.

`LMHead` is an `nn.Linear` whose forward also accepts targets, so the loss runs inside the head
module's own forward: DeepSpeed ZeRO-3 gathers `lm_head.weight` around a module's forward and
backward, and a loss computed outside the module would see the partitioned (empty) weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**27
"""Logit elements per chunk (512 MB in fp32): 667 rows at V = 201,088, large enough to keep the GPU
busy with each [rows, D] x [D, V] matmul."""


def default_chunk_rows(vocab_size: int) -> int:
    rows = max(1, CHUNK_ELEMENTS // vocab_size)
    return rows - rows % 64 if rows > 64 else rows  # multiples of 64 suit tensor cores


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, chunk_rows, denominator):
        N = h_ND.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid_N = targets_N != IGNORE_INDEX
        n_valid = valid_N.sum() if denominator is None else denominator  # stays on the device: no host sync
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        for start in range(0, N, chunk_rows):
            h_nD = h_ND[start : start + chunk_rows]
            t_n = targets_N[start : start + chunk_rows]
            valid_n = valid_N[start : start + chunk_rows]
            logits_nV = (h_nD @ w_VD.t()).float()  # as the plain path: matmul in the model dtype, CE in fp32
            lse_n = torch.logsumexp(logits_nV, dim=-1)
            t_n1 = t_n.clamp(min=0)[:, None]  # ignored rows read class 0 and are masked out below
            target_logit_n = logits_nV.gather(1, t_n1)[:, 0]
            loss_sum += torch.where(valid_n, lse_n - target_logit_n, 0.0).sum()
            if not (need_h or need_w):
                continue
            # d(sum of row losses)/d logits = softmax - one_hot(target), zero on ignored rows.
            grad_nV = logits_nV.sub_(lse_n[:, None]).exp_()
            grad_nV.scatter_add_(1, t_n1, torch.full_like(t_n1, -1, dtype=grad_nV.dtype))
            grad_nV.mul_(valid_n[:, None])
            grad_nV = grad_nV.to(h_ND.dtype)
            if need_h:
                grad_h_ND[start : start + chunk_rows] = grad_nV @ w_VD
            if need_w:
                grad_w_VD += (grad_nV.t() @ h_nD).float()
        ctx.save_for_backward(grad_h_ND, grad_w_VD, n_valid)
        ctx.w_dtype = w_VD.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # the loss is the mean over valid rows
        grad_h = (grad_h_ND * scale.to(grad_h_ND.dtype)) if grad_h_ND is not None else None
        grad_w = (grad_w_VD * scale).to(ctx.w_dtype) if grad_w_VD is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    chunk_rows: int | None = None,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean cross_entropy(h @ w.T, targets) over targets != -100, equal in value and gradients to
    the plain computation, without materialising the [N, V] logits (see the module docstring).

    denominator: divide the loss sum by this instead of the number of valid targets (a sequence
    shard's share of the whole sequence's mean, see pipeline/model/gpt_oss.py `SequenceShard`)."""
    if h_ND.ndim != 2 or targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"expected h [N, D] and targets [N], got {tuple(h_ND.shape)} and {tuple(targets_N.shape)}")
    rows = default_chunk_rows(w_VD.shape[0]) if chunk_rows is None else chunk_rows
    if rows < 1:
        raise ValueError(f"chunk_rows ({rows}) must be >= 1")
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, rows, denominator)


class LMHead(nn.Linear):
    """Bias-free projection to the vocabulary. forward(x [.., D]) -> logits [.., V];
    forward(x, targets [..]) -> mean LM loss via `linear_cross_entropy` (no full logits)."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__(n_embd, vocab_size, bias=False)
        self.chunk_rows: int | None = None  # None = default_chunk_rows(vocab_size)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, denominator: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)
        return linear_cross_entropy(
            x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1), self.chunk_rows, denominator
        )
