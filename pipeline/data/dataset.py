"""Training samples: fixed-length windows over a per-epoch document order, with per-rank state that
grows with the shard count only (a 15 T token corpus starts in seconds; see benchmarks/data_scale.py).

The epoch's token stream is the shards in order, each shard's documents in blocks of
`BLOCK_DOCS` consecutive documents, the documents of every block in a fresh seeded order per epoch.
The stream is cut into windows of `seq_len + 1` tokens (inputs and shifted labels, overlapping by
one token with the next window) and epoch e visits the windows in the order of a keyed Feistel
permutation (pipeline.data.permutation; key from seed, stream and e). Sample i is found by:
epoch and position from i; window from the permutation (O(1)); shard by bisection over the
shards' token counts (O(log shards)); block by bisection over the block starts in the memory-mapped
index (O(log blocks)); document by the block's cumulative lengths (O(BLOCK_DOCS), cached).

Why blocks: windows over an order of *all* documents need that order's cumulative lengths, an
array as long as the corpus (the old scheme: ~32 B per document plus 8 B per window per rank,
rebuilt every epoch). A block's order and cumulative lengths are computed from the block's own
index entries; its token span is known from the index without reading it, so the windows of the
epoch are fixed by the shard token counts alone. A sample therefore packs documents drawn at
random from a block of BLOCK_DOCS neighbours (not a run of neighbours: their order is shuffled),
and the samples of a batch come from shards all over the corpus (the window permutation).
Document boundaries come from the index, so packed samples keep their EOS separators exactly.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.indexed import IndexHeader, MMapIndexedDataset, idx_path, prefix_of, read_index_header
from pipeline.data.legacy_order import LEGACY_ORDER, LegacyGPTDataset
from pipeline.data.manifest import MANIFEST, Manifest, check_vocab_compatible, load_manifest
from pipeline.data.permutation import FeistelPermutation, derive_key
from pipeline.data.shard_cache import ShardCache
from pipeline.errors import ConfigError, DataError, rank_local

BLOCK_DOCS = 4096
# Stored in every checkpoint's data identity: a resume under another order is refused (identity.py).
ORDER_SCHEME = f"feistel-windows/doc-blocks-{BLOCK_DOCS}/v1"
_WINDOW_SALT = 0x5A3F
_BLOCK_SALT = 0xD0C5


class _Block:
    """One block's documents in this epoch's order: where each lies in .bin and where it starts in
    the block's stream."""

    __slots__ = ("doc", "start", "cum")

    def __init__(self, doc: np.ndarray, start: np.ndarray, cum: np.ndarray):
        self.doc = doc  # int64 [n]: document index in the shard, in this epoch's order
        self.start = start  # int64 [n]: first token of each (ordered) document in .bin
        self.cum = cum  # int64 [n + 1]: stream offset of each ordered document inside the block


