"""Named model presets: `get_preset(name, **overrides)` and `list_presets()`.

`gpt-oss-20b` / `gpt-oss-120b` are the released architectures (model card, openai/gpt-oss,
transformers' GptOssConfig); `debug` is a tiny GPT-OSS-style model for tests and the CPU quickstart.
`create_gpt_oss_20b` is the seed document's entry point of the same name: its scaled-down dense GPT.
"""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.model.config import GPTOSSConfig
from pipeline.model.gpt_oss import GPTOSS

_GPT_OSS_COMMON = dict(
    vocab_size=201088,
    block_size=131072,
    n_head=64,
    n_kv_head=8,
    head_dim=64,
    n_embd=2880,
    intermediate_size=2880,
    top_k=4,
    moe_layers=None,
    capacity_factor=None,
    use_aux_loss=True,
    # On our scale (moe.py): transformers' default router_aux_loss_coef 0.001 would be 0.004 at top_k=4;
    # kept at 0.001 so existing runs train as before (exports carry 0.001 / top_k, see hf.py).
    aux_loss_weight=0.001,
    router_bias=True,
    expert_bias=True,
    attention_bias=True,
    bias=True,
    use_rms_norm=True,
    norm_eps=1e-5,
    use_swiglu=True,
    gpt_oss_swiglu=True,
    swiglu_limit=7.0,
    swiglu_alpha=1.702,
    sliding_window=128,
    layer_types=None,  # sliding on even blocks (block 0 sliding), full on odd ones
    use_attention_sinks=True,
    position_embedding="rope",
    rope_theta=150000.0,
    rope_scaling=dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096),
    tie_word_embeddings=False,
    pad_token_id=199999,
    eos_token_id=200002,
)

_PRESETS: dict[str, dict] = {
    "gpt-oss-20b": dict(_GPT_OSS_COMMON, n_layer=24, n_experts=32),
    "gpt-oss-120b": dict(_GPT_OSS_COMMON, n_layer=36, n_experts=128),
    # The seed README's MoE GPT: GPT-2 small trunk, 8 experts top-2, modern norm/activation/positions.
    "moe-124m": dict(
        vocab_size=50304,  # GPT-2's 50257 padded up to a multiple of 64 for efficient matmuls
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        n_experts=8,
        top_k=2,
        intermediate_size=2048,  # ~8/3 * n_embd: the usual SwiGLU width for a 4x GELU budget
        use_rms_norm=True,
        use_swiglu=True,
        position_embedding="rope",
        tie_word_embeddings=True,
    ),
    # nanoGPT's GPT-2 small.
    "gpt2-dense": dict(
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        moe_layers=[],
        intermediate_size=3072,
        bias=True,
        attention_bias=True,
        use_rms_norm=False,
        use_swiglu=False,
        position_embedding="learned",
        tie_word_embeddings=True,
    ),
    # Tiny GPT-OSS look-alike: every architectural feature of the real models at toy size. vocab_size
    # is a placeholder the trainer replaces with the tokenizer's.
    "debug": dict(
        _GPT_OSS_COMMON,
        vocab_size=512,
        block_size=128,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        n_embd=64,
        intermediate_size=64,
        n_experts=4,
        top_k=2,
        sliding_window=32,
        rope_theta=10000.0,
        rope_scaling=None,
        aux_loss_weight=0.01,
        pad_token_id=None,
        eos_token_id=None,
    ),
}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, **overrides) -> GPTOSSConfig:
    """Config of preset `name` with field overrides applied before validation."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(list_presets())}")
    fields = dict(_PRESETS[name], **overrides)
    # A preset's special-token ids belong to its tokenizer: when only vocab_size is overridden (the
    # trainer sets it from the data's tokenizer) ids that no longer fit are dropped, not an error.
    for key in ("pad_token_id", "eos_token_id"):
        if key not in overrides and fields.get(key) is not None and fields[key] >= fields["vocab_size"]:
            fields[key] = None
    try:
        return GPTOSSConfig(**fields)
    except TypeError as e:  # unknown keyword
        raise ConfigError(f"preset {name!r}: {e}") from e


def get_gpt_oss_20b_config(**overrides) -> GPTOSSConfig:
    return get_preset("gpt-oss-20b", **overrides)


def get_gpt_oss_120b_config(**overrides) -> GPTOSSConfig:
    return get_preset("gpt-oss-120b", **overrides)


# The seed document's config names (its `config` dict and `create_gpt_oss_20b` keywords) -> ours.
SEED_DENSE_NAMES = {
    "d_model": "n_embd",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "d_ff": "intermediate_size",
    "max_seq_len": "block_size",
}


def create_gpt_oss_20b(vocab_size: int = 50257, max_seq_len: int = 1024, **config) -> GPTOSS:
    """The seed document's *scaled-down educational* GPT: a dense GPT-2-style model, not gpt-oss-20b.

    Defaults are the document's: vocab 50257, d_model 768, 12 layers, 12 heads, d_ff 3072,
    max_seq_len 1024, dropout 0.1; pre-norm LayerNorm, GELU, learned positions, tied embeddings
    (preset `gpt2-dense`, ~124M parameters). `config` takes the document's names (`d_model`,
    `num_layers`, `num_heads`, `d_ff`, `dropout`; d_ff defaults to 4 x d_model) or any GPTOSSConfig
    field, so ``create_gpt_oss_20b(**config)`` works with the document's config dict.

    For the real 20.9B-parameter GPT-OSS architecture use ``GPTOSS(get_gpt_oss_20b_config())`` or the
    run-config preset ``gpt-oss-20b``.
    """
    fields = {"vocab_size": vocab_size, "block_size": max_seq_len, "dropout": 0.1}
    for key, value in config.items():
        ours = SEED_DENSE_NAMES.get(key, key)
        if ours != key and ours in config:
            raise ConfigError(f"create_gpt_oss_20b: {key}={value!r} and {ours}={config[ours]!r} name the same "
                              "setting; pass one of them")
        fields[ours] = value
    if "intermediate_size" not in fields:
        fields["intermediate_size"] = 4 * fields.get("n_embd", _PRESETS["gpt2-dense"]["n_embd"])
    try:
        return GPTOSS(get_preset("gpt2-dense", **fields))
    except ConfigError as e:
        names = ", ".join(f"{k}={v}" for k, v in SEED_DENSE_NAMES.items())
        raise ConfigError(f"create_gpt_oss_20b: {e} (document names map to ours as {names})") from e
