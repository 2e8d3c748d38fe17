"""Mixture-of-experts layer: router, grouped experts, and the route/permute/compute/combine MoE.

Contract with `pipeline/train` (expert parallelism): `MoE.forward` runs

    1 route      router(x) -> top-k expert ids and weights per token
    2 permute    stable sort of the (token, slot) pairs by expert; capacity drop happens here
    3 compute    y_sorted = self.experts(x_sorted, counts_E)
    4 combine    un-permute and sum the weighted slots per token

and step 3 is the only one expert parallelism replaces: the trainer swaps `moe.experts` for a module
with the same `forward(x_MD, counts_E, padded) -> y_MD` that all-to-alls rows to the ranks owning the
experts (`GroupedExperts.shard` builds each rank's slice). Everything else stays local and identical.

Long sequences: without a capacity factor, more than `MoE.token_chunk` tokens are routed once and
then permuted, computed and combined one chunk of tokens at a time, each chunk recomputed in
backward (`torch.utils.checkpoint`), so no [tokens x top_k, intermediate] tensor of the whole
(local) sequence is ever held; the result is the same as in one piece.

No step reads a device value on the host: shapes are static (with a capacity factor, dropped slots
stay as trailing padding rows, `padded=True`, instead of being removed by a data-dependent boolean
index), so a GPU step runs ahead of the CPU. The one exception is expert parallelism's split
exchange, which must know the row counts on the host.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.config import GPTOSSConfig
from pipeline.model.init import new_init_seed, seeded_normal_
from pipeline.model.mlp import Activation


class RouterOutput(NamedTuple):
    weights_NK: torch.Tensor
    """Combine weights: softmax over the k selected logits (GPT-OSS), dtype of the input."""
    expert_ids_NK: torch.Tensor
    """Selected experts (long), highest logit first."""
    load_balance_loss: torch.Tensor
    """Unweighted Switch loss E * sum_i f_i * P_i with f_i = share of the N*k slots sent to expert i,
    P_i = mean router probability of i. 1.0 when balanced (transformers' variant is k times this)."""
    z_loss: torch.Tensor
    """Unweighted router z-loss mean(logsumexp(logits)^2)."""
    tokens_per_expert_E: torch.Tensor
    """Detached slot counts per expert (long), before any capacity drop."""


class TopKRouter(nn.Module):
    def __init__(self, config: GPTOSSConfig):
        super().__init__()
        self.top_k, self.num_experts = config.top_k, config.n_experts
        self.granularity = config.aux_loss_granularity
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=config.router_bias)
        # Sums detached expert counts over the ranks that hold shards of the same sequences, so the
        # load-balancing loss sees the whole sequence (set by sequence parallelism; None = local).
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Aux-loss-free balancing (DeepSeek-V3): a persistent fp32 buffer, so checkpoints carry it and
        # it is never trained by the optimizer; moved by `update_expert_bias` after each step.
        self.expert_bias: torch.Tensor | None
        if config.load_balance_bias_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(config.n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_ND: torch.Tensor, n_seq: int = 1) -> RouterOutput:
        """x_ND: the n_seq sequences' tokens, flattened in order (n_seq only matters for the
        sequence-level load-balancing loss)."""
        logits_NE = self.gate(x_ND)
        if self.expert_bias is None:
            top_logits_NK, expert_ids_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        else:
            # The bias steers which experts are chosen, never how much they count: the combine
            # weights stay the softmax of the *unbiased* selected logits (DeepSeek-V3 eq. 16).
            _, expert_ids_NK = torch.topk(logits_NE.float() + self.expert_bias, self.top_k, dim=-1)
            top_logits_NK = logits_NE.gather(-1, expert_ids_NK)
        weights_NK = torch.softmax(top_logits_NK, dim=-1)
        # Losses in fp32: logsumexp^2 and the probability means are sensitive under bf16.
        logits32_NE = logits_NE.float()
        counts_E = count_slots(expert_ids_NK, self.num_experts)
        probs_NE = torch.softmax(logits32_NE, dim=-1)
        if self.granularity == "sequence":
            load_balance = self._sequence_load_balance(probs_NE, expert_ids_NK, n_seq)
        else:
            total_E = counts_E if self.reduce_counts is None else self.reduce_counts(counts_E)
            share_E = total_E.float() / total_E.sum().clamp(min=1)  # sum(counts) = N * k slots
            load_balance = self.num_experts * torch.sum(share_E * probs_NE.mean(dim=0))
        z_loss = torch.logsumexp(logits32_NE, dim=-1).square().mean()
        return RouterOutput(weights_NK, expert_ids_NK, load_balance, z_loss, counts_E.detach())

    def _sequence_load_balance(self, probs_NE: torch.Tensor, expert_ids_NK: torch.Tensor, n_seq: int):
        """The Switch loss of each sequence on its own, averaged over sequences (DeepSeek-V3 §2.1.2):
        a batch can be balanced while every sequence sends all its tokens to one expert."""
        E = self.num_experts
        probs_BTE = probs_NE.view(n_seq, -1, E)
        ids_BS = expert_ids_NK.reshape(n_seq, -1)  # [B, T*K]
        counts_BE = torch.zeros(n_seq, E, dtype=probs_NE.dtype, device=probs_NE.device)
        counts_BE.scatter_add_(1, ids_BS, torch.ones_like(ids_BS, dtype=probs_NE.dtype))
        if self.reduce_counts is not None:
            counts_BE = self.reduce_counts(counts_BE)
        share_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp(min=1)  # sum = T * k slots
        return E * (share_BE * probs_BTE.mean(dim=1)).sum(dim=1).mean()

    @torch.no_grad()
    def update_expert_bias(self, tokens_E: torch.Tensor, rate: float) -> None:
        """bias += rate * sign(mean load - load), then centred: underloaded experts become more
        likely to be selected. `tokens_E` must be the step's counts over *all* ranks and
        micro-batches, so every rank applies the same update and the biases stay identical."""
        load_E = tokens_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias -= self.expert_bias.mean()  # only differences between experts matter


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects non-contiguous gradients (e.g. the expanded ones `.sum().backward()`
    produces, or those of an empty output), so its outputs pass through this first.
    """

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() == 0:  # an empty grad may carry zero strides, which grouped_mm also rejects
            return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        return grad.contiguous()


def grouped_mm_problem(x_MD: torch.Tensor, w_EDF: torch.Tensor) -> str | None:
    """Why `F.grouped_mm(x_MD, w_EDF)` (and its backward) cannot run here, or None if it can.

    Both devices need every row stride of x, w, their gradients and w's transpose to be a
    multiple of 16 bytes (so the two trailing weight dims, which are also x's and the output's row
    lengths), and equal dtypes. CUDA also needs bf16 on sm80+ (CUTLASS on sm90/sm100, torch's own
    per-group loop on sm80, both without host syncs).
    """
    if not hasattr(F, "grouped_mm"):
        return "this torch has no F.grouped_mm"
    if x_MD.dtype != w_EDF.dtype:
        return f"input dtype {x_MD.dtype} differs from the weights' {w_EDF.dtype}"
    if x_MD.device.type == "cuda":
        if x_MD.dtype != torch.bfloat16:
            return f"CUDA grouped_mm needs bf16, got {x_MD.dtype}"
        capability = torch.cuda.get_device_capability(x_MD.device)
        if capability < (8, 0):
            return f"CUDA grouped_mm needs compute capability 8.0+, this GPU has {capability[0]}.{capability[1]}"
    elif x_MD.device.type != "cpu":
        return f"no grouped_mm on {x_MD.device.type}"
    size = x_MD.element_size()
    for dim in w_EDF.shape[1:]:
        if (dim * size) % 16:
            return (f"rows of {dim} x {size} bytes are not 16-byte aligned "
                    f"(make the dimension a multiple of {16 // size})")
    return None


def count_slots(expert_ids_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many of the routed slots went to each expert (scatter_add: static shape, no sync)."""
    ids_S = expert_ids_NK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=ids_S.device)
    return counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))


