"""Megatron "MMIDIDX" indexed dataset: the on-disk format of our shards.

`PREFIX.bin` holds the raw token ids of every sequence back to back. `PREFIX.idx` holds::

    magic b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | sequence count <Q |
    document-index length <Q (documents + 1) | int32 sizes[n] | int64 byte pointers[n] |
    int64 doc_idx[documents + 1]

Writing exactly this layout lets users mix our shards with Megatron-LM / GPT-NeoX ones. We write
one sequence per document, so `doc_idx == arange(n + 1)`; the reader accepts any valid file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io_utils import PendingPath

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
# Megatron's threshold: below 65,500 ids it stores uint16, otherwise int32.
UINT16_VOCAB_LIMIT = 65_500
_HEADER = struct.Struct("<9sQBQQ")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with Megatron's margin, else int32 (GPT-OSS's 201,088 ids)."""
    return np.dtype(np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def prefix_of(path: str) -> str:
    """The Megatron prefix a source names: `.../name`, whether given as that, `name.bin` or `name.idx`."""
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def encode_index(dtype: np.dtype, sizes: np.ndarray) -> bytes:
    """The .idx bytes for one-sequence-per-document data with `sizes` (int32 [n]) tokens each."""
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        raise ValueError(f"dtype {dtype} has no MMIDIDX code")
    sizes = np.asarray(sizes, dtype=np.int32)
    n = len(sizes)
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    header = _HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dtype], n, n + 1)
    return header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes()


def index_size(documents: int) -> int:
    """Bytes of the .idx that `encode_index` writes for `documents` documents: the header, then an
    int32 size, an int64 pointer and an int64 document-index entry per document, plus one more entry."""
    return _HEADER.size + 20 * documents + 8


class IndexedDatasetWriter:
    """Streams sequences into `PREFIX.bin.tmp`; `finalize()` writes `PREFIX.idx.tmp` and commits both
    (pipeline.io_utils.PendingPath: fsync, then rename).

    .bin is renamed only once complete and fsynced, and .idx after it, so a crash never leaves a file
    under its final name that is shorter than what the index (or manifest) claims.
    Returns sha256 digests computed while writing, so finalising costs no second read of .bin.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = PendingPath(bin_path(self.prefix))
        self._idx = PendingPath(idx_path(self.prefix))
        self._file = open(self._bin.tmp, "wb")  # noqa: SIM115 - closed in finalize()/abort()
        self._sha = hashlib.sha256()
        self._sizes: list[np.ndarray] = []
        self.num_docs = 0
        self.num_tokens = 0
        self.min_id: int | None = None  # recorded in the manifest: training checks them against the model
        self.max_id: int | None = None

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array plus int lengths [n_docs]."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self._sizes.append(np.asarray(lengths, dtype=np.int32))
        if len(tokens):
            lo, hi = int(np.min(tokens)), int(np.max(tokens))
            self.min_id = lo if self.min_id is None else min(self.min_id, lo)
            self.max_id = hi if self.max_id is None else max(self.max_id, hi)
        self.num_docs += len(lengths)
        self.num_tokens += int(len(tokens))

    def finalize(self) -> dict:
        self._file.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        index = encode_index(self.dtype, sizes)
        self._idx.tmp.write_bytes(index)
        self._bin.commit()
        self._idx.commit()
        return {
            "bin_sha256": self._sha.hexdigest(),
            "idx_sha256": hashlib.sha256(index).hexdigest(),
            "documents": self.num_docs,
            "tokens": self.num_tokens,
            "min_id": self.min_id,
            "max_id": self.max_id,
        }

    def abort(self) -> None:
        self._file.close()
        self._bin.discard()
        self._idx.discard()


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    """What a shard's .idx says about it, read with a few `pread`s (no pass over its documents)."""

    prefix: Path
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int  # .bin tokens covered by the index (sequences back to back, as Megatron writes them)


def _check_header(ip: Path, header: bytes, size: int) -> tuple[np.dtype, int, int]:
    """(dtype, sequences, document-index length) of an .idx of `size` bytes starting with `header`;
    one line naming the file for a truncated, foreign, unknown or wrongly sized index."""
    if size < _HEADER.size:
        raise DataError(f"{ip} is truncated ({size} bytes): re-run prepare or --verify the dir")
    magic, version, code, n, n_doc = _HEADER.unpack(header[: _HEADER.size])
    if magic != MAGIC:
        raise DataError(f"{ip} is not an MMIDIDX index (magic {magic!r})")
    if version != VERSION:
        raise DataError(f"{ip} has index version {version}; only version {VERSION} is supported")
    if code not in DTYPE_CODES:
        raise DataError(f"{ip} has unknown dtype code {code}")
    expected = _HEADER.size + 4 * n + 8 * n + 8 * n_doc
    if size != expected:
        raise DataError(f"{ip} is {size} bytes, its header implies {expected}: the file is corrupt")
    return np.dtype(DTYPE_CODES[code]), n, n_doc


