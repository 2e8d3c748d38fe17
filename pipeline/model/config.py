"""`GPTOSSConfig`: one keyword-only dataclass describing every model this package builds.

The same dataclass covers the real GPT-OSS architectures (GQA, sliding/full alternation,
attention sinks, YaRN RoPE, clamped SwiGLU experts with biases), the simpler MoE GPT of the seed
documents (top-2, RMSNorm/SwiGLU toggles, tied embeddings) and a dense GPT-2. Fields that can be
derived from others default to ``None`` and are resolved by the read-only properties at the bottom
(`kv_heads`, `head_size`, ...), so ``dataclasses.replace(cfg, n_layer=4)`` or a ``model.n_layer=4``
override never leaves a stale derived value behind.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.errors import ConfigError

LAYER_TYPES = ("sliding_attention", "full_attention")  # transformers' names, so configs convert 1:1
POSITION_EMBEDDINGS = ("rope", "learned")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")  # resolved per device by pipeline/model/flex_attention.py
AUX_LOSS_GRANULARITIES = ("batch", "sequence")


@dataclass(kw_only=True)
class YaRNScaling:
    """YaRN RoPE scaling (https://arxiv.org/abs/2309.00071), computed exactly as transformers does."""

    factor: float = 32.0
    """Context extension factor: low-frequency dimensions are interpolated by this much."""
    beta_fast: float = 32.0
    """Rotations at which the ramp between extrapolation and interpolation starts (high freq.)."""
    beta_slow: float = 1.0
    """Rotations at which the ramp ends (low frequencies are fully interpolated)."""
    original_max_position_embeddings: int = 4096
    """Context length the model was pretrained with before the extension."""
    truncate: bool = False
    """Round the correction range to whole dimensions (GPT-OSS: False)."""
    attention_factor: float | None = None
    """cos/sin multiplier; None derives it from `factor` as 0.1*ln(factor)+1 (the YaRN paper)."""

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor ({self.factor}) must be >= 1 (1 means no extension)")
        if self.beta_fast <= self.beta_slow or self.beta_slow <= 0:
            raise ConfigError(
                f"rope_scaling needs beta_fast ({self.beta_fast}) > beta_slow ({self.beta_slow}) > 0"
            )
        if self.original_max_position_embeddings < 1:
            raise ConfigError(
                "rope_scaling.original_max_position_embeddings "
                f"({self.original_max_position_embeddings}) must be >= 1"
            )


@dataclass(kw_only=True)
class GPTOSSConfig:
    """Architecture of a GPT-OSS-family model. Validated on construction (ConfigError names the fix)."""

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 50304
    """Rows of the token embedding / columns of the LM head (the trainer sets it from the tokenizer)."""
    block_size: int = 1024
    """Longest sequence the model is trained on; size of the learned position table if any."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None = n_head (plain multi-head attention)."""
    n_embd: int = 768
    """Width of the residual stream."""
    head_dim: int | None = None
    """Per-head width; None = n_embd // n_head. GPT-OSS decouples it (64 with n_embd 2880)."""

    # --- mixture of experts --------------------------------------------------------------------
    n_experts: int = 8
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts each token is routed to."""
    moe_layers: list[int] | None = None
    """Indices of MoE blocks; None = every block, [] = a dense model."""
    capacity_factor: float | None = None
    """Expert capacity = ceil(capacity_factor * tokens * top_k / n_experts); None = dropless."""
    intermediate_size: int | None = None
    """Hidden width of each expert FFN; None = 4 * n_embd."""
    dense_intermediate_size: int | None = None
    """Hidden width of the dense MLP in non-MoE blocks; None = intermediate_size."""
    use_aux_loss: bool = True
    """Add the Switch-style load-balancing loss to the router loss."""
    aux_loss_weight: float = 0.01
    """Weight of the load-balancing loss (1.0 when perfectly balanced, E when collapsed)."""
    router_z_loss_weight: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE); 0 disables it."""
    aux_loss_granularity: str = "batch"
    """"batch": the load-balancing loss over all tokens of the micro-batch (Switch); "sequence": its
    mean over the sequences, each balanced on its own (DeepSeek-V3's sequence-wise balance loss)."""
    load_balance_bias_rate: float = 0.0
    """Aux-loss-free load balancing (DeepSeek-V3): each MoE layer keeps a per-expert bias added to the
    router logits for the top-k *selection* only, moved by rate * sign(mean load - expert load) after
    every optimizer step (by the trainer). 0 = off (no bias buffer exists); DeepSeek-V3 used 1e-3."""
    router_bias: bool = False
    """Bias in the router projection (GPT-OSS: True)."""
    expert_bias: bool = False
    """Biases in the expert projections (GPT-OSS: True)."""

    # --- block internals -------------------------------------------------------------------------
    dropout: float = 0.0
    """Dropout on attention probabilities, block outputs and embeddings (0 for pretraining)."""
    bias: bool = False
    """Biases in dense-MLP linears and LayerNorm (GPT-2: True)."""
    attention_bias: bool = False
    """Biases in the q/k/v/o projections (GPT-OSS, GPT-2: True)."""
    use_rms_norm: bool = True
    """RMSNorm instead of LayerNorm."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation layer."""
    use_swiglu: bool = True
    """Gated (SwiGLU) FFNs instead of a GELU MLP."""
    gpt_oss_swiglu: bool = False
    """GPT-OSS SwiGLU variant: gate clamped to <= swiglu_limit, up clamped to +-swiglu_limit,
    out = (up + 1) * gate * sigmoid(swiglu_alpha * gate). False = classic silu(gate) * up."""
    swiglu_limit: float = 7.0
    """Clamp of the GPT-OSS SwiGLU variant."""
    swiglu_alpha: float = 1.702
    """Sigmoid gain of the GPT-OSS SwiGLU variant."""

    # --- attention -----------------------------------------------------------------------------
    sliding_window: int | None = None
    """Keys a sliding-window layer sees, the query's own position included (transformers' meaning)."""
    layer_types: list[str] | None = None
    """Per block "sliding_attention" or "full_attention"; None = sliding on even blocks, full on odd
    ones when sliding_window is set (GPT-OSS), else all full."""
    use_attention_sinks: bool = False
    """One learned logit per head that joins the softmax and is then dropped (GPT-OSS)."""
    position_embedding: str = "rope"
    """"rope" (rotary, applied to q/k) or "learned" (GPT-2 absolute position table)."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rope_scaling: YaRNScaling | None = None
    """YaRN context extension; None = plain RoPE."""
    attention_backend: str = "auto"
    """"flex" (FlexAttention: fused, block-sparse; CUDA training, CPU forward only), "sdpa" (virtual
    sink column; runs everywhere, SDPA's math kernel on CUDA) or "auto" = flex on CUDA, sdpa elsewhere."""
    document_masking: bool = False
    """Packed samples: tokens attend only within their document (ended by eos_token_id) and RoPE
    positions restart at each document (Megatron's --reset-attention-mask --reset-position-ids)."""

    # --- embeddings, init, special tokens -------------------------------------------------------
    tie_word_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layer)."""
    pad_token_id: int | None = None
    """Padding token id (metadata for export / generation)."""
    eos_token_id: int | None = None
    """End-of-sequence token id (default stop token of `generate`)."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = YaRNScaling(**self.rope_scaling)
        self._validate()

    # --- derived values ------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def expert_hidden(self) -> int:
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size

    @property
    def dense_hidden(self) -> int:
        return self.expert_hidden if self.dense_intermediate_size is None else self.dense_intermediate_size

    @property
    def resolved_layer_types(self) -> list[str]:
        if self.layer_types is not None:
            return list(self.layer_types)
        if self.sliding_window is None:
            return ["full_attention"] * self.n_layer
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.n_layer)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe_layers is None or layer_idx in self.moe_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding window of block `layer_idx`, None for full attention."""
        sliding = self.resolved_layer_types[layer_idx] == "sliding_attention"
        return self.sliding_window if sliding else None

    def replace(self, **changes) -> GPTOSSConfig:
        """A validated copy with `changes` applied (unknown field names raise ConfigError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown GPTOSSConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    # --- validation ------------------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} ({value!r}) must be a positive integer")
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must be >= 1, or null to use n_head")
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads}): "
                "each key/value head serves a whole group of query heads"
            )
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim"
            )
        if self.head_size < 1:
            raise ConfigError(f"head_dim ({self.head_size}) must be >= 1")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(
                f"position_embedding ({self.position_embedding!r}) must be one of {POSITION_EMBEDDINGS}"
            )
        if self.position_embedding == "rope":
            if self.head_size % 2:
                raise ConfigError(f"head_dim ({self.head_size}) must be even for RoPE (pairs of dimensions)")
            if self.rope_theta <= 0:
                raise ConfigError(f"rope_theta ({self.rope_theta}) must be > 0")
        elif self.rope_scaling is not None:
            raise ConfigError(
                "rope_scaling is set but position_embedding is 'learned'; set rope_scaling=null"
            )

        self._validate_moe()

        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout ({self.dropout}) must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps ({self.norm_eps}) must be > 0")
        if self.init_std <= 0:
            raise ConfigError(f"init_std ({self.init_std}) must be > 0")
        if self.gpt_oss_swiglu and not self.use_swiglu:
            raise ConfigError("gpt_oss_swiglu=True needs use_swiglu=True (it is a SwiGLU variant)")
        if self.swiglu_limit <= 0:
            raise ConfigError(f"swiglu_limit ({self.swiglu_limit}) must be > 0")

        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window ({self.sliding_window}) must be >= 1, or null for none")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries but n_layer is {self.n_layer}; "
                    "give one per block or null for the default pattern"
                )
            bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
            if bad:
                raise ConfigError(f"layer_types contains {bad}; each entry must be one of {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError(
                    "layer_types has sliding_attention blocks but sliding_window is null; set it"
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend ({self.attention_backend!r}) must be one of {ATTENTION_BACKENDS}"
            )
        if self.attention_backend == "flex" and self.dropout > 0:
            raise ConfigError(
                f"attention_backend='flex' has no attention dropout but dropout is {self.dropout}; "
                "set dropout=0 or attention_backend=sdpa (auto picks sdpa when dropout > 0)"
            )
        if self.document_masking and self.eos_token_id is None:
            raise ConfigError("document_masking=true needs eos_token_id (documents end at it); set model.eos_token_id")
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")

    def _validate_moe(self) -> None:
        if self.moe_layers is not None:
            out_of_range = [i for i in self.moe_layers if not 0 <= i < self.n_layer]
            if out_of_range:
                raise ConfigError(
                    f"moe_layers {out_of_range} out of range for n_layer ({self.n_layer}); "
                    f"use indices 0..{self.n_layer - 1}"
                )
            if len(set(self.moe_layers)) != len(self.moe_layers):
                raise ConfigError(f"moe_layers ({self.moe_layers}) lists a block twice")
        if self.num_moe_layers:
            if self.n_experts < 1:
                raise ConfigError(f"n_experts ({self.n_experts}) must be >= 1 when there are MoE layers")
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}) and >= 1")
        if self.capacity_factor is not None and not (
            self.capacity_factor > 0 and math.isfinite(self.capacity_factor)
        ):
            raise ConfigError(f"capacity_factor ({self.capacity_factor}) must be > 0, or null for dropless")
        if self.aux_loss_granularity not in AUX_LOSS_GRANULARITIES:
            raise ConfigError(
                f"aux_loss_granularity ({self.aux_loss_granularity!r}) must be one of {AUX_LOSS_GRANULARITIES}"
            )
        for name in ("aux_loss_weight", "router_z_loss_weight", "load_balance_bias_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.expert_hidden < 1 or self.dense_hidden < 1:
            raise ConfigError("intermediate_size and dense_intermediate_size must be >= 1")


# Fields that decide the weights' shapes or meaning (properties resolve the derived ones);
# training-only settings (dropout, loss weights, context length, init) are not among them.
ARCHITECTURE_FIELDS = (
    "vocab_size", "n_layer", "n_head", "kv_heads", "n_embd", "head_size", "n_experts", "top_k", "expert_hidden",
    "num_moe_layers", "tie_word_embeddings", "attention_bias", "router_bias", "expert_bias", "bias",
    "use_rms_norm", "norm_eps", "use_swiglu", "gpt_oss_swiglu", "swiglu_limit", "swiglu_alpha",
    "use_attention_sinks", "sliding_window", "resolved_layer_types", "position_embedding", "rope_theta",
    "rope_scaling",
)


def architecture(config: GPTOSSConfig) -> dict:
    """The values of ARCHITECTURE_FIELDS: two configs with equal architectures hold the same weights."""
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


def differing_fields(saved: dict, current: dict) -> list[str]:
    """The one definition of "same model": the keys whose values differ between two model dicts
    (config fields, or `architecture(...)`), in order of `current`. A key one side lacks, e.g. a
    field added to GPTOSSConfig after a checkpoint was written, reads as its default."""
    defaults = dataclasses.asdict(GPTOSSConfig())
    keys = list(current) + [k for k in saved if k not in current]
    return [k for k in keys if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))]
