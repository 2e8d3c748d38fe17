"""An independent MMIDIDX reader written from the format description alone (struct + numpy)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def read_mmidx(prefix: Path) -> dict:
    idx = Path(f"{prefix}.idx").read_bytes()
    magic = idx[:9]
    (version,) = struct.unpack("<Q", idx[9:17])
    (code,) = struct.unpack("<B", idx[17:18])
    (n_seq,) = struct.unpack("<Q", idx[18:26])
    (n_doc_idx,) = struct.unpack("<Q", idx[26:34])
    pos = 34
    sizes = np.frombuffer(idx, np.int32, n_seq, pos)
    pos += 4 * n_seq
    pointers = np.frombuffer(idx, np.int64, n_seq, pos)
    pos += 8 * n_seq
    doc_idx = np.frombuffer(idx, np.int64, n_doc_idx, pos)
    pos += 8 * n_doc_idx
    assert pos == len(idx), "trailing bytes in .idx"
    dtype = np.dtype(CODES[code])
    data = np.frombuffer(Path(f"{prefix}.bin").read_bytes(), dtype)
    seqs = [data[p // dtype.itemsize : p // dtype.itemsize + s] for p, s in zip(pointers, sizes, strict=True)]
    return {
        "magic": magic,
        "version": version,
        "code": code,
        "dtype": dtype,
        "sizes": sizes,
        "pointers": pointers,
        "doc_idx": doc_idx,
        "sequences": seqs,
    }


def read_split(data_dir: Path, split: str) -> list[np.ndarray]:
    """Every document of `split`, in shard order, from the shard files listed in the dir."""
    out = []
    for idx in sorted(Path(data_dir).glob(f"{split}_*.idx")):
        out += read_mmidx(idx.with_suffix(""))["sequences"]
    return out
