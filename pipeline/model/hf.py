"""Conversion between our GPTOSS and transformers' GptOssForCausalLM (config, state dict, folders),
and the one reader of a weights folder's config.json (export, `model.init_from`, `GPTOSS.from_hf`).

This module never imports the model class: `GPTOSS.from_hf` / `save_hf` pass themselves in, so
the model package has no import circle.

Our parameter layouts were chosen to equal transformers' (nn.Linear [out, in]; experts input-major
`gate_up_proj` [E, D, 2F] with gate/up interleaved, `down_proj` [E, F, D]), so conversion is a
renaming only: no transposes, no gate/up reshuffle. What transformers cannot represent (LayerNorm,
dense blocks, classic SwiGLU, no sinks, ...) is refused with the list of incompatible settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config_utils import from_dict
from pipeline.errors import ConfigError
from pipeline.model.config import GPTOSSConfig, YaRNScaling
from pipeline.model.mxfp4 import dequantize_mxfp4

# config.json "format" of `python -m pipeline.export`'s own output (models transformers cannot represent).
NATIVE_FORMAT = "gpt-oss-pipeline/native-state-dict"

# The one key map, ours <-> transformers'. `{i}` is the block index; `{leaf}` matches the regex
# beside it and is copied as is. The inverse is the same table read right to left.
_KEY_MAP = [
    ("embed_tokens.weight", "model.embed_tokens.weight", None),
    ("norm.weight", "model.norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", None),
    ("blocks.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", None),
    ("blocks.{i}.attn.{leaf}", "model.layers.{i}.self_attn.{leaf}", r"[qkvo]_proj\.(?:weight|bias)|sinks"),
    ("blocks.{i}.ffn.router.gate.{leaf}", "model.layers.{i}.mlp.router.{leaf}", r"weight|bias"),
    ("blocks.{i}.ffn.experts.{leaf}", "model.layers.{i}.mlp.experts.{leaf}", r"(?:gate_up|down)_proj(?:_bias)?"),
]


def _compile(template: str, leaf: str | None) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(pattern.replace(r"\{leaf\}", f"(?P<leaf>{leaf})") if leaf else pattern)


_TO_HF = [(_compile(ours, leaf), hf) for ours, hf, leaf in _KEY_MAP]
_FROM_HF = [(_compile(hf, leaf), ours) for ours, hf, leaf in _KEY_MAP]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    raise KeyError(name)


def key_to_hf(name: str) -> str:
    """Our parameter name (plain, non-expert-parallel model) -> transformers' GptOss key."""
    return _rename(name, _TO_HF)


def key_from_hf(name: str) -> str:
    """transformers' GptOss key -> our parameter name; KeyError for a key we do not know."""
    return _rename(name, _FROM_HF)


# --- configs -------------------------------------------------------------------------------------
# Fields copied as they are, both ways: (our field, the property that resolves it, transformers' name).
_CONFIG_MAP = [
    ("vocab_size", "vocab_size", "vocab_size"),
    ("block_size", "block_size", "max_position_embeddings"),
    ("n_layer", "n_layer", "num_hidden_layers"),
    ("n_head", "n_head", "num_attention_heads"),
    ("n_kv_head", "kv_heads", "num_key_value_heads"),
    ("n_embd", "n_embd", "hidden_size"),
    ("head_dim", "head_size", "head_dim"),
    ("n_experts", "n_experts", "num_local_experts"),
    ("top_k", "top_k", "num_experts_per_tok"),
    ("intermediate_size", "expert_hidden", "intermediate_size"),
    ("sliding_window", "sliding_window", "sliding_window"),
    ("norm_eps", "norm_eps", "rms_norm_eps"),
    ("attention_bias", "attention_bias", "attention_bias"),
    ("swiglu_alpha", "swiglu_alpha", "swiglu_alpha"),
    ("swiglu_limit", "swiglu_limit", "swiglu_limit"),
    ("tie_word_embeddings", "tie_word_embeddings", "tie_word_embeddings"),
    ("init_std", "init_std", "initializer_range"),
    ("pad_token_id", "pad_token_id", "pad_token_id"),
]
# What every transformers GptOss is (hf_incompatibilities refuses the rest on the way out).
_GPT_OSS_FIXED = dict(
    moe_layers=None, capacity_factor=None, router_bias=True, expert_bias=True, bias=True, use_rms_norm=True,
    use_swiglu=True, gpt_oss_swiglu=True, use_attention_sinks=True, position_embedding="rope",
)
def hf_incompatibilities(config: GPTOSSConfig) -> list[str]:
    """Settings transformers' GptOss cannot represent (empty list = convertible)."""
    problems = []
    if not config.use_rms_norm:
        problems.append("use_rms_norm=False (GptOss uses RMSNorm)")
    if not (config.use_swiglu and config.gpt_oss_swiglu):
        problems.append("gpt_oss_swiglu=False (GptOss experts use the clamped SwiGLU variant)")
    if config.position_embedding != "rope":
        problems.append(f"position_embedding={config.position_embedding!r} (GptOss uses RoPE)")
    if not config.use_attention_sinks:
        problems.append("use_attention_sinks=False (GptOss attention always has sinks)")
    if config.num_moe_layers != config.n_layer:
        problems.append("moe_layers is not every block (GptOss has an MoE FFN in each block)")
    if not config.router_bias:
        problems.append("router_bias=False (the GptOss router always has a bias)")
    if not config.expert_bias:
        problems.append("expert_bias=False (GptOss experts always have biases)")
    return problems


