"""Micro-batches for data-parallel ranks from one global sample counter, read ahead in a thread.

`consumed_samples` is the only data-loader state a checkpoint needs. Global step s covers
samples [consumed, consumed + mbs * dp_world); rank r takes the slice starting at
consumed + r * mbs. Because the stream is defined by the counter alone, resuming with the same
counter at a different dp_world continues the identical global sequence of samples.

With `prefetch=n > 0` a background thread reads the next n micro-batches into a bounded queue while
the step computes; `consumed_samples` still counts only the batches handed out, so a checkpoint
never skips what was read ahead. An error in the thread reaches the caller's next `next()` as the
same exception (its one-line message intact). `wait_seconds` accumulates the time `next()` blocked
on data (the trainer logs it as time/data_wait).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from pipeline.errors import ConfigError


class MicroBatchIterator:
    """`next()` -> torch.LongTensor [micro_batch_size, seq_len + 1] for this rank."""

    def __init__(
        self, dataset, micro_batch_size: int, dp_rank: int, dp_world: int, consumed_samples: int = 0,
        prefetch: int = 0,
    ):
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ConfigError(f"dp_rank {dp_rank} must be in [0, dp_world={dp_world})")
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_world = int(dp_world)
        self.consumed_samples = int(consumed_samples)
        self.wait_seconds = 0.0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._read_ahead, args=(self.consumed_samples,),
                                            name="data-read-ahead", daemon=True)
            self._thread.start()

    def global_indices(self) -> range:
        """Sample indices this rank reads on the next call."""
        return self._indices(self.consumed_samples)

    def _indices(self, consumed: int) -> range:
        first = consumed + self.dp_rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def _read(self, consumed: int) -> torch.Tensor:
        rows = [self.dataset[i] for i in self._indices(consumed)]
        return torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))  # [mbs, seq_len + 1]

    def _read_ahead(self, consumed: int) -> None:
        while not self._stop.is_set():
            try:
                item = self._read(consumed)
            except BaseException as e:  # handed to the step that needs this batch, then the thread ends
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            consumed += self.micro_batch_size * self.dp_world

    def next(self) -> torch.Tensor:
        t0 = time.perf_counter()
        if self._queue is None:
            batch = self._read(self.consumed_samples)
        else:
            if self._stop.is_set():
                raise RuntimeError("MicroBatchIterator.next() after close()")
            batch = self._queue.get()
            if isinstance(batch, BaseException):
                self.close()
                raise batch
        self.wait_seconds += time.perf_counter() - t0
        self.consumed_samples += self.micro_batch_size * self.dp_world
        return batch

    def take_wait_seconds(self) -> float:
        """Seconds `next()` waited for data since the last call (and reset)."""
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited

    def close(self) -> None:
        """Stop the read-ahead thread (it finishes the sample in hand) and wait for it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    __next__ = next

    def __iter__(self):
        return self
