"""Training FLOPs per token and model FLOPs utilization (MFU).

The count is *model* FLOPs (PaLM appendix B, Megatron-LM's MFU): work the model needs, not the
work the hardware does. Recomputation under activation checkpointing is not counted, so MFU stays
comparable between runs with it on and off.

Per token, forward + backward (backward = 2 x forward: gradients w.r.t. inputs and weights):

    matmul     6 x (active matmul weights): q/k/v/o, router, top_k experts (or the dense MLP) per
               block, plus the LM head. Biases, norms, sinks and the input embedding (a lookup) do
               no matmul work and are left out.
    attention  per block 12 x n_head x head_dim x (mean keys per query): QK^T and AV are
               2 x head_dim FLOPs per (query, key, head) each, x 3 for forward + backward. A causal
               query at position p (1-based) sees p keys; on sliding-window blocks min(window, p).
               The mean over p = 1..T is what a causal/window-aware kernel (flash attention) computes.

The trainer reports MFU with `flops_per_token(config, seq_len)["total"]` and `model_flops_utilization`;
the planner turns an assumed MFU into step compute time with its inverse, `seconds_at_mfu`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.model.config import GPTOSSConfig


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Mean over positions p = 1..seq_len of the keys a causal query sees: min(window, p)."""
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be >= 1")
    w = seq_len if window is None else min(window, seq_len)
    # sum_{p=1}^{w} p  +  (seq_len - w) positions that see a full window of w keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def active_matmul_params(config: GPTOSSConfig) -> dict[str, int]:
    """Matmul weights one token multiplies with, by part (biases excluded: they are adds)."""
    D, hd = config.n_embd, config.head_size
    attention = D * config.n_head * hd * 2 + D * config.kv_heads * hd * 2  # q and o, k and v
    gated = 2 if config.use_swiglu else 1
    expert = D * gated * config.expert_hidden + config.expert_hidden * D
    dense = D * gated * config.dense_hidden + config.dense_hidden * D
    moe_layers = config.num_moe_layers
    dense_layers = config.n_layer - moe_layers
    parts = {
        "attention": config.n_layer * attention,
        "router": moe_layers * D * config.n_experts,
        "experts": moe_layers * config.top_k * expert,
        "dense_mlp": dense_layers * dense,
        "lm_head": D * config.vocab_size,
    }
    parts["total"] = sum(parts.values())
    return parts


def attention_flops_per_token(config: GPTOSSConfig, seq_len: int) -> float:
    """Score and value FLOPs (forward + backward) per token, summed over blocks, causal average."""
    per_key = 12 * config.n_head * config.head_size
    return sum(per_key * mean_keys_per_query(seq_len, config.layer_window(i)) for i in range(config.n_layer))


def flops_per_token(config: GPTOSSConfig, seq_len: int) -> dict[str, float]:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`.

    Keys: total, matmul, attention, forward (= total / 3), active_matmul_params.
    """
    params = active_matmul_params(config)["total"]
    matmul = 6.0 * params
    attention = attention_flops_per_token(config, seq_len)
    total = matmul + attention
    return {
        "total": total,
        "matmul": matmul,
        "attention": attention,
        "forward": total / 3,
        "active_matmul_params": params,
    }


def _per_token(flops_per_token: float | Mapping[str, float]) -> float:
    return flops_per_token["total"] if isinstance(flops_per_token, Mapping) else flops_per_token


def achieved_flops(tokens_per_s: float, flops_per_token: float | Mapping[str, float]) -> float:
    """Model FLOP/s of a throughput: tokens_per_s x flops_per_token."""
    return tokens_per_s * _per_token(flops_per_token)


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float | Mapping[str, float], peak_flops: float
) -> float:
    """Achieved model FLOP/s over peak: tokens_per_s x flops_per_token / peak_flops.

    `peak_flops` is the peak of the devices that produced `tokens_per_s` (per-GPU peak x number of
    GPUs for a global throughput). `flops_per_token` may be the dict `flops_per_token` returns.
    The trainer's perf/mfu; `seconds_at_mfu` is its inverse, the planner's compute time.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops ({peak_flops}) must be > 0")
    return achieved_flops(tokens_per_s, flops_per_token) / peak_flops


def seconds_at_mfu(
    tokens: float, flops_per_token: float | Mapping[str, float], peak_flops: float, mfu: float
) -> float:
    """Seconds to process `tokens` at utilization `mfu` of `peak_flops`: the inverse of
    `model_flops_utilization` (tokens x flops_per_token / (peak_flops x mfu))."""
    if peak_flops <= 0 or mfu <= 0:
        raise ValueError(f"peak_flops ({peak_flops}) and mfu ({mfu}) must be > 0")
    return achieved_flops(tokens, flops_per_token) / (peak_flops * mfu)