def _check_convertible(config: GPTOSSConfig) -> None:
    problems = hf_incompatibilities(config)
    if problems:
        raise ConfigError(
            "this model cannot be expressed as a transformers GptOss model: " + "; ".join(problems)
        )


def aux_coef_to_hf(aux_loss_weight: float, top_k: int) -> float:
    """transformers' `router_aux_loss_coef` giving the same balancing pressure as our weight: its
    load-balancing term is k times ours (moe.py, RouterOutput.load_balance_loss), so its coefficient
    is ours / k. What stays different: transformers pools the router statistics of all layers
    before the product, we average the per-layer products (equal for one MoE layer)."""
    return aux_loss_weight / top_k


def aux_coef_from_hf(router_aux_loss_coef: float, top_k: int) -> float:
    """Our `aux_loss_weight` for transformers' `router_aux_loss_coef` (the inverse of aux_coef_to_hf)."""
    return router_aux_loss_coef * top_k


def config_to_hf(config: GPTOSSConfig):
    """transformers `GptOssConfig` equal to `config` (ConfigError if not representable)."""
    from transformers import GptOssConfig

    _check_convertible(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "yarn",
            "rope_theta": config.rope_theta,
            "factor": s.factor,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "truncate": s.truncate,
        }
        if s.attention_factor is not None:
            rope["attention_factor"] = s.attention_factor
    return GptOssConfig(
        **{theirs: getattr(config, resolved) for _, resolved, theirs in _CONFIG_MAP},
        layer_types=config.resolved_layer_types,
        rope_parameters=rope,
        attention_dropout=config.dropout,
        router_aux_loss_coef=aux_coef_to_hf(config.aux_loss_weight, config.top_k),
        eos_token_id=config.eos_token_id,
    )


def config_from_hf(hf_config) -> GPTOSSConfig:
    """GPTOSSConfig from a transformers GptOssConfig or a config.json dict."""
    from transformers import GptOssConfig

    if isinstance(hf_config, dict):
        model_type = hf_config.get("model_type")
        if model_type != "gpt_oss":
            raise ConfigError(
                f"config model_type is {model_type!r}; only 'gpt_oss' checkpoints can be loaded"
            )
        quant = hf_config.get("quantization_config")
        if quant and quant.get("quant_method") != "mxfp4":  # MXFP4 experts are dequantised on load
            raise ConfigError(
                f"checkpoint is quantized ({quant.get('quant_method', quant)}); only unquantized and MXFP4 "
                "GPT-OSS checkpoints can be loaded"
            )
        # from_dict also upgrades legacy rope_scaling/rope_theta keys
        hf_config = GptOssConfig.from_dict({k: v for k, v in hf_config.items() if k != "quantization_config"})
    if getattr(hf_config, "model_type", None) != "gpt_oss":
        raise ConfigError(f"expected a GptOssConfig, got {type(hf_config).__name__}")
    rope = dict(hf_config.rope_parameters)
    scaling = None
    if rope.get("rope_type") == "yarn":
        scaling = YaRNScaling(
            factor=rope["factor"],
            beta_fast=rope.get("beta_fast") or 32.0,
            beta_slow=rope.get("beta_slow") or 1.0,
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            truncate=rope.get("truncate", True),  # transformers' default when the key is absent
            attention_factor=rope.get("attention_factor"),
        )
    elif rope.get("rope_type") != "default":
        raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported (use 'default' or 'yarn')")
    eos = hf_config.eos_token_id
    return GPTOSSConfig(
        **{ours: getattr(hf_config, theirs) for ours, _, theirs in _CONFIG_MAP},
        **_GPT_OSS_FIXED,
        aux_loss_weight=aux_coef_from_hf(hf_config.router_aux_loss_coef, hf_config.num_experts_per_tok),
        dropout=float(hf_config.attention_dropout),
        layer_types=list(hf_config.layer_types),
        rope_theta=rope["rope_theta"],
        rope_scaling=scaling,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,  # we keep one stop token
    )