def read_index_header(prefix: str | Path) -> IndexHeader:
    """The header, last pointer and size of `PREFIX.idx`, checked against the file sizes; the
    descriptor is closed before returning (a corpus of 8000 shards must not hold 8000 files)."""
    prefix = Path(prefix)
    ip, bp = idx_path(prefix), bin_path(prefix)
    for p in (ip, bp):
        if not p.is_file():
            raise DataError(f"{p} does not exist: not a complete indexed dataset (prefix {prefix})")
    try:
        fd = os.open(ip, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"{ip} cannot be read ({e.strerror or e}); check the file and its permissions, "
                        "or re-prepare the data") from None
    try:
        dtype, n, n_doc = _check_header(ip, os.pread(fd, _HEADER.size, 0), os.fstat(fd).st_size)
        if n_doc < 1:
            raise DataError(f"{ip} has an empty document index (Megatron's starts with 0): the file is corrupt")
        off = _HEADER.size
        first_doc, last_doc = struct.unpack("<q", os.pread(fd, 8, off + 12 * n))[0], struct.unpack(
            "<q", os.pread(fd, 8, off + 12 * n + 8 * (n_doc - 1)))[0]
        tokens = 0
        if n:
            (last_size,) = struct.unpack("<i", os.pread(fd, 4, off + 4 * (n - 1)))
            (first_ptr,) = struct.unpack("<q", os.pread(fd, 8, off + 4 * n))
            (last_ptr,) = struct.unpack("<q", os.pread(fd, 8, off + 4 * n + 8 * (n - 1)))
            if first_ptr != 0:
                raise DataError(f"{ip}: its first sequence starts at byte {first_ptr} of .bin, not 0: "
                                "the file is corrupt")
            tokens = last_ptr // dtype.itemsize + last_size
    finally:
        os.close(fd)
    if (first_doc, last_doc) != (0, n):
        raise DataError(f"{ip}: its documents cover sequences {first_doc}..{last_doc}, not all {n}: "
                        "the file is corrupt")
    need = (last_ptr + last_size * dtype.itemsize) if n else 0
    if bp.stat().st_size < need:
        raise DataError(f"{bp} is {bp.stat().st_size} bytes but its index needs {need}: the shard is truncated")
    return IndexHeader(prefix, dtype, n, n_doc - 1, int(tokens))


class MMapIndexedDataset:
    """Read-only view of one MMIDIDX shard; `.bin` is memory-mapped, nothing is copied.

    Attributes: `dtype`, `sizes` (int32 [n]), `pointers` (int64 [n], byte offsets),
    `doc_idx` (int64 [documents + 1]). `ds[i]` is sequence i as a numpy array of `dtype`.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise DataError(f"{p} does not exist: not a complete indexed dataset (prefix {prefix})")
        try:
            raw = np.memmap(ip, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:  # unreadable (permissions, I/O error) or empty
            raise DataError(f"{ip} cannot be read ({getattr(e, 'strerror', None) or e}); check the file and its "
                            "permissions, or re-prepare the data") from None
        self.dtype, n, n_doc = _check_header(ip, bytes(raw[: _HEADER.size]), len(raw))
        off = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=off)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=off + 4 * n)
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off + 12 * n)
        self._idx_raw = raw
        nbytes = os.path.getsize(bp)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if nbytes < need:
            raise DataError(f"{bp} is {nbytes} bytes but its index needs {need}: the shard is truncated")
        # np.memmap refuses empty files; an empty shard (valid split of a tiny corpus) is legal.
        try:
            self._bin = np.memmap(bp, dtype=self.dtype, mode="r") if nbytes else np.zeros(0, self.dtype)
        except OSError as e:
            raise DataError(f"{bp} cannot be read ({e.strerror or e}); check the file and its permissions, "
                            "or re-prepare the data") from None

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def tokens(self) -> np.ndarray:
        """All token ids of the shard, flat (memory-mapped)."""
        return self._bin

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        size = int(self.sizes[i]) - offset if length is None else length
        return self._bin[start : start + size]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document_token_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in tokens of every document (int64 [documents] each), vectorised.

        A document is the contiguous run of its sequences; Megatron writes them back to back,
        which we check rather than assume.
        """
        item = self.dtype.itemsize
        first, last = self.doc_idx[:-1], self.doc_idx[1:] - 1
        nonempty = last >= first
        first, last = first[nonempty], last[nonempty]
        starts = self.pointers[first] // item
        ends = self.pointers[last] // item + self.sizes[last]
        seq_tokens = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=seq_tokens[1:])
        if np.any(ends - starts != seq_tokens[last + 1] - seq_tokens[first]):
            raise DataError(f"{self.prefix}.idx: sequences of a document are not contiguous in .bin")
        return starts.astype(np.int64), (ends - starts).astype(np.int64)
