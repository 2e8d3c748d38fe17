"""FlexAttention vs the SDPA reference, sinks from the lse, document masking, backend selection.

CPU runs FlexAttention's eager forward only (torch 2.13 has no CPU backward), so forward
equivalence is tested here and forward + backward on CUDA (`gpu` marker).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from pipeline.errors import ConfigError
from pipeline.model import GPTOSS
from pipeline.model.attention import sdpa_attention_with_sinks
from pipeline.model.flex_attention import apply_sinks, flex_attention_with_sinks, resolve_attention_backend
from pipeline.model.masks import attention_mask, block_mask, document_ids, document_positions
from tests.model.utils import randomize_, tiny_gpt_oss

EOS = 3


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize_(GPTOSS(cfg), seed).eval()


def packed_ids(lengths_per_row, vocab, seed=0):
    """[B, T] rows of documents with the given lengths, each ending in EOS (the last may be cut)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        parts = []
        for n in lengths:
            doc = torch.randint(EOS + 1, vocab, (n,), generator=gen)
            doc[-1] = EOS
            parts.append(doc)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_document_ids_and_positions_restart_after_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 5, 5, 5, 5, 5, 5, EOS]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(document_ids(ids, EOS)).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


@torch.no_grad()
def test_flex_forward_equals_sdpa_full_sliding_gqa_documents():
    # 2 layers: sliding (window 40 spans block boundaries at T=200) then full; GQA 4 q / 2 kv heads;
    # T = 200 and 77 are not multiples of the 128 block size.
    base = tiny_gpt_oss(block_size=256, sliding_window=40, eos_token_id=EOS, attention_backend="sdpa")
    assert base.kv_heads < base.n_head and base.use_attention_sinks
    for document_masking in (False, True):
        cfg = base.replace(document_masking=document_masking)
        sdpa = build(cfg)
        flex = build(cfg.replace(attention_backend="flex"))
        assert all(isinstance(m, BlockMask) for m in flex._masks(77, 0, torch.device("cpu"), None).values())
        for lengths in ([[60, 90, 50], [200]], [[30, 47]]):
            ids = packed_ids(lengths, cfg.vocab_size)
            ref = sdpa(ids)[0]
            out = flex(ids)[0]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_layer_equals_sdpa_with_tiny_window_and_documents():
    """Attention alone, window (5) much smaller than a block: only the block-sparse mask differs."""
    torch.manual_seed(0)
    B, H, G, T, d = 2, 4, 2, 150, 16
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, G, T, d), torch.randn(B, G, T, d)
    sinks = torch.randn(H)
    doc = torch.cat([torch.zeros(B, 70, dtype=torch.long), torch.ones(B, 80, dtype=torch.long)], dim=1)
    for window, doc_BT in ((5, None), (5, doc), (None, doc)):
        ref = sdpa_attention_with_sinks(q, k, v, attention_mask(T, T, window, True, q.device, doc_BT), sinks, d**-0.5)
        out = flex_attention_with_sinks(q, k, v, block_mask(window, T, q.device, doc_BT), sinks, d**-0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def reference_attention_with_lse(q, k, v, mask_TS):
    """Plain differentiable attention (GQA by repetition) returning out [B, H, T, d] and lse [B, H, T]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask_TS, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


def test_sinks_from_lse_have_the_virtual_sink_gradients():
    torch.manual_seed(0)
    B, H, G, T, d = 2, 4, 2, 23, 8
    leaves = [torch.randn(B, H, T, d), torch.randn(B, G, T, d), torch.randn(B, G, T, d), torch.randn(H)]
    leaves = [t.requires_grad_() for t in leaves]
    upstream = torch.randn(B, H, T, d)
    mask = attention_mask(T, T, 7, False, torch.device("cpu"))  # sliding: exercises masked rows of the lse

    def grads(fn):
        out = fn(*leaves)
        return [out, *torch.autograd.grad((out * upstream).sum(), leaves)]

    def via_lse(q, k, v, sinks):
        out, lse = reference_attention_with_lse(q, k, v, mask)
        return apply_sinks(out, lse, sinks)

    def virtual_sink(q, k, v, sinks):
        return sdpa_attention_with_sinks(q, k, v, attention_mask(T, T, 7, True, q.device), sinks, d**-0.5)

    for got, want in zip(grads(via_lse), grads(virtual_sink), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_document_masking_each_document_equals_the_document_alone(backend):
    cfg = tiny_gpt_oss(block_size=128, sliding_window=6, eos_token_id=EOS, document_masking=True)
    model = build(cfg.replace(attention_backend=backend))
    lengths = [[9, 20, 14, 21], [30, 34]]
    ids = packed_ids(lengths, cfg.vocab_size, seed=1)
    with torch.no_grad():
        packed = model(ids)[0]
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n])[0][0]
                torch.testing.assert_close(packed[b, start : start + n], alone, rtol=1e-5, atol=1e-5)
                start += n
    # Without document masking, later documents do see earlier ones.
    mixed = build(cfg.replace(attention_backend=backend, document_masking=False))
    with torch.no_grad():
        assert not torch.allclose(mixed(ids)[0][0, 9:29], mixed(ids[:1, 9:29])[0][0], atol=1e-3)
    if backend == "sdpa":  # trains on CPU: the packed loss's gradients reach every document
        model.train()
        targets = torch.roll(ids, -1, dims=1)
        loss = model(ids, targets, return_logits=False)[1]
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cached_generation_with_flex_backend_matches_sdpa():
    # document_masking applies to forward only: generation treats the prompt (EOS inside) as one sequence.
    cfg = tiny_gpt_oss(sliding_window=4, attention_backend="flex", eos_token_id=EOS, document_masking=True)
    flex = build(cfg)
    sdpa = build(cfg.replace(attention_backend="sdpa"))
    prompt = torch.randint(EOS + 1, cfg.vocab_size, (2, 7))
    prompt[:, 3] = EOS
    # Prefill runs FlexAttention, each decoding step SDPA over the cache.
    out = flex.generate(prompt, 9, temperature=0.0)
    assert torch.equal(out, sdpa.generate(prompt, 9, temperature=0.0))
    assert torch.equal(out, flex.generate(prompt, 9, temperature=0.0, use_cache=False))


def test_backend_resolution_and_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_backend("auto", cpu, True, 0.0) == "sdpa"
    assert resolve_attention_backend("auto", cuda, True, 0.0) == "flex"
    assert resolve_attention_backend("auto", cuda, True, 0.1) == "sdpa"  # flex has no attention dropout
    assert resolve_attention_backend("flex", cpu, False, 0.0) == "flex"  # eager forward
    model = build(tiny_gpt_oss(attention_backend="flex")).train()
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(ConfigError, match="attention_backend='flex' cannot train on CPU.*auto"):
        model(ids, ids)
    with pytest.raises(ConfigError, match="attention_backend"):
        tiny_gpt_oss(attention_backend="flash")
    with pytest.raises(ConfigError, match="dropout"):
        tiny_gpt_oss(attention_backend="flex", dropout=0.1)
    with pytest.raises(ConfigError, match="eos_token_id"):
        tiny_gpt_oss(document_masking=True, eos_token_id=None)


# --- CUDA --------------------------------------------------------------------------------------------


def _cuda_pair(**overrides):
    cfg = tiny_gpt_oss(block_size=512, sliding_window=128, n_embd=256, n_head=4, n_kv_head=2, head_dim=64)
    cfg = cfg.replace(eos_token_id=EOS, **overrides)
    models = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        models.append(randomize_(GPTOSS(cfg.replace(attention_backend=backend))).cuda().to(torch.bfloat16).train())
    return cfg, models


@pytest.mark.gpu
@pytest.mark.parametrize("document_masking", [False, True])
def test_gpu_flex_forward_backward_equals_sdpa_bf16(document_masking):
    cfg, (sdpa, flex) = _cuda_pair(document_masking=document_masking)
    ids = packed_ids([[100, 200, 150], [450]], cfg.vocab_size).cuda()
    targets = torch.roll(ids, -1, dims=1)
    losses = []
    for model in (sdpa, flex):
        loss = model(ids, targets, return_logits=False)[1]
        loss.backward()
        losses.append(loss.detach().float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters(), strict=True):
        rel = (a.grad.float() - b.grad.float()).norm() / a.grad.float().norm().clamp(min=1e-6)
        assert rel < 5e-2, name


@pytest.mark.gpu
def test_gpu_training_step_never_reaches_the_sdpa_math_kernel():
    import functools

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, (_, flex) = _cuda_pair()
    flex.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    assert flex.attention_backend(torch.device("cuda")) == "flex"
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss = flex(ids, torch.roll(ids, -1, dims=1), return_logits=False)[1]
        loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in flex.parameters())
    # Activation checkpointing recomputes the same values: the gradients match the run without it up
    # to the atomics' summation order in CUDA backward kernels (index_add_, FlexAttention's dQ).
    grads = [p.grad.float().clone() for p in flex.parameters()]
    flex.zero_grad()
    flex.checkpoint_fn = None
    flex(ids, torch.roll(ids, -1, dims=1), return_logits=False)[1].backward()
    for (name, p), g in zip(flex.named_parameters(), grads, strict=True):
        assert (p.grad.float() - g).norm() <= 1e-2 * g.norm() + 1e-6, name


def test_sdpa_reference_matches_plain_softmax_with_sinks():
    """The reference itself: transformers' softmax([logits, sink])[..., :-1] on one small case."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    sinks = torch.randn(2)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    full = torch.cat([scores, sinks.view(1, 2, 1, 1).expand(1, 2, 5, 1)], dim=-1)
    want = F.softmax(full, dim=-1)[..., :-1] @ v
    got = sdpa_attention_with_sinks(q, k, v, attention_mask(5, 5, None, True, q.device), sinks, 0.5)
    torch.testing.assert_close(got, want)
