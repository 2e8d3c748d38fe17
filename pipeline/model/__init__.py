"""GPT-OSS model package: pure PyTorch (no deepspeed / torch.distributed imports here).

Public API::

    from pipeline.model import GPTOSS, GPTOSSConfig, get_preset, list_presets, count_parameters
    model = GPTOSS(get_preset("debug"))
    logits, loss, aux_loss = model(input_ids, targets)   # train on loss + aux_loss

The seed documents' names work too: `GPTOSS(get_gpt_oss_20b_config())` is the real gpt-oss-20b
architecture; `create_gpt_oss_20b()` is the second document's small dense GPT (see presets.py).
`python -m pipeline.model` runs the first document's example (pipeline/model/__main__.py).
"""

from pipeline.model.attention import Attention, DecodeCache, KVCache
from pipeline.model.config import GPTOSSConfig, YaRNScaling
from pipeline.model.gpt_oss import GPTOSS, Block, RMSNorm
from pipeline.model.hf import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from pipeline.model.mlp import MLP
from pipeline.model.moe import GroupedExperts, MoE, MoEStats, RouterOutput, TopKRouter
from pipeline.model.params import count_module_parameters, count_parameters
from pipeline.model.presets import (
    create_gpt_oss_20b,
    get_gpt_oss_20b_config,
    get_gpt_oss_120b_config,
    get_preset,
    list_presets,
)

__all__ = [
    "GPTOSS",
    "MLP",
    "Attention",
    "Block",
    "GPTOSSConfig",
    "GroupedExperts",
    "DecodeCache",
    "KVCache",
    "MoE",
    "MoEStats",
    "RMSNorm",
    "RouterOutput",
    "TopKRouter",
    "YaRNScaling",
    "config_from_hf",
    "config_to_hf",
    "count_module_parameters",
    "count_parameters",
    "create_gpt_oss_20b",
    "get_gpt_oss_120b_config",
    "get_gpt_oss_20b_config",
    "get_preset",
    "list_presets",
    "state_dict_from_hf",
    "state_dict_to_hf",
]
