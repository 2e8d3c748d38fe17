"""The loader contract: windows over shuffled documents, determinism, blending, resume."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from pipeline.data import (
    MicroBatchIterator,
    MMapIndexedDataset,
    build_dataset,
    check_vocab_compatible,
    load_manifest,
)
from pipeline.data.blending import integer_weights
from pipeline.data.indexed import IndexedDatasetWriter, encode_index
from pipeline.errors import DataError
from tests.data.reader_util import read_split

SEQ = 64


def _docs_as_tuples(data_dir, split):
    return sorted(tuple(s.tolist()) for s in read_split(data_dir, split))


def test_epoch_is_windows_over_a_permutation_of_all_documents(prepared):
    d0, _ = prepared
    ds = build_dataset([d0], "train", SEQ, seed=3)
    m = load_manifest(d0)
    n = len(ds)
    assert n == ds.samples_per_epoch == (m.splits["train"].tokens - 1) // SEQ
    eos = m.eos_id
    streams = []
    for epoch in range(2):
        samples = [ds[epoch * n + j] for j in range(n)]
        assert all(s.dtype == np.int64 and s.shape == (SEQ + 1,) for s in samples)
        # Undo the window shuffle: window w must continue exactly where window w-1 stopped.
        order = ds.window_order(epoch).array(np.arange(n))
        assert sorted(order.tolist()) == list(range(n))
        by_window = [None] * n
        for j, w in enumerate(order):
            by_window[w] = samples[j]
        for a, b in zip(by_window, by_window[1:], strict=False):
            assert a[-1] == b[0], "consecutive windows overlap by exactly the label token"
        stream = np.concatenate([w[:SEQ] for w in by_window] + [by_window[-1][SEQ:]])
        cut = np.flatnonzero(stream == eos)
        pieces = np.split(stream[: cut[-1] + 1], cut[:-1] + 1)
        full_docs = set(_docs_as_tuples(d0, "train"))
        assert all(tuple(p.tolist()) in full_docs for p in pieces[1:]), "whole documents, in some order"
        assert len(pieces) >= len(full_docs) - 3  # only the tail beyond the last window is cut
        streams.append(stream)
    # A new epoch reshuffles documents (different windows), not just the window order.
    assert not np.array_equal(streams[0], streams[1])


def test_same_seed_same_samples_different_seed_different(prepared):
    d0, d1 = prepared
    a = build_dataset([d0, d1], "train", SEQ, seed=7)
    b = build_dataset([d0, d1], "train", SEQ, seed=7)
    c = build_dataset([d0, d1], "train", SEQ, seed=8)
    idx = [0, 1, 5, len(a) - 1, len(a), 3 * len(a) + 11]
    assert all(np.array_equal(a[i], b[i]) for i in idx)
    assert not all(np.array_equal(a[i], c[i]) for i in idx)
    v = build_dataset([d0], "valid", 16, seed=7)
    assert len(v) > 0 and v[0].shape == (17,)


@pytest.mark.parametrize("weights", [(0.3, 0.7), (1, 2, 3), (0.5, 0.25, 0.25), (0.123, 0.877)])
def test_blend_proportions_exact_over_every_window(prepared, weights):
    d0, d1 = prepared
    sources = [(w, [d0, d1][i % 2]) for i, w in enumerate(weights)]
    bl = build_dataset(sources, "train", SEQ, seed=1)
    share = np.array(weights, dtype=float) / sum(weights)
    total = 20_000
    comp = np.array([bl.locate(i)[0] for i in range(total)])
    for c in range(len(weights)):
        prefix = np.concatenate([[0], np.cumsum(comp == c)])
        for window in (1, 7, 10, 100, 1000):
            counts = prefix[window:] - prefix[:-window]  # every window start, vectorised
            assert np.abs(counts - share[c] * window).max() < 2, (weights, c, window)
        assert abs(prefix[-1] - share[c] * total) < 1
    # Each component's samples are its own stream in order: local indices 0, 1, 2, ...
    for c in range(len(weights)):
        local = [bl.locate(i)[1] for i in np.flatnonzero(comp == c)[:500]]
        assert local == list(range(len(local)))
        first = int(np.flatnonzero(comp == c)[3])
        assert np.array_equal(bl[first], bl.datasets[c][3])
    assert integer_weights([0.3, 0.7]).tolist() == [3, 7]


def test_resume_at_another_world_size_continues_the_global_stream(prepared):
    d0, d1 = prepared
    ds = build_dataset([(0.4, d0), (0.6, d1)], "train", SEQ, seed=5)
    mbs = 2

    def step(world, consumed):
        """One global step at `world` ranks: the ranks' micro-batches in rank order."""
        its = [MicroBatchIterator(ds, mbs, r, world, consumed) for r in range(world)]
        batches = [it.next() for it in its]
        assert len({it.consumed_samples for it in its}) == 1
        return torch.cat(batches), its[0].consumed_samples

    reference, consumed = [], 0
    for _ in range(20):  # uninterrupted world-1 run: 40 samples
        b, consumed = step(1, consumed)
        reference.append(b)
    reference = torch.cat(reference)
    assert reference.dtype == torch.int64 and reference.shape == (40, SEQ + 1)

    resumed, consumed = [], 0
    for _ in range(3):  # world 4: 3 steps x 8 samples
        b, consumed = step(4, consumed)
        resumed.append(b)
    assert consumed == 24
    for _ in range(4):  # "checkpoint" = consumed_samples; continue at world 2
        b, consumed = step(2, consumed)
        resumed.append(b)
    assert torch.equal(torch.cat(resumed), reference)
    it = MicroBatchIterator(ds, mbs, 1, 2, consumed_samples=6)
    assert list(it.global_indices()) == [8, 9] and it.consumed_samples == 6


