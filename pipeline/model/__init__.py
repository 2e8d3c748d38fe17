"""GPT-OSS model package: pure PyTorch (no deepspeed / torch.distributed imports here).

Public API::

    from pipeline.model import GPTOSS, GPTOSSConfig, get_preset, list_presets, count_parameters
    model = GPTOSS(get_preset("debug"))
    logits, loss, aux_loss = model(input_ids, targets)   # train on loss + aux_loss
"""

from pipeline.model.attention import Attention, KVCache
from pipeline.model.config import GPTOSSConfig, YaRNScaling
from pipeline.model.gpt_oss import GPTOSS, Block, RMSNorm
from pipeline.model.hf_convert import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from pipeline.model.mlp import MLP
from pipeline.model.moe import GroupedExperts, MoE, MoEStats, RouterOutput, TopKRouter
from pipeline.model.params import count_module_parameters, count_parameters
from pipeline.model.presets import get_gpt_oss_20b_config, get_gpt_oss_120b_config, get_preset, list_presets


def create_gpt_oss_20b(vocab_size: int = 201088, max_seq_len: int = 131072, **overrides) -> GPTOSS:
    """A GPTOSS of the gpt-oss-20b architecture with the given vocabulary and context length."""
    return GPTOSS(get_gpt_oss_20b_config(vocab_size=vocab_size, block_size=max_seq_len, **overrides))


__all__ = [
    "GPTOSS",
    "MLP",
    "Attention",
    "Block",
    "GPTOSSConfig",
    "GroupedExperts",
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
