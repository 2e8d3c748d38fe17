"""Micro-batches for data-parallel ranks from one global sample counter.

`consumed_samples` is the only data-loader state a checkpoint needs. Global step s covers
samples [consumed, consumed + mbs * dp_world); rank r takes the slice starting at
consumed + r * mbs. Because the stream is defined by the counter alone, resuming with the same
counter at a different dp_world continues the identical global sequence of samples.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError


class MicroBatchIterator:
    """`next()` -> torch.LongTensor [micro_batch_size, seq_len + 1] for this rank."""

    def __init__(
        self, dataset, micro_batch_size: int, dp_rank: int, dp_world: int, consumed_samples: int = 0
    ):
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ConfigError(f"dp_rank {dp_rank} must be in [0, dp_world={dp_world})")
        if consumed_samples < 0:
            raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_world = int(dp_world)
        self.consumed_samples = int(consumed_samples)

    def global_indices(self) -> range:
        """Sample indices this rank reads on the next call."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def next(self) -> torch.Tensor:
        rows = [self.dataset[i] for i in self.global_indices()]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64, copy=False))  # [mbs, seq_len + 1]
        self.consumed_samples += self.micro_batch_size * self.dp_world
        return batch

    __next__ = next

    def __iter__(self):
        return self