@functools.cache
def _warn_loop_on_cuda(reason: str) -> None:
    # Once per reason per process: the fallback is correct, only slower (a host sync and E matmuls).
    warnings.warn(f"MoE experts use the per-expert loop on CUDA, not grouped_mm: {reason}", stacklevel=3)


def grouped_linear(
    x_MD: torch.Tensor,
    w_EDF: torch.Tensor,
    b_EF: torch.Tensor | None,
    offsets_E: torch.Tensor,
    expert_of_row_M: torch.Tensor,
) -> torch.Tensor:
    """Rows in group e (ending at offsets_E[e]) times w_EDF[e] (+ b_EF[e]) -> [M, F]."""
    y_MF = _ContiguousGrad.apply(F.grouped_mm(x_MD.contiguous(), w_EDF, offs=offsets_E))
    if b_EF is not None:
        # index_select, not b_EF[idx]: its backward is index_add_, far faster on CPU than index_put_.
        y_MF = y_MF + b_EF.index_select(0, expert_of_row_M)
    return y_MF


class GroupedExperts(nn.Module):
    """E independent FFN experts stored as stacked parameters (experts on dim 0).

    Parameters: `gate_up_proj` [E, D, 2F] (gate/up interleaved: [..., ::2] gate, [..., 1::2] up; a GELU
    expert has [E, D, F]), `down_proj` [E, F, D], and with `bias` `gate_up_proj_bias` [E, 2F] /
    `down_proj_bias` [E, D]. Weights are stored input-major (x @ W), as in transformers' GptOss.
    """

    def __init__(self, config: GPTOSSConfig, num_experts: int | None = None):
        super().__init__()
        self.config = config
        E = config.n_experts if num_experts is None else num_experts
        D, hidden = config.n_embd, config.expert_hidden
        width = 2 * hidden if config.use_swiglu else hidden
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, width))
        self.down_proj = nn.Parameter(torch.empty(E, hidden, D))
        if config.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, width))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.act = Activation(config)
        self.expert_offset = 0  # global id of expert 0 (non-zero in an expert-parallel shard)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(
        self, seed: int | None = None, key: str = "experts", device: torch.device | None = None
    ) -> None:
        """GPT-2 init; down_proj writes to the residual stream, hence the 1/sqrt(2 * n_layer).

        Each expert is drawn from its own generator keyed by (seed, key, *global* expert id), so a
        shard re-initialised with the same seed and key holds exactly its slice of the full layer:
        an expert-parallel rank can materialise only its experts. seed=None draws one from torch's
        global RNG (deterministic under torch.manual_seed). device: where to draw (see `seeded_normal_`).
        """
        seed = new_init_seed() if seed is None else seed
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for e in range(self.num_experts):
            expert = self.expert_offset + e
            seeded_normal_(self.gate_up_proj[e], std, seed, f"{key}.gate_up_proj.{expert}", device)
            seeded_normal_(self.down_proj[e], resid_std, seed, f"{key}.down_proj.{expert}", device)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def forward(
        self, x_MD: torch.Tensor, counts_E: torch.Tensor, padded: bool = False, host_counts: list[int] | None = None
    ) -> torch.Tensor:
        """Rows of x_MD grouped by expert 0..E-1, counts_E[e] rows each (zeros allowed, M may be 0).

        padded: rows after the last group (sum(counts_E) < M) are padding; their outputs are zero
        and they pass no gradient. host_counts: counts_E as Python ints when the caller already
        has them (expert parallelism), so the per-expert loop needs no second host sync.
        """
        problem = grouped_mm_problem(x_MD, self.gate_up_proj) or grouped_mm_problem(x_MD, self.down_proj)
        if problem is not None:
            if x_MD.device.type == "cuda":
                _warn_loop_on_cuda(problem)
            return self.forward_reference(x_MD, counts_E if host_counts is None else host_counts, padded)
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        M = x_MD.shape[0]
        if not padded:
            # output_size avoids a device->host sync to learn M.
            expert_of_row_M = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_MD.device), counts_E, output_size=M
            )
            h = grouped_linear(x_MD, self.gate_up_proj, self.gate_up_proj_bias, offsets_E, expert_of_row_M)
            return grouped_linear(self.act(h), self.down_proj, self.down_proj_bias, offsets_E, expert_of_row_M)
        # grouped_mm leaves rows after offsets[-1] undefined, in its outputs and in its input gradients:
        # every grouped product is fenced with a where (zero value, zero gradient) on those rows.
        row_M = torch.arange(M, device=x_MD.device)
        valid_M1 = (row_M < offsets_E[-1])[:, None]
        expert_of_row_M = torch.searchsorted(offsets_E, row_M.to(torch.int32), right=True)
        expert_of_row_M = expert_of_row_M.clamp_(max=self.num_experts - 1)  # padding: any valid index
        x_MD = torch.where(valid_M1, x_MD, 0.0)
        h = grouped_linear(x_MD, self.gate_up_proj, self.gate_up_proj_bias, offsets_E, expert_of_row_M)
        h = torch.where(valid_M1, h, 0.0)
        y = grouped_linear(self.act(h), self.down_proj, self.down_proj_bias, offsets_E, expert_of_row_M)
        return torch.where(valid_M1, y, 0.0)

    def forward_reference(
        self, x_MD: torch.Tensor, counts_E: torch.Tensor | list[int], padded: bool = False
    ) -> torch.Tensor:
        """Per-expert loop: the numerical reference, and the path for shapes grouped_mm rejects
        (it reads the counts on the host: one sync, none when given a list)."""
        counts = counts_E if isinstance(counts_E, list) else counts_E.tolist()
        padding = x_MD.shape[0] - sum(counts)
        if padding and not padded:
            raise ValueError(f"{x_MD.shape[0]} rows but counts_E sums to {sum(counts)}")
        outputs = []
        for e, x_e in enumerate(torch.split(x_MD[: sum(counts)], counts)):
            h = x_e @ self.gate_up_proj[e]
            if self.gate_up_proj_bias is not None:
                h = h + self.gate_up_proj_bias[e]
            y = self.act(h) @ self.down_proj[e]
            if self.down_proj_bias is not None:
                y = y + self.down_proj_bias[e]
            outputs.append(y)
        # Empty groups still flow through their expert, so every parameter gets a (zero) gradient.
        outputs.append(x_MD.new_zeros(padding, outputs[0].shape[1]))
        return torch.cat(outputs)

    def shard(self, start: int, end: int) -> GroupedExperts:
        """A new module holding experts [start, end) as cloned parameters (for expert parallelism)."""
        if not 0 <= start < end <= self.num_experts:
            raise ValueError(
                f"shard [{start}, {end}) is not a non-empty range of the {self.num_experts} experts"
            )
        with torch.device(self.gate_up_proj.device):
            shard = GroupedExperts(self.config, num_experts=end - start).to(dtype=self.gate_up_proj.dtype)
        shard.expert_offset = self.expert_offset + start
        with torch.no_grad():
            for name, param in shard.named_parameters():
                param.copy_(getattr(self, name)[start:end])
        return shard

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate_up_proj={tuple(self.gate_up_proj.shape)}"


