"""The chunked linear + cross-entropy equals the plain one in value and gradients (fp32)."""

import torch
import torch.nn.functional as F

from pipeline.model import GPTOSS
from pipeline.model.loss import default_chunk_rows, linear_cross_entropy
from pipeline.train.objective import compute_loss
from tests.model.utils import randomize_, tiny_gpt_oss


def test_chunked_loss_equals_plain_loss_and_gradients():
    torch.manual_seed(0)
    N, D, V = 37, 16, 50
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[0, 5, 36]] = -100  # ignored rows, one of them in the last (short) chunk
    want = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    want_grads = torch.autograd.grad(want * 3.0, (h, w))  # a non-unit upstream gradient
    for chunk_rows in (1, 8, 36, 37, 1000):  # chunks that do and do not divide N
        got = linear_cross_entropy(h, w, targets, chunk_rows)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for g, e in zip(torch.autograd.grad(got * 3.0, (h, w)), want_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient work without autograd
        torch.testing.assert_close(linear_cross_entropy(h, w, targets, 8), want)
    assert default_chunk_rows(201088) == 640 and default_chunk_rows(128) > 10**5


def test_model_loss_without_logits_equals_plain_loss_and_grads():
    # Tied embeddings: the head's weight gradient adds to the embedding's.
    cfg = tiny_gpt_oss(tie_word_embeddings=True)
    torch.manual_seed(0)
    plain = randomize_(GPTOSS(cfg))
    chunked = randomize_(GPTOSS(cfg))
    chunked.load_state_dict(plain.state_dict())
    chunked.lm_head.chunk_rows = 7  # several chunks for 2 x 16 tokens
    batch = torch.randint(0, cfg.vocab_size, (2, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, want, aux = plain(inputs, targets)
    (want + aux).backward()
    parts = compute_loss(chunked, batch)  # the trainer's path: return_logits=False
    assert chunked(inputs, targets, return_logits=False)[0] is None
    parts.total.backward()
    torch.testing.assert_close(parts.lm, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.router, aux)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