def test_check_vocab_compatible(prepared, big_vocab_tokenizer, tmp_path):
    from pipeline.data.prepare import PrepareOptions, prepare

    d0, d1 = prepared
    vocab = load_manifest(d0).vocab_size
    check_vocab_compatible([d0, d1], vocab)
    check_vocab_compatible([d0], vocab + 100)  # a padded embedding table is fine
    with pytest.raises(DataError) as e:
        check_vocab_compatible([d0], vocab - 1)
    assert str(d0) in str(e.value) and f"model.vocab_size={vocab}" in str(e.value)
    assert f"vocab size {vocab}" in str(e.value) and f"vocab_size is {vocab - 1}" in str(e.value)
    inp = tmp_path / "w.txt"
    inp.write_text("w1 w2 w70000\n")
    other = tmp_path / "other"
    prepare(
        PrepareOptions(
            inputs=[str(inp)],
            output=other,
            tokenizer=str(big_vocab_tokenizer),
            eos_token="</s>",
            progress=False,
        )
    )
    with pytest.raises(DataError, match="different tokenizers") as e:
        check_vocab_compatible([d0, other], 100_000)
    assert str(d0) in str(e.value) and str(other) in str(e.value)
    with pytest.raises(DataError, match="different tokenizers"):
        build_dataset([d0, other], "train", 4, seed=0)


def test_megatron_prefix_with_multi_sequence_documents(tmp_path):
    """A foreign .bin/.idx (several sequences per document, int32) works as a source."""
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    doc_idx = [0, 2, 4, 5]  # docs: seq 0-1, seq 2-3, seq 4
    sizes = np.array([len(s) for s in seqs], np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1]) * 4]).astype(np.int64)
    prefix = tmp_path / "foreign"
    (tmp_path / "foreign.bin").write_bytes(np.array(sum(seqs, []), np.int32).tobytes())
    (tmp_path / "foreign.idx").write_bytes(
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 4, len(seqs), len(doc_idx))
        + sizes.tobytes()
        + pointers.tobytes()
        + np.array(doc_idx, np.int64).tobytes()
    )
    mm = MMapIndexedDataset(prefix)
    assert mm.dtype == np.int32 and mm[2].tolist() == [10, 11, 12, 13] and mm.num_documents == 3
    starts, lengths = mm.document_token_ranges()
    assert starts.tolist() == [0, 5, 10] and lengths.tolist() == [5, 5, 2]
    ds = build_dataset([str(prefix) + ".bin"], "train", 3, seed=0)
    assert len(ds) == 3
    windows = sorted(tuple(ds[i].tolist()) for i in range(3))
    stream = sum((list(range(5 + s, 5 + s + n)) for s, n in [(0, 5), (5, 5), (10, 2)]), [])
    assert all(len(w) == 4 and set(w) <= set(stream) for w in windows)


def test_streamed_writer_output_and_temporaries(tmp_path):
    """The streamed .bin/.idx pair is the documents back to back plus `encode_index` of their sizes,
    under its final names only once finalized; leftovers of a killed writer and aborts leave nothing."""
    prefix = tmp_path / "train_00000"
    (tmp_path / "train_00000.bin.tmp").write_bytes(b"killed writer")
    (tmp_path / "train_00000.idx.tmp").write_bytes(b"killed writer")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_documents(np.array([5, 6, 7, 8, 9]), np.array([3, 2]))
    w.add_documents(np.array([10]), np.array([1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin.tmp"]
    info = w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin", "train_00000.idx"]
    assert (tmp_path / "train_00000.bin").read_bytes() == np.arange(5, 11, dtype=np.uint16).tobytes()
    index = encode_index(np.uint16, np.array([3, 2, 1]))
    assert (tmp_path / "train_00000.idx").read_bytes() == index
    assert info["idx_sha256"] == hashlib.sha256(index).hexdigest() and (info["documents"], info["tokens"]) == (3, 6)
    assert info["bin_sha256"] == hashlib.sha256(np.arange(5, 11, dtype=np.uint16).tobytes()).hexdigest()
    assert MMapIndexedDataset(prefix)[1].tolist() == [8, 9]

    w = IndexedDatasetWriter(tmp_path / "valid_00000", np.uint16)
    w.add_documents(np.array([1, 2]), np.array([2]))
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_00000.bin", "train_00000.idx"]


def test_dataset_errors_are_clear(prepared, tmp_path):
    d0, _ = prepared
    with pytest.raises(DataError, match="too few for one sample"):
        build_dataset([d0], "valid", 10**7, seed=0)
    with pytest.raises(DataError, match="no manifest.json"):
        build_dataset([tmp_path], "train", 8, seed=0)
    with pytest.raises(DataError, match="has no split 'test'"):
        build_dataset([d0], "test", 8, seed=0)
