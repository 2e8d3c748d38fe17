"""Aux-loss-free load balancing (DeepSeek-V3) and the sequence-level balance loss, on the real router.

Balance bound: a router whose bias sends every token to experts 0 and 1 (max/mean load 4.0 with
8 experts, top-2) reaches max/mean < 1.3 within 120 bias updates at rate 0.05, with no aux loss;
with rate 0 it stays at 4.0.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.model import GPTOSS, get_preset
from pipeline.model.moe import TopKRouter


def imbalanced_router(rate: float, **overrides) -> TopKRouter:
    cfg = get_preset("debug", n_experts=8, top_k=2, router_bias=True, use_aux_loss=False,
                     load_balance_bias_rate=rate, **overrides)
    torch.manual_seed(0)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([4.0, 3.0, 0, 0, 0, 0, 0, 0]))  # experts 0, 1 take everything
    return router


def max_over_mean(counts_E: torch.Tensor) -> float:
    counts_E = counts_E.float()
    return float(counts_E.max() / counts_E.mean())


def run_updates(router: TopKRouter, rate: float, steps: int) -> list[float]:
    ratios = []
    for _ in range(steps):
        out = router(torch.randn(512, router.gate.in_features))
        ratios.append(max_over_mean(out.tokens_per_expert_E))
        if router.expert_bias is not None:
            router.update_expert_bias(out.tokens_per_expert_E, rate)
    return ratios


def test_bias_balances_a_collapsed_router_without_aux_loss():
    router = imbalanced_router(rate=0.05)
    ratios = run_updates(router, 0.05, 120)
    assert ratios[0] == 4.0
    assert max(ratios[-10:]) < 1.3, ratios[-10:]
    assert abs(float(router.expert_bias.sum())) < 1e-5  # kept zero-mean
    assert router.expert_bias[0] < 0 and router.expert_bias[1] < 0  # the overloaded ones were pushed down


def test_without_the_bias_the_router_stays_collapsed():
    router = imbalanced_router(rate=0.0)
    assert router.expert_bias is None and "expert_bias" not in router.state_dict()
    assert run_updates(router, 0.0, 20) == [4.0] * 20


def test_bias_steers_selection_only():
    router = imbalanced_router(rate=0.05)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([-9.0, -9.0, 3, 3, 1, 1, 0, 10]))
    x = torch.randn(64, router.gate.in_features)
    out = router(x)
    logits = router.gate(x)
    _, expected_ids = torch.topk(logits + router.expert_bias, 2)
    assert torch.equal(out.expert_ids_NK, expected_ids)
    assert (out.expert_ids_NK[:, 0] == 7).all() and not torch.isin(out.expert_ids_NK, torch.tensor([0, 1])).any()
    # Combine weights: softmax over the *unbiased* logits of the selected experts.
    torch.testing.assert_close(out.weights_NK, torch.softmax(logits.gather(-1, expected_ids), -1), rtol=0, atol=0)


def test_bias_is_a_zero_initialised_persistent_buffer_of_the_model():
    cfg = get_preset("debug", load_balance_bias_rate=1e-3)
    with torch.device("meta"):
        model = GPTOSS(cfg)
    model.materialize("cpu")  # to_empty leaves garbage in buffers: init must zero the bias
    keys = [k for k in model.state_dict() if k.endswith("router.expert_bias")]
    assert len(keys) == cfg.n_layer
    assert all(torch.equal(model.state_dict()[k], torch.zeros(cfg.n_experts)) for k in keys)
    assert not any(n.endswith("expert_bias") for n, _ in model.named_parameters())


def test_sequence_level_loss():
    cfg = get_preset("debug", n_experts=4, top_k=1, aux_loss_granularity="sequence")
    router = TopKRouter(cfg)
    batch = TopKRouter(get_preset("debug", n_experts=4, top_k=1))
    batch.load_state_dict(router.state_dict())
    x = torch.randn(2 * 16, cfg.n_embd)
    # One sequence: both granularities are the same loss.
    torch.testing.assert_close(router(x, n_seq=1).load_balance_loss, batch(x).load_balance_loss)
    # Two sequences of 16 tokens, one routed entirely (and confidently) to expert 0, the other to
    # expert 1: half balanced as a batch (E * (0.5 * 0.5 + 0.5 * 0.5) = 2), fully collapsed per
    # sequence (E * 1 * 1 = 4).
    with torch.no_grad():
        for r in (router, batch):
            r.gate.weight.zero_()
            r.gate.bias.zero_()
            r.gate.weight[0, 0] = r.gate.weight[1, 1] = 30.0
    x = torch.zeros(32, cfg.n_embd)
    x[:16, 0] = 1.0
    x[16:, 1] = 1.0
    torch.testing.assert_close(batch(x).load_balance_loss, torch.tensor(2.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(router(x, n_seq=2).load_balance_loss, torch.tensor(4.0), atol=1e-3, rtol=0)


def test_config_checks():
    with pytest.raises(ConfigError, match="aux_loss_granularity"):
        get_preset("debug", aux_loss_granularity="token")
    with pytest.raises(ConfigError, match="load_balance_bias_rate"):
        get_preset("debug", load_balance_bias_rate=-1.0)
