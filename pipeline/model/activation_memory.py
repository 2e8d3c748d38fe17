"""Activation memory of one micro-batch on one rank, term by term, for our GPT-OSS implementation.

The terms are what autograd saves for backward in `pipeline/model` (tests/planning/test_plan.py
measures the saved tensors of a real forward with `torch.autograd.graph.saved_tensors_hooks`: within
1% for GPT-OSS, MoE and dense presets, fp32 and bf16, for each attention kernel CPU can run), with
N = micro_batch x seq_len tokens and a = bytes of the compute dtype (bf16 2, fp32 4):

  attention block   RMSNorm keeps its fp32 input and normalised output (8 N D; LayerNorm: its input,
                    a N D) and its output feeds q/k/v (a N D). Then it depends on the kernel that runs
                    (`attention_kernel`: the trainer's own backend choice, on CUDA):
                    flex        FlexAttention keeps q (H heads), k and v (Hkv heads) at head_dim, its
                                output, and a fp32 log-sum-exp and row max per head and query; sinks add
                                the fp32 sigmoid(lse - sink) and its cast. No mask tensor, no T x T scores
                                (the BlockMask's block indices are a few KB).
                    sdpa-math   what SDPA runs on CUDA with sinks (head_dim + 1 columns: flash and
                                memory-efficient kernels refuse it): q, k, v upcast to fp32 with k/v
                                repeated to H heads, and the fp32 softmax [B, H, T, T+1] with the sink
                                column. The T x T term dominates at long sequences.
                    sdpa-fused  flash / memory-efficient (CUDA without sinks) and CPU's fused kernel:
                                q and its output (H heads), k and v (Hkv heads), all one column wider
                                for the sink logit and k/v one sink key longer, a fp32 log-sum-exp per
                                head and query, and the [T, T+1] mask as an additive bias of dtype a
                                (per sample with document masking).
                    o_proj keeps its input (a N H d; with neither RoPE nor sinks SDPA's output is
                    already laid out for it).
  MoE block         norm as above; router logits (a) and fp32 probabilities / logsumexp input (N E);
                    per routed slot (N k of them; balanced routing assumed, so the same under expert
                    parallelism) the gathered input, the expert output and its weighted copy (3 D),
                    gate/up output (2F) plus the clamped-SwiGLU intermediates and output (5F), the
                    combine weight and int64 routing indices. A dropless layer over more than
                    `MoE.token_chunk` tokens computes (and recomputes in backward) one chunk at a
                    time: the per-slot terms count one chunk's slots, not the whole sequence's.
  dense MLP block   norm, and the FFN intermediates per token.
  head + loss       the final RMSNorm (8 N D). The chunked LM loss (pipeline/model/loss.py, what the
                    trainer runs) computes the gradients in its forward and keeps them for backward:
                    the hidden-state gradient (a N D) and a weight-sized fp32 gradient (4 V D), never
                    the [N, V] logits. Its peak is in the forward: one chunk of logits (fp32 and its
                    cast, and the previous chunk's while the next matmul runs) or, when a chunk's
                    weight gradient is folded in, that chunk plus the [V, D] matmul output and its
                    fp32 copy; or in the backward, the stored gradients plus their scaled copies.

With activation checkpointing each block keeps only its input (a N D); in backward one block is
recomputed at a time, so one block's full activations come back on top.

Sequence parallelism over P ranks (pipeline/distributed/sequence_parallel.py): N above is the rank's
T/P tokens; the attention kernel's terms are those of the whole sequence T for H/P query heads and
max(Hkv/P, 1) KV heads (Ulysses hands each rank whole-sequence q/k/v of its heads; the all-to-alls
save nothing), so they fall as 1/P too, except the SDPA mask [T, T+1], which stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import GPTOSSConfig
from pipeline.model.flex_attention import resolve_attention_backend
from pipeline.model.loss import default_chunk_rows
from pipeline.model.moe import DEFAULT_TOKEN_CHUNK

ATTENTION_KERNELS = ("flex", "sdpa-math", "sdpa-fused")


@dataclass(frozen=True)
class ActivationMemory:
    per_block: list[int]
    """Bytes saved for backward by each block (no checkpointing)."""
    head: int
    """Final norm saved for backward."""
    loss_saved: int
    """What the chunked loss keeps for backward: the hidden-state and fp32 weight gradients."""
    loss_peak: int
    """Peak at the loss (forward chunks or backward scaling), `loss_saved` included."""
    checkpointed_inputs: int
    """Bytes kept per micro-batch with checkpointing: every block's input."""
    attention_kernel: str
    """The attention kernel the figures assume (one of ATTENTION_KERNELS)."""
    sequence_parallel: int = 1
    """Ranks each sequence is split over; the figures are per rank."""

    @property
    def saved_without_checkpointing(self) -> int:
        """What autograd holds after the forward (the quantity tests/planning/test_plan.py measures)."""
        return sum(self.per_block) + self.head + self.loss_saved

    def total(self, checkpointing: bool) -> int:
        """Peak activation bytes of one micro-batch (the loss, or the first recomputed block)."""
        blocks = self.checkpointed_inputs + max(self.per_block) if checkpointing else sum(self.per_block)
        return blocks + self.head + self.loss_peak


