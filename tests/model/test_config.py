
import pytest
import torch

from pipeline.config_utils import from_dict, to_dict
from pipeline.errors import ConfigError
from pipeline.model import (
    GPTOSS,
    GPTOSSConfig,
    YaRNScaling,
    create_gpt_oss_20b,
    get_gpt_oss_20b_config,
    get_gpt_oss_120b_config,
    get_preset,
    list_presets,
)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_experts=2, top_k=3), "top_k (3) must be <= n_experts (2)"),
        (dict(n_head=12, n_kv_head=5), "n_head (12) must be divisible by n_kv_head (5)"),
        (dict(n_embd=100, n_head=12), "n_embd (100) must be divisible by n_head (12), or set head_dim"),
        (dict(n_layer=4, moe_layers=[1, 7]), "moe_layers [7] out of range for n_layer (4)"),
        (dict(n_layer=2, layer_types=["full_attention"]), "layer_types has 1 entries but n_layer is 2"),
        (dict(layer_types=["sliding_attention"] * 12), "sliding_window is null"),
        (dict(capacity_factor=0.0), "capacity_factor (0.0) must be > 0"),
        (dict(dropout=1.0), "dropout (1.0) must be in [0, 1)"),
        (dict(position_embedding="alibi"), "position_embedding ('alibi') must be one of"),
        (dict(position_embedding="learned", rope_scaling=YaRNScaling()), "set rope_scaling=null"),
        (dict(use_swiglu=False, gpt_oss_swiglu=True), "gpt_oss_swiglu=True needs use_swiglu=True"),
        (dict(n_embd=96, n_head=4, head_dim=3), "head_dim (3) must be even for RoPE"),
        (dict(vocab_size=100, eos_token_id=100), "eos_token_id (100) must be in [0, vocab_size=100)"),
        (dict(vocab_size=0), "vocab_size (0) must be a positive integer"),
    ],
)
def test_validation_errors_name_field_and_fix(fields, message):
    with pytest.raises(ConfigError) as exc:
        GPTOSSConfig(**fields)
    assert message in str(exc.value)


def test_yarn_validation():
    with pytest.raises(ConfigError, match=r"beta_fast \(1.0\) > beta_slow \(2.0\)"):
        YaRNScaling(beta_fast=1.0, beta_slow=2.0)


def test_replace_validates_and_rejects_unknown_fields():
    cfg = get_preset("debug")
    with pytest.raises(ConfigError, match="unknown GPTOSSConfig field"):
        cfg.replace(n_layers=3)
    with pytest.raises(ConfigError, match="top_k"):
        cfg.replace(top_k=9)
    assert cfg.replace(n_layer=3).resolved_layer_types == ["sliding_attention", "full_attention"] * 1 + [
        "sliding_attention"
    ]


def test_moe_layers_semantics():
    assert GPTOSSConfig(n_layer=3).num_moe_layers == 3  # None = all
    assert GPTOSSConfig(n_layer=3, moe_layers=[]).num_moe_layers == 0
    cfg = GPTOSSConfig(n_layer=3, moe_layers=[1])
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, False]


def test_gpt_oss_presets_match_released_architecture():
    for cfg, layers, experts in ((get_gpt_oss_20b_config(), 24, 32), (get_gpt_oss_120b_config(), 36, 128)):
        assert (cfg.n_layer, cfg.n_experts, cfg.top_k) == (layers, experts, 4)
        assert (cfg.n_embd, cfg.expert_hidden, cfg.n_head, cfg.kv_heads, cfg.head_size) == (
            2880,
            2880,
            64,
            8,
            64,
        )
        assert (cfg.vocab_size, cfg.block_size, cfg.pad_token_id, cfg.eos_token_id) == (
            201088,
            131072,
            199999,
            200002,
        )
        assert cfg.resolved_layer_types[:2] == ["sliding_attention", "full_attention"]
        assert cfg.layer_window(0) == 128 and cfg.layer_window(1) is None
        assert cfg.use_attention_sinks and cfg.gpt_oss_swiglu and not cfg.tie_word_embeddings
        assert cfg.router_bias and cfg.expert_bias and cfg.attention_bias and cfg.use_rms_norm
        assert cfg.rope_theta == 150000.0 and cfg.norm_eps == 1e-5
        assert cfg.rope_scaling == YaRNScaling(
            factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096, truncate=False
        )


def test_presets_listed_and_overridable():
    assert {"gpt-oss-20b", "gpt-oss-120b", "moe-124m", "gpt2-dense", "debug"} <= set(list_presets())
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-oss-7b'"):
        get_preset("gpt-oss-7b")
    with pytest.raises(ConfigError, match="preset 'debug'"):
        get_preset("debug", not_a_field=1)
    # The trainer sets vocab_size from its tokenizer: special ids that no longer fit are dropped.
    cfg = get_preset("gpt-oss-20b", vocab_size=50304)
    assert cfg.vocab_size == 50304 and cfg.pad_token_id is None and cfg.eos_token_id is None


def test_config_dict_round_trip_with_overrides():
    cfg = get_preset("gpt-oss-20b")
    data = to_dict(cfg)
    assert data["rope_scaling"]["factor"] == 32.0
    assert from_dict(GPTOSSConfig, data) == cfg
    data["n_layer"] = 4  # a `model.n_layer=4` override: derived fields follow, nothing stale
    small = from_dict(GPTOSSConfig, data)
    assert small.resolved_layer_types == ["sliding_attention", "full_attention"] * 2
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(GPTOSSConfig, {"n_layers": 4})


def test_create_gpt_oss_20b_is_the_seed_documents_small_dense_gpt():
    # The document's defaults: GPT-2 small with dropout 0.1, ~124M parameters (not the 20.9B model).
    with torch.device("meta"):
        model = create_gpt_oss_20b(vocab_size=50257, max_seq_len=1024)
    assert isinstance(model, GPTOSS)
    assert model.config == get_preset("gpt2-dense", dropout=0.1)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    cfg = model.config
    assert (cfg.use_rms_norm, cfg.use_swiglu, cfg.position_embedding) == (False, False, "learned")
    assert cfg.num_moe_layers == 0 and cfg.tie_word_embeddings
    # The document's config names; d_ff follows d_model (4x) unless given.
    small = create_gpt_oss_20b(vocab_size=300, max_seq_len=64, d_model=32, num_layers=2, num_heads=4, dropout=0.0)
    c = small.config
    assert (c.vocab_size, c.block_size, c.n_embd, c.n_layer, c.n_head, c.intermediate_size, c.dropout) == (
        300, 64, 32, 2, 4, 128, 0.0)
    assert create_gpt_oss_20b(d_model=32, num_heads=4, num_layers=1, d_ff=48, vocab_size=300).config.dense_hidden == 48
    with pytest.raises(ConfigError, match="d_model=32 and n_embd=64 name the same setting"):
        create_gpt_oss_20b(d_model=32, n_embd=64)
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(12\).*d_model=n_embd"):
        create_gpt_oss_20b(d_model=100)
    # The real architecture is GPTOSS(get_gpt_oss_20b_config()).
    with torch.device("meta"):
        real = GPTOSS(get_gpt_oss_20b_config())
    assert (real.config.n_layer, real.config.n_experts) == (24, 32)
