"""Capacity drop without host syncs: dropped slots stay as padding rows the experts fence off."""

import pytest
import torch

from pipeline.model import GroupedExperts, MoE, get_preset


def make_cfg(**overrides):
    return get_preset("debug", **dict(dict(n_embd=32, intermediate_size=48, n_experts=4, top_k=2), **overrides))


def test_padded_rows_output_zero_and_pass_no_gradient():
    cfg = make_cfg()
    torch.manual_seed(0)
    experts = GroupedExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(14, cfg.n_embd)
    x[10:] = float("nan")  # padding rows may hold anything: they must not leak into outputs or grads
    results = []
    for forward in (experts.forward, experts.forward_reference):  # grouped_mm vs per-expert loop
        xg = x.clone().requires_grad_()
        experts.zero_grad()
        y = forward(xg, counts, padded=True)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        results.append([y, xg.grad, *(p.grad for p in experts.parameters())])
    grouped, reference = results
    assert torch.all(grouped[0][10:] == 0) and torch.all(grouped[1][10:] == 0)
    for got, want in zip(grouped, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="counts_E sums to 10"):
        experts.forward_reference(x, counts)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_gpu_moe_step_has_no_host_sync(capacity_factor):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("before sm90, grouped_mm loops over the groups on the host (DESIGN.md §6)")
    cfg = make_cfg(n_embd=128, intermediate_size=128, capacity_factor=capacity_factor)
    moe = MoE(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, cfg.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    moe(x)  # warm-up (lazy initialisation may sync once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, router_loss = moe(x)
        (y.float().sum() + router_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()
