import functools

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import GPTOSS, MLP, MoE, get_preset
from pipeline.model.attention import attention_mask
from tests.model.utils import randomize_, tiny_gpt_oss


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_(GPTOSS(cfg), seed).eval()


def test_forward_contract_and_objective():
    cfg = tiny_gpt_oss()
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = -100
    logits, loss, aux = model(x, targets)
    assert logits.shape == (2, 12, cfg.vocab_size)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]
    router_losses = torch.stack([cfg.aux_loss_weight * m.last_stats.load_balance_loss for m in moes])
    torch.testing.assert_close(aux, router_losses.mean())
    assert model(x)[1] is None


def test_init_is_deterministic_and_gpt2_scaled():
    cfg = tiny_gpt_oss(n_layer=8)
    torch.manual_seed(3)
    a = GPTOSS(cfg)
    torch.manual_seed(3)
    b = GPTOSS(cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    resid = a.blocks[0].attn.o_proj.weight.std().item()
    assert resid == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(2 * 8 layers)
    assert a.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(a.blocks[0].attn.q_proj.bias == 0)


@pytest.mark.parametrize("preset", ["debug", "moe-124m", "gpt2-dense"])
def test_changing_a_future_token_never_changes_earlier_logits(preset):
    small = dict(vocab_size=64, n_layer=2, n_embd=32, n_head=4, block_size=64)
    if preset != "debug":
        small["intermediate_size"] = 64
    cfg = get_preset(preset, **small)
    model = build(cfg)
    x = torch.randint(0, 64, (1, 40))
    base = model(x)[0]
    for t in (0, 9, 25, 39):
        y = x.clone()
        y[0, t] = (y[0, t] + 1) % 64
        out = model(y)[0]
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_sliding_window_hides_tokens_beyond_the_window():
    window = 6
    cfg = tiny_gpt_oss(n_layer=1, layer_types=["sliding_attention"], sliding_window=window)
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 30))
    y = x.clone()
    y[0, 3] = (y[0, 3] + 1) % cfg.vocab_size
    a, b = model(x)[0], model(y)[0]
    # position p sees keys p-window+1 .. p: token 3 influences positions 3..8 only
    assert not torch.allclose(a[0, 3 + window - 1], b[0, 3 + window - 1])
    torch.testing.assert_close(a[0, 3 + window :], b[0, 3 + window :], rtol=0, atol=0)
    full = build(cfg.replace(layer_types=["full_attention"]))
    assert not torch.allclose(full(x)[0][0, 20], full(y)[0][0, 20])