def attention_kernel(config: GPTOSSConfig) -> str:
    """The kernel a training run on CUDA uses for `config.attention_backend` (the trainer's own
    resolution: auto = flex unless dropout). SDPA with sinks widens q/k to head_dim + 1, which flash
    and memory-efficient attention refuse (as any head_dim not a multiple of 8), so CUDA runs the math
    kernel; without sinks a fused kernel runs."""
    backend = resolve_attention_backend(config.attention_backend, torch.device("cuda"), True, config.dropout)
    if backend == "flex":
        return "flex"
    return "sdpa-math" if config.use_attention_sinks or config.head_size % 8 else "sdpa-fused"


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


def _cast(a: int) -> int:
    """Bytes per element of a fp32 tensor and its cast to dtype a (no copy when a is fp32)."""
    return 4 + (a if a != 4 else 0)


def _attention_kernel_bytes(
    config: GPTOSSConfig, layer: int, batch: int, seq_len: int, a: int, kernel: str, sp: int = 1
) -> int:
    """The kernel's saved tensors on one rank: the whole sequence for its H/sp heads."""
    N, T = batch * seq_len, seq_len
    H, Hkv, d = config.n_head // sp, max(config.kv_heads // sp, 1), config.head_size
    sink = 1 if config.use_attention_sinks else 0
    if kernel == "flex":
        out = a * N * H * d * 2  # q and the output  [B, H, T, d]
        out += a * N * Hkv * d * 2  # k and v  [B, Hkv, T, d]
        out += 8 * N * H  # fp32 log-sum-exp and row max  [B, H, T]
        if sink:
            out += _cast(a) * N * H  # sigmoid(lse - sink) [B, H, T] and its cast, kept by the multiply
        return out
    S = T + sink  # keys, the sink key included
    if kernel == "sdpa-math":
        # q [B, H, T, d+1], k/v repeated to H heads [B, H, S, d+1] and softmax [B, H, T, S], all fp32
        return 4 * batch * H * (T * (d + sink) + 2 * S * (d + sink) + T * S)
    if kernel != "sdpa-fused":
        raise ValueError(f"attention kernel {kernel!r} must be one of {ATTENTION_KERNELS}")
    out = a * N * H * (d + sink) * 2  # q and the kernel output
    out += a * batch * S * Hkv * (d + sink) * 2  # k and v
    out += 4 * N * H  # log-sum-exp
    if sink or config.layer_window(layer) is not None or config.document_masking:
        masks = batch if config.document_masking else 1  # document masks are per sample [B, 1, T, S]
        out += a * masks * T * S  # the boolean mask as an additive bias, kept for backward
    return out


def _block_bytes(config: GPTOSSConfig, layer: int, batch: int, seq_len: int, a: int, kernel: str, sp: int = 1) -> int:
    N, D = batch * seq_len // sp, config.n_embd  # this rank's tokens
    H, d = config.n_head, config.head_size
    norm = _norm_bytes(config, N, a)
    attn = norm + _attention_kernel_bytes(config, layer, batch, seq_len, a, kernel, sp)
    if kernel != "sdpa-fused" or config.use_attention_sinks or config.position_embedding == "rope":
        # o_proj input is a copy unless q came straight from q_proj into a fused SDPA kernel: then the
        # output is laid out [B, T, H, d] (like q) and the reshape for o_proj is a view of it.
        attn += a * N * H * d
    ffn = norm
    if config.is_moe_layer(layer):
        S = N * config.top_k
        tiled = N if config.capacity_factor is not None else min(N, DEFAULT_TOKEN_CHUNK)
        ffn += (8 + a) * N * config.n_experts  # router logits, fp32 softmax and logsumexp input
        # per slot (of one token chunk): gathered input, expert output and its weighted copy (3 D), FFN intermediates
        ffn += tiled * config.top_k * a * (3 * D + _ffn_intermediates(config, config.expert_hidden))
        ffn += S * (a + 3 * 8)  # combine weights, int64 routing indices
    else:
        ffn += N * a * _ffn_intermediates(config, config.dense_hidden)
    return attn + ffn


