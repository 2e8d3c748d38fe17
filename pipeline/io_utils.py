"""The one atomic writer: file and folder writes that a crash can never leave half-done."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields `PATH.tmp` beside `path` to write (a file or a folder, by any writer); when the block
    ends it is fsynced (a file) and renamed over `path`, so readers see the old or the new one, never
    a half-written one. If the block raises, the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)  # leftovers of a writer that was killed
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over a non-empty one
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
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
