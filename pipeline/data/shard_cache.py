"""A bounded set of open shards: at most `max_open_files` descriptors per process for the data.

An open shard (`MMapIndexedDataset`) memory-maps its .idx and its .bin, and each map keeps one
descriptor (CPython's mmap dups the file's). 1 T int32 tokens in 512 MB shards is ~8000 shards:
opened all at once that is 16,000 descriptors, and `ulimit -n` is 1024 by default (Megatron users hit
"Too many open files" at ~5000 files). So shards are opened on first read and the least recently
read one is closed when the cap is reached. Start-up needs no open shard at all
(`indexed.read_index_header` reads the few header fields and closes the file).

One cache may serve several datasets (the trainer's train and validation sets share one), and is
safe to use from the read-ahead thread and the main thread at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from pipeline.data.indexed import MMapIndexedDataset
from pipeline.errors import ConfigError

DEFAULT_MAX_OPEN_FILES = 256
FILES_PER_SHARD = 2  # the .idx map and the .bin map


class ShardCache:
    """`cache.get(prefix)` -> an open MMapIndexedDataset; keeps <= max_open_files // 2 shards open."""

    def __init__(self, max_open_files: int = DEFAULT_MAX_OPEN_FILES):
        if max_open_files < FILES_PER_SHARD:
            raise ConfigError(f"data.max_open_files must be >= {FILES_PER_SHARD} (one shard holds "
                              f"{FILES_PER_SHARD} files open), got {max_open_files}")
        self.max_open_files = int(max_open_files)
        self.max_shards = self.max_open_files // FILES_PER_SHARD
        self._open: OrderedDict[str, MMapIndexedDataset] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0  # shards opened so far (a benchmark's and a test's view of the churn)

    def get(self, prefix: str | Path) -> MMapIndexedDataset:
        prefix = str(prefix)  # str keys: hashing a Path costs more than a sample's other work
        with self._lock:
            shard = self._open.get(prefix)
            if shard is not None:
                self._open.move_to_end(prefix)
                return shard
            while len(self._open) >= self.max_shards:
                # Dropping the last reference unmaps both files and closes their descriptors:
                # readers copy tokens out, never keep views into a shard.
                self._open.popitem(last=False)
            shard = MMapIndexedDataset(prefix)
            self._open[prefix] = shard
            self.opened += 1
            return shard

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            self._open.clear()
