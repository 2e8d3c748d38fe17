"""`--verify DIR`: recheck every checksum and the structure of every index against the manifest.

Structure checks: header (magic, version, dtype code = manifest dtype), document/token counts
per shard, byte pointers = running sum of sizes, doc_idx = 0..n, .bin size = sum(sizes) * itemsize,
every document ends with EOS, and every id is below the tokenizer's vocab size. Inputs: each input
file the manifest recorded with a content hash that is still at its path must still have that
content (otherwise the shards no longer are the tokenisation of the inputs); moved or deleted
inputs are not an error (a corpus is often removed once prepared).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.indexed import MMapIndexedDataset
from pipeline.data.manifest import load_manifest
from pipeline.errors import DataError
from pipeline.io_utils import content_hash, sha256_file

_SCAN_TOKENS = 1 << 24  # ids checked per step: bounded memory on multi-GB shards


def _check_shard(
    prefix: Path, documents: int, tokens: int, dtype: np.dtype, eos_id: int, vocab: int, name: str
) -> list[str]:
    """`name`: the shard as the manifest names it (a merged multi-task dir: tasks/task_.../train_00000)."""
    problems = []
    try:
        ds = MMapIndexedDataset(prefix)
    except DataError as e:
        return [str(e)]
    if ds.dtype != dtype:
        problems.append(f"{name}.idx: dtype {ds.dtype}, manifest says {dtype}")
    if len(ds) != documents or ds.num_documents != documents:
        problems.append(
            f"{name}.idx: {len(ds)} sequences / {ds.num_documents} documents, manifest says {documents}"
        )
    sizes = ds.sizes.astype(np.int64)
    if int(sizes.sum()) != tokens:
        problems.append(f"{name}.idx: {int(sizes.sum())} tokens, manifest says {tokens}")
    expected_ptr = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * ds.dtype.itemsize if len(sizes) else sizes
    if not np.array_equal(ds.pointers, expected_ptr):
        problems.append(f"{name}.idx: byte pointers are not the running sum of the sizes")
    if not np.array_equal(ds.doc_idx, np.arange(len(sizes) + 1)):
        problems.append(f"{name}.idx: document index is not 0..{len(sizes)}")
    if len(ds.tokens) != int(sizes.sum()):
        problems.append(f"{name}.bin: holds {len(ds.tokens)} tokens, index says {int(sizes.sum())}")
    if problems or not len(sizes):
        return problems
    if np.any(sizes < 1) or np.any(ds.tokens[np.cumsum(sizes) - 1] != eos_id):
        problems.append(f"{name}.bin: a document does not end with EOS id {eos_id}")
    for start in range(0, len(ds.tokens), _SCAN_TOKENS):
        block = ds.tokens[start : start + _SCAN_TOKENS]
        if int(block.max()) >= vocab or int(block.min()) < 0:
            problems.append(f"{name}.bin: token id outside [0, {vocab}) near token {start}")
            break
    return problems


def sha256_problem(path: Path, digest: str, digest_of: Callable[[Path], str] = sha256_file) -> str | None:
    """"missing", "changed" (its sha256 is not the recorded one), or None: the file is as recorded.
    `digest_of`: how the file's sha256 is computed (the background check reads at a throttled rate)."""
    if not path.is_file():
        return "missing"
    return "changed" if digest_of(path) != digest else None


def checksum_line(path: Path, why: str) -> str:
    """A `sha256_problem` of a data file in words, naming it."""
    return f"{path} is missing" if why == "missing" else f"{path} fails its sha256 (changed or corrupted since prepare)"


def verify(data_dir: str | Path) -> list[str]:
    """All problems found in a prepared dir (empty list: it verifies)."""
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    problems = []
    for rel, digest in sorted(m.files.items()):
        if why := sha256_problem(data_dir / rel, digest):
            problems.append(f"{rel}: missing" if why == "missing" else
                            f"{rel}: sha256 mismatch (file changed or corrupted since prepare)")
    for entry in m.raw.get("fingerprint", {}).get("inputs", []):
        for name, _size, digest in entry[2] if len(entry) > 2 else []:
            if str(digest).startswith("xxh3_128:") and Path(name).is_file() and content_hash(name) != digest:
                problems.append(f"input {name}: content changed since prepare; rebuild with the same "
                                "`python -m pipeline.prepare` command plus --overwrite")
    for split in m.splits.values():
        for shard in split.shards:
            problems += _check_shard(
                data_dir / shard.name, shard.documents, shard.tokens, m.dtype, m.eos_id, m.vocab_size, shard.name
            )
    return problems
