"""Rolling shard writers with deterministic boundaries, so an interrupted prepare can resume.

Every document gets a global index g (its position in the input stream). A split's shard k is
closed right after the document that brings it to >= target tokens, so shard boundaries are a
pure function of the input stream, the tokenizer and the options -- not of timing, worker count
or where a previous run stopped. Each finished shard is recorded in the state file together with
`end_doc` (g of its last document + 1); a rerun keeps the verified prefix of shards per split and
re-tokenises only documents of that split with g >= end_doc of its last kept shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.indexed import IndexedDatasetWriter, bin_path, idx_path
from pipeline.io_utils import sha256_file


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:05d}"


def verified_prefix(out_dir: Path, shards: list[dict]) -> list[dict]:
    """The longest prefix of recorded shards whose files exist with the recorded sha256."""
    kept = []
    for rec in shards:
        b, i = bin_path(out_dir / rec["name"]), idx_path(out_dir / rec["name"])
        if not (b.is_file() and i.is_file()):
            break
        if sha256_file(b) != rec["bin_sha256"] or sha256_file(i) != rec["idx_sha256"]:
            break
        kept.append(rec)
    return kept


class SplitWriter:
    """Appends tokenised documents of one split to shards `<split>_<k>.bin/.idx` in `out_dir`."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        dtype: np.dtype,
        target_tokens: int,
        done: list[dict],
        on_shard_done: Callable[[str, dict], None],
    ):
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.target_tokens = max(1, int(target_tokens))
        self.done = list(done)  # records of finished shards (name, documents, tokens, end_doc, sha256s)
        self.resume_doc = self.done[-1]["end_doc"] if self.done else 0
        self._on_shard_done = on_shard_done
        self._writer: IndexedDatasetWriter | None = None
        self._first_doc = 0
        # Shards past the verified prefix (from an interrupted run) are rewritten from scratch; only
        # files named like our shards are removed (a user's `train_notes.txt` is not ours).
        for stale in sorted(self.out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].*")):
            stem = stale.name.split(".")[0]
            if stem not in {r["name"] for r in self.done}:
                stale.unlink()

    def add(self, doc_ids: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Append documents: global ids int64 [n], lengths int64 [n], tokens flat [sum(lengths)]."""
        n, i, tok_pos = len(lengths), 0, 0
        while i < n:
            if self._writer is None:
                self._writer = IndexedDatasetWriter(
                    self.out_dir / shard_name(self.split, len(self.done)), self.dtype
                )
                self._first_doc = int(doc_ids[i])
            room = self.target_tokens - self._writer.num_tokens
            cum = np.cumsum(lengths[i:])
            # Index of the document that fills the shard (closes it), or n if this chunk does not.
            last = i + int(np.searchsorted(cum, room, side="left"))
            stop = min(last + 1, n)
            n_tok = int(cum[stop - i - 1])
            self._writer.add_documents(tokens[tok_pos : tok_pos + n_tok], lengths[i:stop])
            tok_pos += n_tok
            if last < n:
                self._close(end_doc=int(doc_ids[last]) + 1)
            i = stop

    def finish(self, end_doc: int) -> None:
        if self._writer is not None:
            self._close(end_doc)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _close(self, end_doc: int) -> None:
        info = self._writer.finalize()
        rec = {
            "name": self._writer.prefix.name,
            "documents": info["documents"],
            "tokens": info["tokens"],
            "first_doc": self._first_doc,
            "end_doc": end_doc,
            "bin_sha256": info["bin_sha256"],
            "idx_sha256": info["idx_sha256"],
            "min_id": info["min_id"],
            "max_id": info["max_id"],
        }
        self._writer = None
        self.done.append(rec)
        self._on_shard_done(self.split, rec)
