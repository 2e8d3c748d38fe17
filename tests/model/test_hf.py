"""Equivalence with transformers' GptOssForCausalLM (the reference implementation) on the same weights."""

import json

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM

from pipeline.errors import ConfigError
from pipeline.model import (
    GPTOSS,
    config_from_hf,
    config_to_hf,
    get_gpt_oss_120b_config,
    get_preset,
    state_dict_from_hf,
    state_dict_to_hf,
)
from tests.model.utils import randomize_, tiny_gpt_oss

CONFIGS = {
    # GQA, YaRN, sliding window 8 on even blocks, sinks, biases, untied
    "gqa_yarn": dict(rope_scaling=dict(factor=4.0, original_max_position_embeddings=32), rope_theta=1000.0),
    # plain multi-head attention, plain RoPE, no attention bias, tied embeddings, all-sliding
    "mha_tied": dict(
        n_kv_head=4,
        attention_bias=False,
        tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention"],
    ),
}


def pair(name, experts_implementation="grouped_mm"):
    torch.manual_seed(0)
    cfg = tiny_gpt_oss(**CONFIGS[name])
    ours = randomize_(GPTOSS(cfg)).eval()
    hf_cfg = config_to_hf(cfg)
    hf = GptOssForCausalLM._from_config(
        hf_cfg, attn_implementation="eager", experts_implementation=experts_implementation
    ).eval()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg), strict=not cfg.tie_word_embeddings)
    return ours, hf


def assert_logits_close(a, b):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_transformers(name):
    ours, hf = pair(name)
    assert hf.config._attn_implementation == "eager"
    for T in (5, 17, 40):  # shorter than, and well past, the sliding window of 8
        x = torch.randint(0, ours.config.vocab_size, (2, T))
        targets = torch.roll(x, -1, dims=1)
        targets[:, -1] = -100  # transformers shifts labels itself; we take next tokens
        logits, loss, _ = ours(x, targets)
        ref = hf(input_ids=x, labels=x)
        assert_logits_close(logits, ref.logits)
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_matches_transformers_eager_experts():
    ours, hf = pair("gqa_yarn", experts_implementation="eager")
    x = torch.randint(0, ours.config.vocab_size, (1, 23))
    assert_logits_close(ours(x)[0], hf(x).logits)


def test_state_dict_round_trip_is_exact():
    cfg = tiny_gpt_oss()
    sd = randomize_(GPTOSS(cfg)).state_dict()
    hf_sd = state_dict_to_hf(sd, cfg)
    assert "model.layers.1.mlp.experts.gate_up_proj" in hf_sd and "model.layers.0.self_attn.sinks" in hf_sd
    back = state_dict_from_hf(hf_sd, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(ConfigError, match="unrecognised"):
        state_dict_from_hf({**hf_sd, "model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_hf_loads_in_transformers_and_back(tmp_path, name):
    ours, _ = pair(name)
    ours.save_hf(tmp_path)
    hf = GptOssForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 19))
    assert_logits_close(ours(x)[0], hf(x).logits)
    again = GPTOSS.from_hf(tmp_path).eval()
    assert again.config == ours.config.replace(layer_types=ours.config.resolved_layer_types)
    for (k, a), b in zip(again.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert (again.lm_head.weight is again.embed_tokens.weight) == ours.config.tie_word_embeddings


def test_from_hf_reads_transformers_save_pretrained(tmp_path):
    hf_cfg = config_to_hf(tiny_gpt_oss())
    torch.manual_seed(1)
    hf = GptOssForCausalLM(hf_cfg).eval()  # transformers' own init: random router bias and sinks
    hf.save_pretrained(tmp_path)
    ours = GPTOSS.from_hf(tmp_path).eval()
    x = torch.randint(0, hf_cfg.vocab_size, (1, 21))
    assert_logits_close(ours(x)[0], hf(x).logits)


def test_config_round_trip_and_presets_agree_with_transformers_defaults():
    cfg = tiny_gpt_oss(layer_types=["sliding_attention", "full_attention"])
    assert config_from_hf(config_to_hf(cfg)) == cfg
    ours = config_to_hf(get_gpt_oss_120b_config()).to_dict()
    theirs = GptOssConfig(pad_token_id=199999, eos_token_id=200002, router_aux_loss_coef=0.001).to_dict()
    for key in (
        "num_hidden_layers",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "sliding_window",
        "layer_types",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "swiglu_alpha",
        "swiglu_limit",
        "tie_word_embeddings",
        "attention_bias",
    ):
        assert ours[key] == theirs[key], key


def test_incompatible_configs_are_refused_with_reasons(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config_to_hf(get_preset("moe-124m"))
    assert "use_attention_sinks=False" in str(exc.value) and "gpt_oss_swiglu=False" in str(exc.value)
    with torch.device("meta"):
        dense = GPTOSS(get_preset("gpt2-dense"))
    with pytest.raises(ConfigError) as exc:
        dense.save_hf(tmp_path / "dense")
    for reason in ("use_rms_norm=False", "position_embedding='learned'", "moe_layers is not every block"):
        assert reason in str(exc.value)
    assert not (tmp_path / "dense").exists()

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        GPTOSS.from_hf(tmp_path / "llama")
    quantized = config_to_hf(tiny_gpt_oss()).to_dict()
    quantized["quantization_config"] = {"quant_method": "mxfp4"}  # dequantised on load
    assert config_from_hf(quantized) == config_from_hf(config_to_hf(tiny_gpt_oss()).to_dict())
    quantized["quantization_config"] = {"quant_method": "bitsandbytes"}
    with pytest.raises(ConfigError, match="quantized .bitsandbytes.; only unquantized and MXFP4"):
        config_from_hf(quantized)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_aux_loss_coefficient_crosses_on_transformers_scale(n_layer):
    """After conversion our weighted load-balancing term equals transformers' on the same batch: for
    one MoE layer exactly; for several it equals the mean of transformers' term per layer, the one
    difference left being that transformers pools all layers' router statistics before the product."""
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    torch.manual_seed(0)
    cfg = tiny_gpt_oss(n_layer=n_layer, layer_types=["full_attention"] * n_layer, aux_loss_weight=0.02,
                       router_z_loss_weight=0.0)
    ours = randomize_(GPTOSS(cfg)).eval()
    hf_cfg = config_to_hf(cfg)
    assert hf_cfg.router_aux_loss_coef == pytest.approx(0.02 / cfg.top_k)
    assert config_from_hf(hf_cfg).aux_loss_weight == pytest.approx(0.02)
    hf = GptOssForCausalLM._from_config(hf_cfg, attn_implementation="eager").eval()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        _, _, aux = ours(x, x)
        out = hf(x, labels=x, output_router_logits=True)
    per_layer = [load_balancing_loss_func((logits,), cfg.n_experts, cfg.top_k) for logits in out.router_logits]
    theirs = hf_cfg.router_aux_loss_coef * torch.stack(per_layer).mean()
    torch.testing.assert_close(aux, theirs, rtol=1e-5, atol=0)
    if n_layer == 1:
        torch.testing.assert_close(aux, hf_cfg.router_aux_loss_coef * out.aux_loss, rtol=1e-5, atol=0)
