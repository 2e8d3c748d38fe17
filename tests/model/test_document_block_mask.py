"""The document BlockMask built from block corners (`document_block_mask`) is the BlockMask
`create_block_mask` builds from the T x T predicate, tensor for tensor."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from pipeline.model.masks import _mask_mod, document_block_mask, document_ids

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _docs(lengths_per_sample: list[list[int]]) -> torch.Tensor:
    """doc ids [B, T] from document lengths per sample (each sample sums to the same T)."""
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_sample]
    return torch.stack(rows)


def _random_docs(B: int, T: int, n_eos: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (B, T), generator=g)
    ids[:, torch.randint(0, T, (n_eos,), generator=g)] = 3
    return document_ids(ids, 3)


CASES = {
    "random_4k": _random_docs(1, 4096, 16, 0),
    "random_odd_length": _random_docs(3, 450, 5, 1),
    "many_tiny_docs": _random_docs(1, 700, 300, 2),
    "one_document": torch.zeros(2, 300, dtype=torch.long),
    "boundaries_on_blocks": _docs([[128, 256, 128], [384, 128]]),
    "boundaries_off_by_one": _docs([[127, 129, 1, 255], [129, 383]]),
    "shorter_than_a_block": _docs([[40, 60], [100]]),
}


@pytest.mark.parametrize("window", [None, 128, 32, 200, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_document_block_mask_equals_create_block_mask(case, window):
    doc = CASES[case]
    B, T = doc.shape
    ref = create_block_mask(_mask_mod(window, doc), B, None, T, T, device="cpu")
    got = document_block_mask(window, doc)
    assert got.seq_lengths == ref.seq_lengths and got.BLOCK_SIZE == ref.BLOCK_SIZE
    assert got.shape == ref.shape
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=0, atol=0, msg=field)
    # Partial blocks apply the element-level predicate: the same one.
    assert got.mask_mod.__code__ is ref.mask_mod.__code__


@pytest.mark.parametrize("window", [None, 128, 50])
@pytest.mark.parametrize("length", [300, 512, 1000])
def test_static_block_mask_equals_create_block_mask(window, length):
    """Causal and sliding masks are built from block corners too (no T x T tensor at long context)."""
    from pipeline.model.masks import block_mask

    ref = create_block_mask(_mask_mod(window, None), None, None, length, length, device="cpu")
    got = block_mask(window, length, "cpu")
    assert got.shape == ref.shape and got.seq_lengths == ref.seq_lengths
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=0, atol=0, msg=field)
    assert got.mask_mod.__code__ is ref.mask_mod.__code__
