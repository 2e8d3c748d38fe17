"""Parameter accounting: total, active per token, embedding/expert splits.

Counts come from the real module tree (built on the meta device, so a 120B count allocates nothing),
not from a hand-written formula that could drift from the model.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.config import GPTOSSConfig
from pipeline.model.gpt_oss import GPTOSS
from pipeline.model.moe import GroupedExperts


def count_module_parameters(model: nn.Module) -> dict[str, int]:
    """Counts for a built GPTOSS (any device).

    - total: every distinct parameter (a tied embedding/LM head counts once)
    - embedding: the input token embedding plus learned position embeddings
    - expert: stacked expert weights and biases of all MoE blocks
    - active: parameters one token uses: total minus the input embedding (a lookup, not a matmul;
      kept when tied because it is then the LM head) and position table, with each MoE block's
      experts counted at top_k / n_experts. This matches the GPT-OSS model card's active counts.
    """
    config: GPTOSSConfig = model.config
    total = sum(p.numel() for p in model.parameters())
    token_embedding = model.embed_tokens.weight.numel()
    position_embedding = model.pos_embed.weight.numel() if model.pos_embed is not None else 0
    expert = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    unused_in_matmuls = position_embedding + (0 if config.tie_word_embeddings else token_embedding)
    inactive_expert = 0
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            n = sum(p.numel() for p in m.parameters())
            inactive_expert += n - n * config.top_k // m.num_experts
    embedding = token_embedding + position_embedding
    return {
        "total": total,
        "active": total - unused_in_matmuls - inactive_expert,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "expert": expert,
        "non_expert": total - expert,
    }


def count_parameters(config: GPTOSSConfig) -> dict[str, int]:
    """`count_module_parameters` of the model `config` describes, built on the meta device."""
    with torch.device("meta"):
        model = GPTOSS(config)
    return count_module_parameters(model)
