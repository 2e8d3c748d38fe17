import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import GroupedExperts, MoE, TopKRouter, get_preset

CFG = dict(n_embd=32, intermediate_size=48, n_experts=4, top_k=2, vocab_size=64)


def make_cfg(**overrides):
    return get_preset("debug", **dict(CFG, **overrides))


def make_experts(cfg, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def grads(module, *inputs):
    return [t.grad.clone() for t in (*inputs, *module.parameters())]


@pytest.mark.parametrize(
    "act",
    [
        dict(),
        dict(gpt_oss_swiglu=False),
        dict(use_swiglu=False, gpt_oss_swiglu=False),
        dict(expert_bias=False),
    ],
    ids=["gpt_oss", "swiglu", "gelu", "no_bias"],
)
def test_grouped_mm_matches_per_expert_loop(act):
    cfg = make_cfg(**act)
    experts = make_experts(cfg)
    counts = torch.tensor([5, 0, 9, 3])  # an empty expert in the middle
    x = torch.randn(int(counts.sum()), cfg.n_embd, requires_grad=True)
    upstream = torch.randn(x.shape[0], cfg.n_embd)

    y = experts(x, counts)
    (y * upstream).sum().backward()
    g = grads(experts, x)
    x.grad = None
    experts.zero_grad()
    y_ref = experts.forward_reference(x, counts)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, grads(experts, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert experts.gate_up_proj.grad[1].abs().sum() == 0  # the empty expert gets no gradient


def test_grouped_experts_activation_and_layout_by_hand():
    cfg = make_cfg()
    experts = make_experts(cfg)
    x = torch.randn(3, cfg.n_embd) * 3  # large enough to hit the +-7 clamps
    h = x @ experts.gate_up_proj[2] + experts.gate_up_proj_bias[2]
    gate, up = h[:, ::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
    expected = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ experts.down_proj[
        2
    ] + experts.down_proj_bias[2]
    got = experts(x, torch.tensor([0, 0, 3, 0]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sum_backward_and_bf16():
    cfg = make_cfg()
    experts = make_experts(cfg)
    counts = torch.tensor([2, 6, 0, 4])
    x = torch.randn(12, cfg.n_embd, requires_grad=True)
    experts(x, counts).sum().backward()  # expanded (non-contiguous) upstream gradient
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    ref = experts.forward_reference(x.detach(), counts)
    bf16 = experts.to(torch.bfloat16)
    xb = x.detach().bfloat16().requires_grad_()
    yb = bf16(xb, counts)
    yb.sum().backward()
    assert yb.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(yb, bf16.forward_reference(xb.detach(), counts), rtol=0.02, atol=0.02)
    assert (yb.float() - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 rounding, not a wrong path


def test_zero_tokens_forward_and_backward():
    cfg = make_cfg()
    experts = make_experts(cfg)
    x = torch.zeros(0, cfg.n_embd, requires_grad=True)
    y = experts(x, torch.zeros(4, dtype=torch.long))
    assert y.shape == (0, cfg.n_embd)
    (y.sum() + 0.0).backward()  # an EP rank that received no tokens still joins backward
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in experts.parameters())


def test_shard_holds_a_clone_of_the_expert_slice():
    cfg = make_cfg()
    experts = make_experts(cfg)
    shard = experts.shard(1, 3)
    assert shard.num_experts == 2 and experts.num_experts == 4
    for name, p in shard.named_parameters():
        torch.testing.assert_close(p, getattr(experts, name)[1:3], rtol=0, atol=0)
        assert p.data_ptr() != getattr(experts, name).data_ptr()
    counts = torch.tensor([0, 4, 3, 0])
    x = torch.randn(7, cfg.n_embd)
    torch.testing.assert_close(shard(x, counts[1:3]), experts(x, counts), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not a non-empty range"):
        experts.shard(3, 3)


def test_router_outputs_and_losses_by_hand():
    cfg = make_cfg(n_experts=4, top_k=2)
    router = TopKRouter(cfg)
    x = torch.randn(10, cfg.n_embd)
    out = router(x)
    logits = x @ router.gate.weight.T + router.gate.bias
    top, ids = logits.topk(2, dim=-1)
    torch.testing.assert_close(out.weights_NK, torch.softmax(top, dim=-1))
    assert torch.equal(out.expert_ids_NK, ids) and out.expert_ids_NK.dtype == torch.long
    counts = torch.stack([(ids == e).sum() for e in range(4)])
    assert torch.equal(out.tokens_per_expert_E, counts)
    f = counts.float() / 20
    p = torch.softmax(logits, dim=-1).mean(0)
    torch.testing.assert_close(out.load_balance_loss, 4 * (f * p).sum())
    torch.testing.assert_close(out.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())


def test_balanced_load_balance_loss_is_one():
    cfg = make_cfg(n_experts=4, top_k=1, router_bias=False)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, :4] = torch.eye(4) * 10
    x = torch.zeros(8, cfg.n_embd)
    x[:, :4] = torch.eye(4).repeat(2, 1)  # two tokens per expert -> f = P-ish uniform
    out = router(x)
    assert torch.equal(out.tokens_per_expert_E, torch.tensor([2, 2, 2, 2]))
    assert out.load_balance_loss.item() == pytest.approx(1.0, abs=1e-6)


def naive_moe(moe, x_BTD):
    """Token-by-token reference: y_n = sum_k w_nk * expert_{e_nk}(x_n)."""
    x = x_BTD.reshape(-1, x_BTD.shape[-1])
    route = moe.router(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(moe.top_k):
            e = int(route.expert_ids_NK[n, k])
            counts = torch.zeros(moe.num_experts, dtype=torch.long)
            counts[e] = 1
            out[n] += route.weights_NK[n, k] * moe.experts.forward_reference(x[n : n + 1], counts)[0]
    return out.view_as(x_BTD)


def test_moe_matches_naive_token_loop_and_weights_router_loss():
    cfg = make_cfg(aux_loss_weight=0.1, router_z_loss_weight=0.01)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(2, 7, cfg.n_embd)
    y, router_loss = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    route = moe.router(x.view(-1, cfg.n_embd))
    torch.testing.assert_close(router_loss, 0.1 * route.load_balance_loss + 0.01 * route.z_loss)
    stats = moe.last_stats
    assert stats.tokens_per_expert.sum() == 14 * 2 and stats.dropped_tokens == 0
    assert not stats.load_balance_loss.requires_grad

    no_aux = MoE(cfg.replace(use_aux_loss=False))
    no_aux.load_state_dict(moe.state_dict())
    torch.testing.assert_close(no_aux(x)[1], 0.01 * route.z_loss)


def test_capacity_drop_keeps_earliest_tokens_per_expert():
    cfg = make_cfg(n_experts=4, top_k=1, capacity_factor=1.0, router_bias=False)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 8, cfg.n_embd)
    x[0, :, 0] = 1.0
    x[0, 6:, 0] = -1.0  # two tokens prefer another expert
    y, _ = moe(x)
    capacity = math.ceil(1.0 * 8 * 1 / 4)
    assert moe.last_stats.tokens_per_expert[0] == 6
    assert moe.last_stats.dropped_tokens == 6 - capacity
    dropless = MoE(cfg.replace(capacity_factor=None))
    dropless.load_state_dict(moe.state_dict())
    y_full, _ = dropless(x)
    # the first `capacity` tokens of expert 0 are kept, the rest output zero (residual carries them)
    torch.testing.assert_close(y[0, :capacity], y_full[0, :capacity])
    assert torch.all(y[0, capacity:6] == 0) and torch.all(y[0, :capacity].abs().sum(-1) > 0)


def test_moe_backward_reaches_router_and_experts():
    cfg = make_cfg()
    moe = MoE(cfg)
    x = torch.randn(2, 5, cfg.n_embd, requires_grad=True)
    y, loss = moe(x)
    (y.sum() + loss).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_swapped_experts_module_is_used():
    """The trainer's EP module replaces `moe.experts`; MoE must call it with grouped rows + counts."""
    cfg = make_cfg()
    moe = MoE(cfg)
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x_MD, counts_E):
            seen["counts"] = counts_E.clone()
            return self.inner(x_MD, counts_E)

    x = torch.randn(1, 6, cfg.n_embd)
    y_ref, _ = moe(x)
    moe.experts = Spy(moe.experts)
    y, _ = moe(x)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(seen["counts"], moe.last_stats.tokens_per_expert)


def test_gelu_activation_matches_functional():
    cfg = make_cfg(use_swiglu=False, gpt_oss_swiglu=False)
    experts = make_experts(cfg)
    x = torch.randn(4, cfg.n_embd)
    expected = F.gelu(x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]) @ experts.down_proj[0]
    expected = expected + experts.down_proj_bias[0]
    torch.testing.assert_close(experts(x, torch.tensor([4, 0, 0, 0])), expected, rtol=1e-5, atol=1e-5)


def test_meta_build_materialised_equals_model_built_whole():
    from pipeline.model import GPTOSS, get_preset

    for preset in ("debug", "gpt2-dense"):
        cfg = get_preset(preset, n_layer=2, n_embd=64, n_head=4, vocab_size=128, block_size=64)
        torch.manual_seed(3)
        whole = GPTOSS(cfg)
        torch.manual_seed(3)
        with torch.device("meta"):
            lazy = GPTOSS(cfg)
        lazy.materialize("cpu")
        for (name, a), (_, b) in zip(whole.state_dict().items(), lazy.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        if cfg.tie_word_embeddings:
            assert lazy.lm_head.weight is lazy.embed_tokens.weight


def test_reinitialised_shard_holds_its_slice_of_the_full_layer():
    from pipeline.model import GroupedExperts, get_preset

    cfg = get_preset("debug")
    full = GroupedExperts(cfg)
    full.reset_parameters(seed=11, key="blocks.0.experts")
    with torch.device("meta"):
        lazy_full = GroupedExperts(cfg)
    shard = lazy_full.shard(2, 4).to_empty(device="cpu")
    assert shard.expert_offset == 2
    shard.reset_parameters(seed=11, key="blocks.0.experts")
    assert torch.equal(shard.gate_up_proj, full.gate_up_proj[2:4])
    assert torch.equal(shard.down_proj, full.down_proj[2:4])


def test_long_sequences_computed_in_token_chunks_equal_one_piece():
    """Dropless MoE over more than `token_chunk` tokens: chunked (and recomputed in backward) gives the
    same output, router loss and gradients as one piece, including a short last chunk."""
    cfg = make_cfg()
    torch.manual_seed(3)
    whole = MoE(cfg)
    tiled = MoE(cfg)
    tiled.load_state_dict(whole.state_dict())
    tiled.token_chunk = 7
    x = torch.randn(2, 25, cfg.n_embd)
    results = []
    for moe in (whole, tiled):
        xi = x.clone().requires_grad_(True)
        y, router_loss = moe(xi)
        (y.square().sum() + router_loss).backward()
        results.append((y.detach(), router_loss.detach(), grads(moe, xi)))
    (y0, r0, g0), (y1, r1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    torch.testing.assert_close(r1, r0, rtol=0, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
