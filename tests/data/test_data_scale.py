"""The O(shards) loader: keyed permutations, document mixing, bounded state and descriptors, read-ahead."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.data import MicroBatchIterator, build_dataset
from pipeline.data.dataset import BLOCK_DOCS, ORDER_SCHEME, GPTDataset
from pipeline.data.identity import identity_change, resume_order
from pipeline.data.indexed import encode_index, read_index_header
from pipeline.data.legacy_order import LEGACY_ORDER
from pipeline.data.permutation import FeistelPermutation
from pipeline.data.shard_cache import ShardCache
from pipeline.errors import ConfigError, DataError
from tests.conftest import REPO_ROOT

EOS = 0


def write_shard(prefix, docs: list[np.ndarray]) -> None:
    """A real MMIDIDX int32 shard holding `docs` (each already ending in EOS)."""
    prefix.with_suffix(".bin").write_bytes(np.concatenate(docs).astype(np.int32).tobytes())
    prefix.with_suffix(".idx").write_bytes(encode_index(np.int32, np.array([len(d) for d in docs])))


def doc_of(d: int, length: int) -> np.ndarray:
    """Document d: its id + 1 repeated, then EOS (so every token names its document)."""
    return np.concatenate([np.full(length - 1, d + 1), [EOS]])


def whole_documents(stream: np.ndarray) -> list[int]:
    """Document ids of the complete documents in a token stream (the first piece may be a tail)."""
    cut = np.flatnonzero(stream == EOS)
    pieces = np.split(stream[: cut[-1] + 1], cut[:-1] + 1)[1:]
    return [int(p[0]) - 1 for p in pieces if len(p) > 1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_feistel_is_a_keyed_bijection(n):
    a = FeistelPermutation(n, key=1).array(np.arange(n))
    assert sorted(a.tolist()) == list(range(n))
    assert [FeistelPermutation(n, key=1)[i] for i in range(min(n, 50))] == a[:50].tolist()
    if n >= 64:  # another key, another order; and not close to the identity
        assert not np.array_equal(a, FeistelPermutation(n, key=2).array(np.arange(n)))
        assert np.mean(a == np.arange(n)) < 0.1


def test_documents_are_mixed_every_epoch_and_state_does_not_grow_with_documents(tmp_path):
    """Three shards of 2.5 blocks each: every epoch reads every document once, whole; the documents
    next to each other in a sample are rarely neighbours in the file; no array grows with documents."""
    rng = np.random.default_rng(0)
    n_per_shard, docs, shards = BLOCK_DOCS * 5 // 2, 0, []
    for s in range(3):
        lengths = rng.integers(2, 12, n_per_shard)
        write_shard(tmp_path / f"s{s}", [doc_of(docs + i, int(n)) for i, n in enumerate(lengths)])
        docs += n_per_shard
        shards.append(read_index_header(tmp_path / f"s{s}"))
    ds = GPTDataset(shards, seq_len=32, seed=11)
    n = len(ds)
    assert n == (ds.num_tokens - 1) // 32
    per_epoch = []
    for epoch in range(2):
        order = ds.window_order(epoch).array(np.arange(n))
        by_window = [None] * n
        for j, w in enumerate(order):
            by_window[w] = ds[epoch * n + j]
        stream = np.concatenate([w[:32] for w in by_window] + [by_window[-1][32:]])
        seen = whole_documents(stream)
        # All but the first (treated as a tail) and those in the < 32 tokens after the last window.
        assert len(seen) == len(set(seen)) >= docs - 1 - 16, "every document once, whole, per epoch"
        pairs = np.array(seen)
        neighbours = np.mean(np.diff(pairs) == 1)
        assert neighbours < 0.01, f"{neighbours:.3f} of consecutive documents are file neighbours"
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1], "a fresh document order each epoch"
    # The dataset's own arrays hold one entry per shard; cached blocks are bounded.
    arrays = [v for v in vars(ds).values() if isinstance(v, np.ndarray)]
    assert sum(a.size for a in arrays) == len(shards) + 1
    assert len(ds._blocks) <= ds._block_cache and len(ds.cache) <= ds.cache.max_shards


def test_a_checkpoint_without_an_order_resumes_in_the_legacy_order(tmp_path):
    """A checkpoint written before this loader stored no order: its run goes on in the legacy order,
    and comparing it with the new order is a change (what check_resume would refuse)."""
    new = {"order": ORDER_SCHEME, "sources": [{"path": "d", "weight": None, "shards": {"a.bin": "x"}}]}
    old = {"sources": new["sources"]}  # what data_identity wrote before the order was recorded
    assert resume_order(None, None) == (ORDER_SCHEME, [])  # a new run
    assert resume_order(new, tmp_path) == (ORDER_SCHEME, [])
    for saved in (old, None):  # no order recorded; no data identity at all (older still)
        order, [note] = resume_order(saved, tmp_path)
        assert order == LEGACY_ORDER and note.startswith(f"{tmp_path} was started in the sample order {LEGACY_ORDER}")
    assert identity_change(old, {**new, "order": LEGACY_ORDER}) is None
    change = identity_change(old, new)
    assert change == (f"its samples were drawn in another order ({LEGACY_ORDER}; now {ORDER_SCHEME}): the same "
                      "data would be read in a different sequence from here on")
    # The settings the sample map is built from: a change is named; not recorded (older) is no change.
    assert identity_change({**new, "seed": 1}, {**new, "seed": 2}).startswith("data.seed was 1, now 2 (")
    assert identity_change({**new, "seq_len": 64}, {**new, "seq_len": 32}).startswith("data.seq_len was 64, now 32")
    assert identity_change(new, {**new, "seq_len": 32, "seed": 2}) is None
    with pytest.raises(ConfigError, match="unknown sample order 'x/v9'"):
        build_dataset([tmp_path / "none"], "train", 8, 0, order="x/v9")


def test_shard_cache_bounds_open_shards_and_reads_stay_exact(tmp_path):
    shards = []
    for s in range(12):
        write_shard(tmp_path / f"s{s:02d}", [doc_of(100 * s + i, 5) for i in range(3)])
        shards.append(read_index_header(tmp_path / f"s{s:02d}"))
    cache = ShardCache(max_open_files=4)
    ds = GPTDataset(shards, seq_len=4, seed=0, cache=cache)
    ref = GPTDataset(shards, seq_len=4, seed=0, cache=ShardCache(10_000))
    for i in range(3 * len(ds)):
        assert np.array_equal(ds[i], ref[i])
        assert len(cache) <= 2
    assert cache.opened > 12  # shards were closed and reopened
    with pytest.raises(ConfigError, match="data.max_open_files must be >= 2"):
        ShardCache(1)


def test_thousands_of_shards_read_under_ulimit_1024(tmp_path):
    """1500 shards (3000 files) read through the default cap in a process limited to 1024 descriptors,
    every token of every shard but the last (cut by the last window) read; opening every shard at
    once (the old loader) fails there."""
    script = textwrap.dedent(f"""
        import os, resource, sys
        import numpy as np
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pipeline.data.dataset import GPTDataset
        from pipeline.data.indexed import MMapIndexedDataset, encode_index, read_index_header
        from pipeline.errors import DataError
        root = {str(tmp_path)!r}
        for s in range(1500):
            p = f"{{root}}/s{{s:04d}}"
            np.arange(s * 7 + 1, s * 7 + 8, dtype=np.int32).tofile(p + ".bin")
            open(p + ".idx", "wb").write(encode_index(np.int32, np.array([3, 4])))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        ds = GPTDataset([read_index_header(f"{{root}}/s{{s:04d}}") for s in range(1500)], seq_len=6, seed=0)
        seen = np.zeros(1500 * 7 + 1, dtype=bool)
        most = 0
        for i in range(len(ds)):
            seen[ds[i]] = True
            most = max(most, len(os.listdir("/proc/self/fd")))
        print("fds", most, "all", bool(seen[1:1499 * 7 + 1].all()))
        try:
            opened = [MMapIndexedDataset(f"{{root}}/s{{s:04d}}") for s in range(1500)]
            print("old: opened all")
        except (OSError, DataError) as e:
            print("old:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, fds, _, all_read = proc.stdout.split("\n")[0].split()
    assert int(fds) < 256 + 32 and all_read == "True", proc.stdout
    assert "Too many open files" in proc.stdout, proc.stdout


class _Failing:
    """A dataset whose sample 5 is unreadable (the dataset, not the thread, raises)."""

    samples_per_epoch = 100

    def __getitem__(self, i):
        if i == 5:
            raise DataError("s.bin: sequence 5 holds token id 9999: the shard is corrupt")
        return np.full(3, i, dtype=np.int64)


def test_read_ahead_gives_the_same_batches_and_the_error_at_its_step(tmp_path):
    write_shard(tmp_path / "one", [doc_of(i, 7) for i in range(50)])
    ds = build_dataset([tmp_path / "one.bin"], "train", 8, seed=1)
    plain = MicroBatchIterator(ds, 2, 1, 2, consumed_samples=4)
    ahead = MicroBatchIterator(ds, 2, 1, 2, consumed_samples=4, prefetch=3)
    for _ in range(10):
        assert np.array_equal(plain.next().numpy(), ahead.next().numpy())
    assert ahead.consumed_samples == plain.consumed_samples == 44  # what was read ahead is not counted
    assert ahead.wait_seconds >= 0 and ahead.take_wait_seconds() >= 0 and ahead.wait_seconds == 0
    ahead.close()
    assert not ahead._thread.is_alive()

    it = MicroBatchIterator(_Failing(), 2, 0, 1, prefetch=2)
    assert it.next().tolist() == [[0] * 3, [1] * 3] and it.next()[1].tolist() == [3] * 3
    with pytest.raises(DataError, match=r"^s.bin: sequence 5 holds token id 9999"):
        it.next()  # samples 4, 5: the batch holding the bad sample raises, at its step
    assert not it._thread.is_alive()
