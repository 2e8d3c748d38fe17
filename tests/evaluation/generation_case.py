"""One generation case shared by the 2-rank rank script and its single-process reference."""

from __future__ import annotations

import torch

from pipeline.evaluation.generation import GenerationSettings
from pipeline.model import GPTOSS, get_preset

BATCH_SIZE = 3
# 7 requests over 2 ranks in batches of 3: rank 0 decodes 2 batches (3 + 1 rows), rank 1 one batch of
# 3 and then only dummy forwards while rank 0 decodes its second batch.
PROMPTS = ["import os\nimport ", "def __init__(self", "for i in range(", "if __name__ == ", "    return ",
           "class Parser(", "with open(path) as "]


def model(tok) -> GPTOSS:
    torch.manual_seed(0)
    return GPTOSS(get_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, init_std=0.05)).eval()


def contexts(tok) -> list[list[int]]:
    return [tok.encode(p) for p in PROMPTS]


def settings() -> GenerationSettings:
    return GenerationSettings(until=("\n",), max_gen_toks=12)