# --- state dicts -----------------------------------------------------------------------------------
def state_dict_to_hf(state_dict: dict[str, torch.Tensor], config: GPTOSSConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> GptOssForCausalLM's (same tensors; a tied LM head is left to transformers)."""
    _check_convertible(config)
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[key_to_hf(name)] = tensor
    return out


def state_dict_from_hf(state_dict: dict[str, torch.Tensor], config: GPTOSSConfig) -> dict[str, torch.Tensor]:
    """GptOssForCausalLM's state dict -> ours. MXFP4 experts are dequantised; unknown keys raise ConfigError."""
    _check_convertible(config)
    state_dict = dict(state_dict)
    for blocks_key in [k for k in state_dict if k.endswith("_blocks")]:  # MXFP4 experts, as released
        key = blocks_key[: -len("_blocks")]
        if f"{key}_scales" in state_dict:  # a lone half stays unknown and is reported below
            state_dict[key] = dequantize_mxfp4(state_dict.pop(blocks_key), state_dict.pop(f"{key}_scales"))
    out, unknown = {}, []
    for name, tensor in state_dict.items():
        try:
            out[key_from_hf(name)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ConfigError(f"unrecognised transformers GptOss weights: {sorted(unknown)[:8]}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


# --- folders ---------------------------------------------------------------------------------------
def read_folder_config(directory: str | Path) -> tuple[GPTOSSConfig, bool]:
    """(model config, native) of a weights folder: a transformers GPT-OSS folder, or a native export
    of ours (`native` True). ConfigError naming the folder's config.json if it is absent or refused."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{config_path} does not exist; expected a transformers GPT-OSS folder "
                          "or a `python -m pipeline.export` output")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path} is not valid JSON ({e})") from None
    native = raw.get("format") == NATIVE_FORMAT
    try:  # config_from_hf also refuses quantizations other than MXFP4
        if native:
            return from_dict(GPTOSSConfig, {k: v for k, v in raw.items() if k != "format"}), True
        return config_from_hf(raw), False
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{directory} holds no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def load_folder(model_cls, directory: str | Path, dtype: torch.dtype | None = None, **config_overrides):
    """`model_cls` (GPTOSS) built from a weights folder of either kind; weights keep their stored
    dtype unless `dtype`."""
    directory = Path(directory)
    config, native = read_folder_config(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    state = _read_safetensors(directory)
    if not native:
        state = state_dict_from_hf(state, config)
    elif config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model, missing, unexpected = model_holding(model_cls, config, state)
    if missing or unexpected:
        raise ConfigError(f"{directory}: weights do not match config.json (missing {sorted(missing)[:8]}, "
                          f"unexpected {sorted(unexpected)[:8]})")
    return model


def model_holding(model_cls, config, state: dict[str, torch.Tensor]):
    """(model_cls(config) whose tensors are `state`'s, missing keys, unexpected keys). Built on the
    meta device: no random init of weights that are overwritten right away (minutes for gpt-oss-20b)."""
    with torch.device("meta"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter
    return model, missing, unexpected


def save_hf(model, directory: str | Path) -> None:
    """config.json + model.safetensors of a GPTOSS `model` that GptOssForCausalLM.from_pretrained loads."""
    directory = Path(directory)
    hf_config = config_to_hf(model.config)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(directory)
    state = state_dict_to_hf(model.state_dict(), model.config)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
