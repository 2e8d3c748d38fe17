"""The sample order before the O(shards) loader, kept so that runs started with it resume in it.

Per epoch: a permutation of every document, their cumulative token counts, and a permutation of
every window, all as arrays as long as the corpus (~32 B per document + 8 B per window per rank),
rebuilt each epoch; every shard opened (two descriptors each) at start-up. New runs never use it
(dataset.GPTDataset); a checkpoint whose data identity records no order was written with this one
(identity.resume_order), and benchmarks/data_scale.py measures it against the new loader.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from pipeline.data.indexed import MMapIndexedDataset
from pipeline.errors import ConfigError, DataError, rank_local

_DOC_ORDER_SALT = 0xD0C5
_SAMPLE_ORDER_SALT = 0x5A3F


def _rng(seed: int, epoch: int, salt: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, salt, stream]))


LEGACY_ORDER = "per-document-arrays/v0"


class LegacyGPTDataset:
    """`ds[i]` -> int64 [seq_len + 1] for any i >= 0; epochs wrap with a new shuffle each."""

    def __init__(
        self,
        shards: Sequence[MMapIndexedDataset],
        seq_len: int,
        seed: int,
        stream: int = 0,
        name: str = "",
        epoch_cache: int = 2,
        vocab_size: int | None = None,
    ):
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        if seed < 0:
            raise ConfigError(f"data seed must be >= 0, got {seed}")
        self.shards = list(shards)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.stream = int(stream)
        self.name = name
        self.vocab_size = vocab_size  # ids must lie in [0, vocab_size): checked per read (corrupt bytes)
        starts, lengths, owner = [], [], []
        for k, shard in enumerate(self.shards):
            s, n = shard.document_token_ranges()
            starts.append(s)
            lengths.append(n)
            owner.append(np.full(len(s), k, dtype=np.int32))
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)  # [D] token offset
        self.doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # [D] tokens
        self.doc_shard = np.concatenate(owner) if owner else np.zeros(0, np.int32)  # [D] shard index
        self.num_tokens = int(self.doc_len.sum())
        # The last window needs one extra token for its final label.
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // self.seq_len)
        if self.samples_per_epoch < 1:
            raise DataError(
                f"{name or 'dataset'} has {self.num_tokens} tokens: too few for one sample of "
                f"seq_len {seq_len} (+1 label token); use more data or a smaller seq_len"
            )
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._epoch_cache = epoch_cache

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_order [D], token start of each ordered doc [D + 1], window order [N]) of one epoch."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            self._epochs.move_to_end(epoch)
            return hit
        n_docs = len(self.doc_len)
        index_dtype = np.int32 if n_docs < 2**31 else np.int64
        doc_order = (
            _rng(self.seed, epoch, _DOC_ORDER_SALT, self.stream).permutation(n_docs).astype(index_dtype)
        )
        cum = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(self.doc_len[doc_order], out=cum[1:])
        window_order = _rng(self.seed, epoch, _SAMPLE_ORDER_SALT, self.stream).permutation(
            self.samples_per_epoch
        )
        entry = (doc_order, cum, window_order)
        self._epochs[epoch] = entry
        if len(self._epochs) > self._epoch_cache:  # training moves forward: keep the newest epochs
            self._epochs.popitem(last=False)
        return entry

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, j = divmod(index, self.samples_per_epoch)
        doc_order, cum, window_order = self._epoch(epoch)
        need = self.seq_len + 1
        start = int(window_order[j]) * self.seq_len  # token position in this epoch's concatenation
        k = int(np.searchsorted(cum, start, side="right")) - 1
        out = np.empty(need, dtype=np.int64)  # [seq_len + 1]
        pieces = []  # (document, its first position in out): names the document of a bad id
        filled = 0
        while filled < need:
            d = int(doc_order[k])
            offset = start + filled - int(cum[k])
            take = min(int(self.doc_len[d]) - offset, need - filled)
            first = int(self.doc_start[d]) + offset
            out[filled : filled + take] = self.shards[self.doc_shard[d]].tokens[first : first + take]
            pieces.append((d, filled))
            filled += take
            k += 1
        # Once per sample, not per document: a sample packs many short documents.
        if self.vocab_size is not None and (int(out.max()) >= self.vocab_size or int(out.min()) < 0):
            self._bad_id(out, pieces)
        return out

    def _bad_id(self, out: np.ndarray, pieces: list[tuple[int, int]]) -> None:
        """Raise for the first document piece of `out` holding an id outside [0, vocab_size)."""
        ends = [at for _, at in pieces[1:]] + [len(out)]
        d, chunk = next((d, out[at:end]) for (d, at), end in zip(pieces, ends, strict=True)
                        if end > at and (int(out[at:end].max()) >= self.vocab_size or int(out[at:end].min()) < 0))
        k = int(self.doc_shard[d])
        bad = int(chunk.max()) if int(chunk.max()) >= self.vocab_size else int(chunk.min())
        first_doc_of_shard = int(np.searchsorted(self.doc_shard, k))  # doc_shard is ascending
        raise rank_local(DataError(
            f"{self.shards[k].prefix}.bin: sequence {d - first_doc_of_shard} holds token id {bad}, outside "
            f"the tokenizer's [0, {self.vocab_size}): the shard is corrupt; check it with "
            f"`python -m pipeline.prepare --verify {self.shards[k].prefix.parent}` and re-prepare it"
        ))
