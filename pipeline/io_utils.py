"""The one atomic writer: file and folder writes that a crash can never leave half-done; and the
file digests (sha256 of record, a fast content hash for change detection)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import xxhash


class PendingPath:
    """`PATH.tmp` beside `path`, to write by any writer (a file or a folder). `commit()` fsyncs it (a
    file) and renames it over `path`, so readers see the old or the new one, never a half-written
    one; `discard()` removes it. `atomic_path` is the with-block form; this one is for a writer that
    outlives a block (a streamed shard)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        _remove(self.tmp)  # leftovers of a writer that was killed

    def commit(self) -> None:
        if self.tmp.is_file():
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
        if self.tmp.is_dir() and self.path.is_dir():  # a folder cannot be renamed over a non-empty one
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        _remove(self.tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields `PATH.tmp` beside `path` to write (a file or a folder, by any writer); when the block
    ends it is committed (see PendingPath). If the block raises, the temporary is removed."""
    pending = PendingPath(path)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a temporary file, then rename it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _digest(path: str | Path, h, chunk: int = 1 << 22):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: str | Path) -> str:
    """The digest of record (manifests): slow but universal (`sha256sum` checks it)."""
    return _digest(path, hashlib.sha256()).hexdigest()


def content_hash(path: str | Path) -> str:
    """A fast digest to notice any change of a file's content (xxh3-128, ~10x sha256's speed):
    for change detection, where nothing adversarial is expected."""
    return "xxh3_128:" + _digest(path, xxhash.xxh3_128()).hexdigest()
