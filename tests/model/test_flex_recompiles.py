"""Compiled FlexAttention at many lengths (generation prefills, evaluation) compiles once more, not
once per length. Dynamo's guards and recompilation do not depend on the backend, so the CPU test
counts graphs of our compiled function with the "eager" backend (torch 2.13's CPU inductor has no
flex with lse); the gpu test counts them in a real CUDA generation."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import AuxRequest

from pipeline.model.flex_attention import compiled_flex_attention
from pipeline.model.masks import block_mask

LENGTHS = (100, 130, 200, 257, 300, 310, 400, 500, 513, 600)  # more than dynamo's recompile limit (8)


def test_compiled_flex_compiles_at_most_twice_for_ten_lengths():
    torch._dynamo.reset()
    counters.clear()
    flex = compiled_flex_attention("eager")
    graphs = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*recompile_limit.*")
        for T in LENGTHS:
            q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
            out, aux = flex(q, k, v, block_mask=block_mask(128, T, "cpu"), enable_gqa=True,
                            return_aux=AuxRequest(lse=True))
            assert out.shape == q.shape and aux.lse.shape == (1, 4, T)
            graphs.append(counters["stats"]["unique_graphs"])
    # The first length specialises; the second turns the lengths dynamic; no more after that.
    assert graphs == [1] + [2] * (len(LENGTHS) - 1), graphs


@pytest.mark.gpu
def test_gpu_generation_prefill_at_many_lengths_does_not_recompile_per_length():
    from pipeline.model import GPTOSS, get_preset

    torch._dynamo.reset()
    counters.clear()
    cfg = get_preset("debug", n_layer=2, block_size=1024, attention_backend="flex")
    model = GPTOSS(cfg).cuda().to(torch.bfloat16).eval()
    graphs = []
    for T in LENGTHS:
        prompt = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        model.generate(prompt, max_new_tokens=2, temperature=0)  # prefill on flex, decoding on SDPA
        graphs.append(counters["stats"]["unique_graphs"])
    # One static and one dynamic graph per window kind (full and sliding), whatever the lengths.
    assert graphs[-1] <= 4 and graphs[-1] == graphs[2], graphs