def test_attention_mask_shapes_and_fast_path():
    assert attention_mask(8, 8, None, False, torch.device("cpu")) is None  # SDPA is_causal
    assert attention_mask(1, 9, None, False, torch.device("cpu")) is None  # one query sees all
    # queries at positions 4 and 5 of 6, window 3, sink column first (always visible)
    m = attention_mask(2, 6, 3, True, torch.device("cpu"))
    expected = torch.tensor([[1, 0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_sinks_absorb_attention_mass():
    """A very large sink takes all probability: the attention output becomes o_proj's bias."""
    cfg = tiny_gpt_oss(n_layer=1)
    model = build(cfg)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.sinks.fill_(1e4)
    x = torch.randn(1, 5, cfg.n_embd)
    cos, sin = model.rope(torch.arange(5), x.dtype)
    y = attn(x, cos, sin, attention_mask(5, 5, attn.window, True, x.device))
    torch.testing.assert_close(y, attn.o_proj.bias.expand_as(y))


def test_activation_checkpointing_gives_identical_loss_and_grads():
    cfg = tiny_gpt_oss(n_layer=3, router_z_loss_weight=0.01)
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    results = []
    for ckpt in (None, functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)):
        model = build(cfg).train()
        model.checkpoint_fn = ckpt
        _, loss, aux = model(x, x)
        (loss + aux).backward()
        results.append((loss + aux, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_fn_is_called_per_block_only_in_training():
    cfg = tiny_gpt_oss(n_layer=2)
    model = build(cfg)
    calls = []

    def spy(block, *args):
        calls.append(all(a is None or isinstance(a, torch.Tensor) for a in args))
        return block(*args)

    model.checkpoint_fn = spy
    x = torch.randint(0, cfg.vocab_size, (1, 10))
    model(x)
    assert calls == []
    model.train()
    model(x)
    assert calls == [True, True]


def test_dense_gpt2_forward_backward():
    cfg = get_preset("gpt2-dense", n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=32)
    model = build(cfg).train()
    assert all(isinstance(b.ffn, MLP) for b in model.blocks)
    assert model.lm_head.weight is model.embed_tokens.weight and model.pos_embed is not None
    x = torch.randint(0, 100, (2, 32))
    logits, loss, aux = model(x, x)
    assert aux.shape == () and aux.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert loss.item() == pytest.approx(torch.log(torch.tensor(100.0)).item(), rel=0.1)  # ~uniform at init
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_mixed_dense_and_moe_blocks():
    cfg = get_preset(
        "moe-124m",
        n_layer=3,
        moe_layers=[1],
        n_embd=32,
        n_head=4,
        vocab_size=50,
        intermediate_size=48,
        dense_intermediate_size=80,
    )
    model = build(cfg)
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [MLP, MoE, MLP]
    assert model.blocks[0].ffn.down_proj.in_features == 80
    _, _, aux = model(torch.randint(0, 50, (1, 8)))
    torch.testing.assert_close(aux, cfg.aux_loss_weight * model.blocks[1].ffn.last_stats.load_balance_loss)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.9)])
def test_generation_with_and_without_cache_is_identical(sampling):
    cfg = tiny_gpt_oss(sliding_window=8, n_layer=2)  # 30 new tokens run well past the window
    model = build(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outs.append(model.generate(prompt, 30, use_cache=use_cache, **sampling))
    assert outs[0].shape == (2, 35)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], prompt)


def test_cached_decode_matches_full_forward_logits():
    cfg = tiny_gpt_oss(sliding_window=4)
    model = build(cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 15))
    full = model.lm_head(model._trunk(x, None)[0])
    cache = model.new_cache(1, 15, x.device)
    prefill = model.lm_head(model._trunk(x[:, :6], cache)[0])
    steps = [model.lm_head(model._trunk(x[:, t : t + 1], cache)[0]) for t in range(6, 15)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [True, False])
def test_left_padded_cached_decode_matches_each_row_alone(sinks):
    # Rows of 3, 7 and 10 prompt tokens left-padded to 10, then 12 decoding steps through the
    # model's own forward: each row's last-position logits equal a full forward of that row alone
    # (fp32, 1e-5), past the sliding window of 4 and with padding that is longer than the window.
    cfg = tiny_gpt_oss(sliding_window=4, use_attention_sinks=sinks)
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, cfg.vocab_size, (n + 12,), generator=gen) for n in (3, 7, 10)]
    lengths = torch.tensor([3, 7, 10])
    pad_B = 10 - lengths
    prompt_BT = torch.zeros(3, 10, dtype=torch.long)  # the pad id is arbitrary: padding is masked
    for b, row in enumerate(rows):
        prompt_BT[b, pad_B[b]:] = row[: lengths[b]]
    cache = model.new_cache(3, 22, "cpu", pad_B=pad_B)
    got = [model(prompt_BT, cache=cache)[0][:, 0]]  # [B, V] at each row's last prompt token
    for t in range(12):
        step_B1 = torch.stack([row[lengths[b] + t] for b, row in enumerate(rows)])[:, None]
        got.append(model(step_B1, cache=cache)[0][:, 0])
    for b, row in enumerate(rows):
        full_TV = model(row[None])[0][0]
        want = full_TV[lengths[b] - 1 : lengths[b] + 12]  # [13, V]
        torch.testing.assert_close(torch.stack([g[b] for g in got]), want, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_eos():
    cfg = tiny_gpt_oss()
    model = build(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    greedy = model.generate(prompt, 6, temperature=0.0)
    eos = int(greedy[0, 6])  # the third generated token
    out = model.generate(prompt, 6, temperature=0.0, eos_id=eos)
    assert out.shape[1] < 10 and out[0, -1] == eos
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.generate(prompt, cfg.block_size)


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = GPTOSS(get_preset("gpt-oss-120b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.get_num_params(non_embedding=False) > 116e9