class GPTDataset:
    """`ds[i]` -> int64 [seq_len + 1] for any i >= 0; epochs wrap with a new order each."""

    def __init__(
        self,
        shards: Sequence[IndexHeader],
        seq_len: int,
        seed: int,
        stream: int = 0,
        name: str = "",
        vocab_size: int | None = None,
        cache: ShardCache | None = None,
        block_cache: int = 8,
    ):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise ConfigError(f"data seed must be >= 0, got {seed}")
        self.shards = list(shards)
        self._prefix = [str(h.prefix) for h in self.shards]
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.stream = int(stream)
        self.name = name
        self.vocab_size = vocab_size  # ids must lie in [0, vocab_size): checked per read (corrupt bytes)
        self.cache = cache if cache is not None else ShardCache()
        # int64 [S + 1]: first stream token of each shard; the only per-shard array
        self.shard_start = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([h.tokens for h in self.shards], out=self.shard_start[1:])
        self.num_tokens = int(self.shard_start[-1])
        # The last window needs one extra token for its final label.
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // self.seq_len)
        if self.samples_per_epoch < 1:
            raise DataError(
                f"{name or 'dataset'} has {self.num_tokens} tokens: too few for one sample of "
                f"seq_len {seq_len} (+1 label token); use more data or a smaller seq_len"
            )
        self._orders: OrderedDict[int, FeistelPermutation] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int, int], _Block] = OrderedDict()
        self._block_cache = block_cache
        self._lock = threading.Lock()  # the read-ahead thread and an evaluation may read at once

    def __len__(self) -> int:
        return self.samples_per_epoch

    def window_order(self, epoch: int) -> FeistelPermutation:
        """Window visited at each position of `epoch` (a keyed permutation of [0, samples_per_epoch))."""
        with self._lock:
            perm = self._orders.get(epoch)
            if perm is None:
                perm = FeistelPermutation(self.samples_per_epoch,
                                          derive_key(self.seed, self.stream, epoch, _WINDOW_SALT))
                self._orders[epoch] = perm
                if len(self._orders) > 4:
                    self._orders.popitem(last=False)
            return perm

    def _block(self, epoch: int, k: int, b: int) -> _Block:
        key = (epoch, k, b)
        with self._lock:
            hit = self._blocks.get(key)
            if hit is not None:
                return hit
        shard = self.cache.get(self._prefix[k])
        item = shard.dtype.itemsize
        first = b * BLOCK_DOCS
        last = min(first + BLOCK_DOCS, self.shards[k].documents)
        seq = np.array(shard.doc_idx[first : last + 1])  # int64 [n + 1]; a copy: no view keeps the map open
        n_seq = len(shard.sizes)
        start = np.empty(len(seq), dtype=np.int64)  # first token of each document in .bin
        inside = seq < n_seq
        start[inside] = shard.pointers[seq[inside]] // item
        start[~inside] = self.shards[k].tokens
        length = np.diff(start)
        if int(length.sum()) != int(shard.sizes[seq[0] : seq[-1]].sum(dtype=np.int64)):
            raise rank_local(DataError(f"{shard.prefix}.idx: sequences of documents {first}..{last - 1} are not "
                                       "back to back in .bin; the index is corrupt (re-prepare the data)"))
        rng = np.random.default_rng(derive_key(self.seed, self.stream, epoch, k, b, _BLOCK_SALT))
        order = rng.permutation(len(length))
        cum = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(length[order], out=cum[1:])
        block = _Block(order + first, start[:-1][order], cum)
        with self._lock:
            self._blocks[key] = block
            if len(self._blocks) > self._block_cache:
                self._blocks.popitem(last=False)
        return block

    def _block_of(self, k: int, token: int) -> tuple[int, int]:
        """(block, its first token in .bin) of the block of shard k holding .bin token `token`."""
        shard = self.cache.get(self._prefix[k])
        n_blocks = -(-self.shards[k].documents // BLOCK_DOCS)
        n_seq, item = len(shard.sizes), shard.dtype.itemsize

        def first_token(b: int) -> int:
            s = int(shard.doc_idx[b * BLOCK_DOCS])
            return int(shard.pointers[s]) // item if s < n_seq else self.shards[k].tokens

        b = bisect.bisect_right(range(n_blocks), token, key=first_token) - 1
        return b, first_token(b)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, j = divmod(index, self.samples_per_epoch)
        pos = self.window_order(epoch)[j] * self.seq_len  # token position in this epoch's stream
        need = self.seq_len + 1
        out = np.empty(need, dtype=np.int64)  # [seq_len + 1]
        pieces = []  # (shard, document, its first position in out): names the document of a bad id
        k = int(np.searchsorted(self.shard_start, pos, side="right")) - 1
        b, b_first = self._block_of(k, int(pos - self.shard_start[k]))
        offset = int(pos - self.shard_start[k]) - b_first  # inside block b's stream
        filled = 0
        while filled < need:
            block = self._block(epoch, k, b)
            q = int(np.searchsorted(block.cum, offset, side="right")) - 1
            shard = self.cache.get(self._prefix[k])
            while filled < need and q < len(block.doc):
                into = offset - int(block.cum[q])
                take = min(int(block.cum[q + 1] - block.cum[q]) - into, need - filled)
                if take > 0:
                    first = int(block.start[q]) + into
                    out[filled : filled + take] = shard.tokens[first : first + take]
                    pieces.append((k, int(block.doc[q]), filled))
                    filled += take
                    offset += take
                q += 1
            b, offset = b + 1, 0  # the window goes on in the next block, or the next shard's first
            if b * BLOCK_DOCS >= self.shards[k].documents:
                k, b = k + 1, 0
        # Once per sample, not per document: a sample packs many short documents.
        if self.vocab_size is not None and (int(out.max()) >= self.vocab_size or int(out.min()) < 0):
            self._bad_id(out, pieces)
        return out

    def _bad_id(self, out: np.ndarray, pieces: list[tuple[int, int, int]]) -> None:
        """Raise for the first document piece of `out` holding an id outside [0, vocab_size)."""
        ends = [at for _, _, at in pieces[1:]] + [len(out)]
        k, d, chunk = next((k, d, out[at:end]) for (k, d, at), end in zip(pieces, ends, strict=True)
                           if end > at and (int(out[at:end].max()) >= self.vocab_size or int(out[at:end].min()) < 0))
        bad = int(chunk.max()) if int(chunk.max()) >= self.vocab_size else int(chunk.min())
        prefix = self.shards[k].prefix
        raise rank_local(DataError(
            f"{prefix}.bin: sequence {d} holds token id {bad}, outside "
            f"the tokenizer's [0, {self.vocab_size}): the shard is corrupt; check it with "
            f"`python -m pipeline.prepare --verify {prefix.parent}` and re-prepare it"
        ))


def is_weighted(sources) -> bool:
    return bool(sources) and all(
        isinstance(s, (tuple, list))
        and len(s) == 2
        and isinstance(s[0], (int, float))
        and not isinstance(s[0], bool)
        for s in sources
    )


def source_paths(sources) -> list[str]:
    """The paths named by a source list in either form ([dir, ...] or [[weight, dir], ...])."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    return [str(p) for _, p in sources] if is_weighted(sources) else [str(s) for s in sources]


def _shards_of(path: str | Path, split: str) -> tuple[list[IndexHeader], Manifest | None]:
    """Shards of `split` in a prepared dir (and its manifest), or of a bare Megatron prefix
    (`.../name` with .idx/.bin; no manifest, so no vocab size to check its ids against)."""
    path = Path(path)
    if path.is_dir():
        manifest = load_manifest(path)  # raises a clear error for dirs that are not prepared
        prefixes = [
            p
            for p, s in zip(manifest.shard_prefixes(split), manifest.splits[split].shards, strict=True)
            if s.documents > 0
        ]
        if not prefixes:
            raise DataError(
                f"{path} has no {split!r} documents; prepare it with a larger --valid-fraction "
                f"or train without a validation split"
            )
        shards = [read_index_header(p) for p in prefixes]
        for s in shards:
            if s.dtype != manifest.dtype:
                raise DataError(
                    f"{s.prefix}.idx has dtype {s.dtype} but {path}/{MANIFEST} says {manifest.dtype}"
                )
        return shards, manifest
    prefix = Path(prefix_of(str(path)))
    if idx_path(prefix).is_file():
        return [read_index_header(prefix)], None
    raise DataError(f"data source {path} is neither a prepared data dir nor a Megatron .bin/.idx prefix")


def build_dataset(sources, split: str, seq_len: int, seed: int, cache: ShardCache | None = None,
                  order: str = ORDER_SCHEME):
    """Dataset over `sources`: paths (one corpus) or (weight, path) pairs (exact weighted blend).
    Shards are opened through `cache` (one bounded set of open files; a new default one if None).
    `order` is ORDER_SCHEME, or legacy_order.LEGACY_ORDER for a run started before it (identity.resume_order).

    Returns an object with `__getitem__(i)` for any i >= 0 -> int64 [seq_len + 1],
    `samples_per_epoch` and `__len__ == samples_per_epoch`.
    """
    from pipeline.data.blending import BlendedDataset

    if order == ORDER_SCHEME:
        make = GPTDataset
    elif order == LEGACY_ORDER:
        def make(headers, *args, cache, **kw):
            return LegacyGPTDataset([MMapIndexedDataset(h.prefix) for h in headers], *args, **kw)
    else:
        raise ConfigError(f"unknown sample order {order!r}; this version reads {ORDER_SCHEME} and {LEGACY_ORDER}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ConfigError(f"no data sources given (data.{split} is empty)")
    weighted = is_weighted(sources)
    paths = source_paths(sources)
    per_source = []
    manifests = []
    for p in paths:
        shards, manifest = _shards_of(p, split)
        per_source.append(shards)
        manifests.append(manifest)
    vocab = [None if m is None else m.vocab_size for m in manifests]  # per source; None for a bare prefix
    dirs = [m.path for m in manifests if m is not None]
    if len(dirs) > 1:  # one tokenizer for everything; vocab fit is checked by the trainer
        check_vocab_compatible(dirs, max(v for v in vocab if v is not None))
    cache = cache if cache is not None else ShardCache()
    if not weighted:
        return make(
            [s for shards in per_source for s in shards],
            seq_len,
            seed,
            name=f"{split} of {', '.join(map(str, paths))}",
            vocab_size=None if None in vocab else max(vocab),
            cache=cache,
        )
    components = [
        make(shards, seq_len, seed, stream=i, name=f"{split} of {p}", vocab_size=v, cache=cache)
        for i, (shards, p, v) in enumerate(zip(per_source, paths, vocab, strict=True))
    ]
    return BlendedDataset(components, [float(w) for w, _ in sources])
