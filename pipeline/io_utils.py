"""File writes that a crash can never leave half-done, and file digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import xxhash


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to `path.tmp`, fsync, then rename over `path`: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The digest of record (manifests): slow but universal (`sha256sum` checks it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | Path, chunk: int = 1 << 22) -> str:
    """A fast digest to notice any change of a file's content (xxh3-128, ~10x sha256's speed):
    for change detection, where nothing adversarial is expected."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "xxh3_128:" + h.hexdigest()