def chunked_loss_bytes(config: GPTOSSConfig, tokens: int, a: int, chunk_rows: int | None = None) -> tuple[int, int]:
    """(saved, peak) bytes of pipeline/model/loss.py's linear_cross_entropy over `tokens` rows, with
    its default chunk size unless `chunk_rows` is given. Per-row vectors (lse, targets) are left out."""
    N, D, V = tokens, config.n_embd, config.vocab_size
    n = min(default_chunk_rows(V) if chunk_rows is None else chunk_rows, N)  # rows per chunk
    c = _cast(a)
    saved = a * N * D + 4 * V * D + 8  # grad_h [N, D], fp32 grad_w [V, D], the int64 valid-row count
    # In the chunk loop the fp32 logits [n, V] and their cast are alive, and on top of them one of:
    # the previous chunk's (still referenced while the next chunk's matmul runs); logsumexp's fp32
    # temporary exp(logits - max) next to the fp32 logits and the previous chunk's cast gradient; the
    # [n, D] product on its way into grad_h; the [V, D] product and its fp32 copy on their way into grad_w.
    multi = N > n
    chunk = c * n * V
    forward = saved + max(
        2 * chunk if multi else chunk,
        (8 + (a if multi else 0)) * n * V,
        chunk + a * n * D,
        chunk + c * V * D,
    )
    backward = saved + a * N * D + c * V * D  # the scaled copies of both gradients (and grad_w's cast)
    return saved, max(forward, backward)


def activation_memory(
    config: GPTOSSConfig, micro_batch: int, seq_len: int, act_bytes: int, kernel: str | None = None, sp: int = 1
) -> ActivationMemory:
    """Activation memory of one micro-batch on one rank; `kernel` defaults to what `attention_kernel`
    picks on CUDA; `sp` = sequence-parallel ranks the sequence is split over."""
    kernel = attention_kernel(config) if kernel is None else kernel
    N, D, a = micro_batch * seq_len // sp, config.n_embd, act_bytes  # this rank's tokens
    loss_saved, loss_peak = chunked_loss_bytes(config, N, a)
    return ActivationMemory(
        per_block=[_block_bytes(config, i, micro_batch, seq_len, a, kernel, sp) for i in range(config.n_layer)],
        head=(8 if config.use_rms_norm else a) * N * D,  # the final norm; the loss keeps gradients instead
        loss_saved=loss_saved,
        loss_peak=loss_peak,
        checkpointed_inputs=config.n_layer * a * N * D,
        attention_kernel=kernel,
        sequence_parallel=sp,
    )


def math_kernel_notice(config: GPTOSSConfig, micro_batch: int, seq_len: int, act_bytes: int) -> str | None:
    """One line for a CUDA training run whose attention falls to SDPA's math kernel (attention_backend
    sdpa with sinks, or auto with dropout > 0), with what it costs; None when it does not."""
    if attention_kernel(config) != "sdpa-math":
        return None
    math_ = activation_memory(config, micro_batch, seq_len, act_bytes, kernel="sdpa-math")
    flex = activation_memory(config, micro_batch, seq_len, act_bytes, kernel="flex")
    extra = max(m - f for m, f in zip(math_.per_block, flex.per_block, strict=True))
    why = (f"attention_backend=auto with dropout={config.dropout} (FlexAttention has no dropout)"
           if config.attention_backend == "auto" else f"attention_backend={config.attention_backend}")
    return (
        f"attention runs SDPA's math kernel on CUDA ({why}): fp32 [B, H, T, T+1] = [{micro_batch}, "
        f"{config.n_head}, {seq_len}, {seq_len + 1}] scores, {extra / 2**30:.2f} GiB more activation memory per "
        f"layer than FlexAttention (x{config.n_layer} layers without activation checkpointing) and roughly "
        "30x flash's attention time (estimated); set model.attention_backend=auto and model.dropout=0 for FlexAttention"
    )
