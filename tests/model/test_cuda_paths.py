"""Paths that differ on CUDA: grouped_mm validity and its fallback, host syncs, device-drawn init.

The CPU tests check the decisions (which shapes grouped_mm accepts, per-device caches); the `gpu`
tests run the CUDA kernels against the CPU-verified references (skipped without a GPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pipeline.model import GroupedExperts, get_preset
from pipeline.model.moe import grouped_mm_problem
from pipeline.model.rope import RotaryEmbedding


def _experts(device, dtype, seed=0, **overrides):
    cfg = get_preset("debug", **{"n_embd": 64, "intermediate_size": 96, "n_experts": 6, "top_k": 2, **overrides})
    torch.manual_seed(seed)
    experts = GroupedExperts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts.to(device, dtype)


def test_grouped_mm_problem_names_misaligned_rows_and_dtype_mismatch():
    ok = _experts("cpu", torch.float32)
    x = torch.randn(3, 64)
    assert grouped_mm_problem(x, ok.gate_up_proj) is None and grouped_mm_problem(x, ok.down_proj) is None
    odd = _experts("cpu", torch.bfloat16, n_embd=100, intermediate_size=60)  # 100 x 2 bytes = 200, not 16k
    reason = grouped_mm_problem(torch.randn(3, 100, dtype=torch.bfloat16), odd.gate_up_proj)
    assert reason is not None and "16-byte" in reason and "multiple of 8" in reason
    assert "dtype" in grouped_mm_problem(x.double(), ok.gate_up_proj)


def test_rope_table_reaches_a_device_once():
    rope = RotaryEmbedding(16, 10000.0, None)
    first = rope.inv_freq_on(torch.device("cpu"))
    assert rope.inv_freq_on(torch.device("cpu")) is first  # no copy per forward
    cos, _ = rope(torch.arange(5), torch.float32)
    torch.testing.assert_close(cos[1], torch.cos(rope.inv_freq))


def _grouped_vs_loop(experts, counts_E, extra_rows=0):
    """(grouped outputs + grads, loop outputs + grads) for rows grouped by `counts_E`."""
    dev, dtype = experts.gate_up_proj.device, experts.gate_up_proj.dtype
    gen = torch.Generator(device=dev).manual_seed(1)
    M = int(counts_E.sum()) + extra_rows
    x = torch.randn(M, experts.config.n_embd, device=dev, dtype=dtype, generator=gen)
    upstream = torch.randn(M, experts.config.n_embd, device=dev, dtype=dtype, generator=gen)
    res = []
    for fn in (experts.forward, experts.forward_reference):
        experts.zero_grad()
        xx = x.clone().requires_grad_()
        y = fn(xx, counts_E, padded=extra_rows > 0)
        (y.float() * upstream.float()).sum().backward()
        res.append([y.float(), xx.grad.float()] + [p.grad.float() for p in experts.parameters()])
    return res


def _assert_close_rel(got, ref, tol):
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        rel = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        assert rel < tol, f"tensor {i} (y, dx, gate_up, down, biases...): rel err {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("extra_rows", [0, 37], ids=["dropless", "padded"])
def test_gpu_grouped_mm_values_and_gradients_equal_the_loop(extra_rows):
    experts = _experts("cuda", torch.bfloat16)
    assert grouped_mm_problem(torch.empty(1, 64, device="cuda", dtype=torch.bfloat16), experts.gate_up_proj) is None
    counts = torch.tensor([13, 0, 7, 29, 1, 21], device="cuda")  # none a multiple of 8, an empty group
    with warnings.catch_warnings():
        # The grouped path must be taken, not the loop (which warns).
        warnings.filterwarnings("error", message="MoE experts use the per-expert loop")
        got, ref = _grouped_vs_loop(experts, counts, extra_rows)
    _assert_close_rel(got, ref, 2e-2)  # bf16: different summation orders
    assert got[2][1].abs().sum() == 0  # the empty expert gets no weight gradient


@pytest.mark.gpu
def test_gpu_misaligned_experts_fall_back_to_the_loop_with_one_warning():
    import pipeline.model.moe as moe

    moe._warn_loop_on_cuda.cache_clear()
    experts = _experts("cuda", torch.bfloat16, n_embd=100, intermediate_size=60)
    counts = torch.tensor([3, 0, 5, 2, 9, 1], device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, ref = _grouped_vs_loop(experts, counts)
        _grouped_vs_loop(experts, counts)
    loop_warnings = [w for w in caught if "per-expert loop" in str(w.message)]
    assert len(loop_warnings) == 1 and "16-byte" in str(loop_warnings[0].message)
    _assert_close_rel(got, ref, 1e-6)  # both ran the loop


@pytest.mark.gpu
def test_gpu_training_forward_backward_does_not_copy_the_rope_table():
    """The RoPE frequencies were copied host-to-device every forward (a sync per micro-batch)."""
    from pipeline.model import GPTOSS

    cfg = get_preset("debug", attention_backend="sdpa")
    model = GPTOSS(cfg).cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    model(ids, torch.roll(ids, -1, 1), return_logits=False)[1].backward()  # lazy init, first copy
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(ids, torch.roll(ids, -1, 1), return_logits=False)[1].backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    rope_syncs = [w for w in caught if "synchroniz" in str(w.message) and w.filename.endswith("rope.py")]
    assert not rope_syncs, [f"{w.filename}:{w.lineno}" for w in rope_syncs]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}


def test_explicit_cpu_draw_device_is_the_default_init():
    from pipeline.model import GPTOSS

    cfg = get_preset("debug", n_layer=2)
    torch.manual_seed(3)
    whole = GPTOSS(cfg)
    torch.manual_seed(3)
    with torch.device("meta"):
        drawn = GPTOSS(cfg)
    drawn.init_device = torch.device("cpu")
    drawn.materialize("cpu")
    for name, value in _params(whole).items():
        assert torch.equal(value, _params(drawn)[name]), name


@pytest.mark.gpu
def test_gpu_init_drawn_on_the_device_is_the_same_model_in_every_layout():
    """CUDA draws: a model materialised on the GPU, one living on the CPU but drawn on the GPU (the
    ZeRO-2 path), and an expert shard re-initialised alone all hold the same values. They differ from
    CPU draws (another generator), which is documented, not a requirement."""
    from pipeline.model import GPTOSS

    cfg = get_preset("debug", n_layer=2)
    cuda = torch.device("cuda", torch.cuda.current_device())
    models = []
    for device, draw_on in (("cuda", None), ("cpu", cuda)):
        torch.manual_seed(3)
        with torch.device("meta"):
            model = GPTOSS(cfg)
        model.init_device = draw_on
        models.append(model.materialize(device))
    on_gpu, on_cpu = _params(models[0]), _params(models[1])
    for name in on_gpu:
        assert torch.equal(on_gpu[name], on_cpu[name]), name
    # An expert-parallel rank's slice, re-drawn alone, is the slice of the full layer.
    full = models[0].blocks[1].ffn.experts
    shard = full.shard(2, 4)
    shard.reset_parameters(models[0].init_seed, "blocks.1.experts")
    assert torch.equal(shard.gate_up_proj, full.gate_up_proj[2:4])
    assert torch.equal(shard.down_proj, full.down_proj[2:4])
    # N(0, init_std) statistics, and not the CPU stream.
    w = on_gpu["blocks.0.attn.q_proj.weight"]
    assert abs(w.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    torch.manual_seed(3)
    assert not torch.equal(_params(GPTOSS(cfg))["blocks.0.attn.q_proj.weight"], w)
