"""Activation memory of one micro-batch on one rank, term by term, for our GPT-OSS implementation.

The terms are what autograd saves for backward in `pipeline/model` (tests/plan/test_plan.py
measures the saved tensors of a real forward with `torch.autograd.graph.saved_tensors_hooks`: within
1% for GPT-OSS, MoE and dense presets, fp32 and bf16), with N = micro_batch x seq_len tokens and
a = bytes of the compute dtype (bf16 2, fp32 4):

  attention block   RMSNorm keeps its fp32 input and normalised output (8 N D; LayerNorm: its input,
                    a N D) and its output feeds q/k/v (a N D). The SDPA kernel keeps q and its output
                    (H heads), k and v (Hkv heads), all one column wider for the sink logit (head_dim
                    + 1) and k/v one sink key longer, a fp32 log-sum-exp per head and query, and the
                    [T, T+1] boolean mask converted to an additive bias of dtype a. o_proj keeps its
                    input (a N H d; with neither RoPE nor sinks it is a view of the kernel output).
                    No T x T scores: a flash / memory-efficient kernel is assumed; see
                    `math_fallback_scores_bytes` for what the math kernel would add.
  MoE block         norm as above; router logits (a) and fp32 probabilities / logsumexp input (N E);
                    per routed slot (N k of them; balanced routing assumed, so the same under expert
                    parallelism) the gathered input, the expert output and its weighted copy (3 D),
                    gate/up output (2F) plus the clamped-SwiGLU intermediates and output (5F), the
                    combine weight and int64 routing indices.
  dense MLP block   norm, and the FFN intermediates per token.
  head              final norm and LM-head input; cross-entropy keeps the fp32 log-softmax (4 N V).
                    At the loss the bf16 logits, the fp32 copy / log-softmax, its gradient and the
                    input gradient are alive together: (a + 12) N V bytes at the peak.

With activation checkpointing each block keeps only its input (a N D); in backward one block is
recomputed at a time, so one block's full activations come back on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.model import GPTOSSConfig


@dataclass(frozen=True)
class ActivationMemory:
    per_block: list[int]
    """Bytes saved for backward by each block (no checkpointing)."""
    head: int
    """Final norm and LM-head input saved for backward."""
    loss_saved: int
    """The fp32 log-softmax output cross-entropy keeps for backward."""
    loss_peak: int
    """Peak at the loss: bf16 logits, fp32 log-softmax, its gradient and the input gradient."""
    checkpointed_inputs: int
    """Bytes kept per micro-batch with checkpointing: every block's input."""

    @property
    def saved_without_checkpointing(self) -> int:
        """What autograd holds after the forward (the quantity tests/plan/test_plan.py measures)."""
        return sum(self.per_block) + self.head + self.loss_saved

    def total(self, checkpointing: bool) -> int:
        """Peak activation bytes of one micro-batch (the loss, or the first recomputed block)."""
        blocks = self.checkpointed_inputs + max(self.per_block) if checkpointing else sum(self.per_block)
        return blocks + self.head + self.loss_peak


def _ffn_intermediates(config: GPTOSSConfig, hidden: int) -> int:
    """Elements per token (or routed slot) the FFN activation keeps, first projection's output included."""
    if not config.use_swiglu:
        return 2 * hidden  # GELU input and output
    if config.gpt_oss_swiglu:
        return 7 * hidden  # gate/up [2F], clamped gate, sigmoid, (up + 1), gate * sigmoid, output
    return 4 * hidden  # gate/up [2F], silu(gate), output


def _norm_bytes(config: GPTOSSConfig, tokens: int, a: int) -> int:
    """RMSNorm runs in fp32: keeps its fp32 input and normalised output (8 B), LayerNorm its input;
    both outputs (dtype a) are kept by the next linear."""
    per_elem = 8 + a if config.use_rms_norm else 2 * a
    return per_elem * tokens * config.n_embd


def _block_bytes(config: GPTOSSConfig, layer: int, batch: int, seq_len: int, a: int) -> int:
    N, D, T = batch * seq_len, config.n_embd, seq_len
    H, Hkv, d = config.n_head, config.kv_heads, config.head_size
    sink = 1 if config.use_attention_sinks else 0
    norm = _norm_bytes(config, N, a)
    attn = norm
    attn += a * N * H * (d + sink) * 2  # q and the kernel output
    attn += a * batch * (T + sink) * Hkv * (d + sink) * 2  # k and v
    attn += 4 * N * H  # log-sum-exp
    if sink or config.layer_window(layer) is not None:
        attn += a * T * (T + sink)  # the boolean mask as an additive bias, kept for backward
    if sink or config.position_embedding == "rope":
        # o_proj input is a copy unless q came straight from q_proj: then the kernel's output is laid
        # out [B, T, H, d] (like q) and the reshape for o_proj is a view of it.
        attn += a * N * H * d
    ffn = norm
    if config.is_moe_layer(layer):
        S = N * config.top_k
        ffn += (8 + a) * N * config.n_experts  # router logits, fp32 softmax and logsumexp input
        # per slot: gathered input, expert output and its weighted copy (3 D), FFN intermediates
        ffn += S * a * (3 * D + _ffn_intermediates(config, config.expert_hidden))
        ffn += S * (a + 3 * 8)  # combine weights, int64 routing indices
    else:
        ffn += N * a * _ffn_intermediates(config, config.dense_hidden)
    return attn + ffn


def activation_memory(config: GPTOSSConfig, micro_batch: int, seq_len: int, act_bytes: int) -> ActivationMemory:
    N, D, V, a = micro_batch * seq_len, config.n_embd, config.vocab_size, act_bytes
    return ActivationMemory(
        per_block=[_block_bytes(config, i, micro_batch, seq_len, a) for i in range(config.n_layer)],
        head=_norm_bytes(config, N, a),
        loss_saved=4 * N * V,
        loss_peak=(a + 12) * N * V,
        checkpointed_inputs=config.n_layer * a * N * D,
    )


def math_fallback_scores_bytes(config: GPTOSSConfig, micro_batch: int, seq_len: int, act_bytes: int) -> int:
    """Extra bytes per block if SDPA falls back to its math kernel, which materialises the
    [B, H, T, T+1] scores and keeps the softmax for backward."""
    sink = 1 if config.use_attention_sinks else 0
    return 2 * act_bytes * micro_batch * config.n_head * seq_len * (seq_len + sink)
