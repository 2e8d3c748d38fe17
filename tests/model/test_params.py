import pytest
import torch

from pipeline.model import GPTOSS, count_module_parameters, count_parameters, get_preset


@pytest.mark.parametrize(
    "name, total, active", [("gpt-oss-20b", 20.91e9, 3.61e9), ("gpt-oss-120b", 116.83e9, 5.13e9)]
)
def test_released_model_counts_match_model_card(name, total, active):
    counts = count_parameters(get_preset(name))  # built on the meta device: allocates nothing
    assert counts["total"] == pytest.approx(total, rel=0.005)
    assert counts["active"] == pytest.approx(active, rel=0.005)
    assert counts["expert"] + counts["non_expert"] == counts["total"]
    assert counts["embedding"] == 201088 * 2880


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("debug", {}),
        ("gpt2-dense", {"n_layer": 2}),
        ("moe-124m", {"n_layer": 2, "moe_layers": [1], "n_embd": 64, "n_head": 4, "intermediate_size": 96}),
    ],
)
def test_count_parameters_equals_real_numel(name, overrides):
    cfg = get_preset(name, **overrides)
    model = GPTOSS(cfg)
    counts = count_parameters(cfg)
    assert counts == count_module_parameters(model)
    unique = {id(p): p for p in model.parameters()}
    assert counts["total"] == sum(p.numel() for p in unique.values())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts["expert"] == experts
    embedding = model.embed_tokens.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed else 0)
    assert counts["embedding"] == embedding
    # active = everything a token touches: shared weights + top_k/E of each expert bank (+ tied head)
    frac = cfg.top_k / cfg.n_experts
    inactive = round(experts * (1 - frac)) + (
        0 if cfg.tie_word_embeddings else model.embed_tokens.weight.numel()
    )
    inactive += model.pos_embed.weight.numel() if model.pos_embed is not None else 0
    assert counts["active"] == counts["total"] - inactive


def test_get_num_params_nanogpt_semantics():
    cfg = get_preset("gpt2-dense")
    with torch.device("meta"):
        model = GPTOSS(cfg)
    # nanoGPT's GPT-2 small: 124,439,808 parameters, 123.65M without the position table.
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert model.get_num_params() == 124_439_808 - 1024 * 768
    untied = GPTOSS(get_preset("debug"))
    assert untied.get_num_params() == untied.get_num_params(False) - untied.embed_tokens.weight.numel()