class MoEStats(NamedTuple):
    """Detached per-forward statistics for logging."""

    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    """[E] slot counts before capacity drop."""
    dropped_tokens: torch.Tensor
    """(token, slot) pairs dropped for exceeding expert capacity (0 when dropless)."""


class RouterStats(NamedTuple):
    """MoEStats of every MoE layer of one forward, stacked in layer order (detached)."""

    load_balance_loss_L: torch.Tensor
    z_loss_L: torch.Tensor
    tokens_per_expert_LE: torch.Tensor
    dropped_tokens_L: torch.Tensor

    @staticmethod
    def stack(per_layer: list[MoEStats]) -> RouterStats:
        return RouterStats(*(torch.stack(values) for values in zip(*per_layer, strict=True)))


DEFAULT_TOKEN_CHUNK = 16384
"""Tokens per expert chunk for long sequences: gpt-oss's gate/up output of one chunk is 16,384 x 4
slots x 5,760 bf16 = 0.75 GB, big enough to keep grouped_mm efficient."""


def _combine(y_MD: torch.Tensor, order_S: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Step 4: place each slot's weighted output back at its slot (index_copy: unique indices,
    deterministic), then sum the K slots of every token -> [N, D]; dropped (padding) slots stay zero."""
    N, K = weights_NK.shape
    weights_M = weights_NK.reshape(-1)[order_S]
    y_SD = y_MD.new_zeros(N * K, y_MD.shape[1]).index_copy(0, order_S, y_MD * weights_M[:, None].to(y_MD.dtype))
    return y_SD.view(N, K, -1).sum(dim=1)


class MoE(nn.Module):
    """Top-k routed experts. Returns (y, router loss already weighted by the config)."""

    def __init__(self, config: GPTOSSConfig):
        super().__init__()
        self.top_k, self.num_experts = config.top_k, config.n_experts
        self.capacity_factor = config.capacity_factor
        self.aux_weight = config.aux_loss_weight if config.use_aux_loss else 0.0
        self.z_weight = config.router_z_loss_weight
        self.router = TopKRouter(config)
        self.experts = GroupedExperts(config)
        self.dropout = nn.Dropout(config.dropout)
        # The statistics of the latest forward; read through GPTOSS.router_stats().
        self.last_stats: MoEStats | None = None
        self.token_chunk = DEFAULT_TOKEN_CHUNK  # dropless layers with more tokens compute in chunks

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        N, K = x_ND.shape[0], self.top_k

        # 1 route
        route = self.router(x_ND, n_seq=B)
        if self.capacity_factor is None:
            if N > self.token_chunk:  # long sequences: one chunk of tokens at a time
                y_ND = torch.cat([self._tile(x_ND, route, start) for start in range(0, N, self.token_chunk)])
            else:
                y_ND = self._dropless(x_ND, route.expert_ids_NK, route.weights_NK, route.tokens_per_expert_E)
            return self._finish(y_ND.view(B, T, D), route, torch.zeros((), dtype=torch.long, device=x_ND.device))
        # 2 permute: slot s = n*K + k; a stable sort keeps token order within each expert, so
        # capacity drop keeps the earliest tokens and the result is deterministic.
        slot_expert_S = route.expert_ids_NK.reshape(-1)  # [S = N*K]
        order_S = torch.argsort(slot_expert_S, stable=True)
        counts_E = route.tokens_per_expert_E
        capacity = math.ceil(self.capacity_factor * N * K / self.num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert_S = torch.arange(N * K, device=x_ND.device) - starts_E[slot_expert_S[order_S]]
        # Kept slots first (still grouped by expert), dropped ones after them as padding rows:
        # the shapes stay static, so no host sync (a boolean index would need one).
        order_S = order_S[torch.argsort((rank_in_expert_S >= capacity).to(torch.uint8), stable=True)]
        kept_E = counts_E.clamp(max=capacity)
        dropped = (counts_E - kept_E).sum()
        x_MD = x_ND.index_select(0, order_S // K)  # [M = S, D] (index_select: fast index_add_ backward)
        # 3 compute (the step expert parallelism replaces); padding rows come back as zeros
        y_MD = self.experts(x_MD, kept_E, padded=True)
        return self._finish(_combine(y_MD, order_S, route.weights_NK).view(B, T, D), route, dropped)

    def _tile(self, x_ND: torch.Tensor, route: RouterOutput, start: int) -> torch.Tensor:
        """Steps 2-4 (dropless) for tokens [start, start + token_chunk) -> [n, D], recomputed in backward."""
        end = start + self.token_chunk
        args = (x_ND[start:end], route.expert_ids_NK[start:end], route.weights_NK[start:end])
        if torch.is_grad_enabled():
            return checkpoint(self._dropless, *args, use_reentrant=False)
        return self._dropless(*args)

    def _dropless(self, x_nD: torch.Tensor, ids_nK: torch.Tensor, weights_nK: torch.Tensor,
                  counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 2-4 without a capacity: permute [n, D] rows by expert, compute, combine -> [n, D].
        counts_E: the router's tokens per expert when these are all its tokens (else counted here)."""
        K = ids_nK.shape[1]
        slot_expert_S = ids_nK.reshape(-1)  # [S = n*K]
        order_S = torch.argsort(slot_expert_S, stable=True)
        if counts_E is None:
            counts_E = count_slots(ids_nK, self.num_experts)
        x_MD = x_nD.index_select(0, order_S // K)  # [M = S, D] (index_select: fast index_add_ backward)
        # 3 compute (the step expert parallelism replaces)
        return _combine(self.experts(x_MD, counts_E), order_S, weights_nK)

    def _finish(self, y_BTD: torch.Tensor, route: RouterOutput, dropped: torch.Tensor):
        router_loss = self.aux_weight * route.load_balance_loss + self.z_weight * route.z_loss
        self.last_stats = MoEStats(
            route.load_balance_loss.detach(), route.z_loss.detach(), route.tokens_per_expert_E, dropped
        )
        return self.dropout(y_BTD), router_loss
