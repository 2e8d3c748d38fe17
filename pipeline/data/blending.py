"""Weighted blending of datasets with proportions held over every window, not just on average.

Weights are turned into small integers n_c (exactly, for rational weights like 0.3/0.7 or 2:1)
with period P = sum(n_c). Within one period, component c's k-th sample is placed at virtual time
(k + 1/2) / n_c and the samples are merged in time order (ties by component index). This is the
classic stride / Sainte-Laguë interleave: after any prefix of m samples, component c has
round(m * w_c) samples to within one, so every window of W samples holds W * w_c to within two
-- unlike i.i.d. sampling, whose error grows like sqrt(W). Because the schedule repeats every P
samples, sample i maps to its component and local index in O(1) with no history to replay,
which is what lets training resume at any consumed_samples.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Protocol

import numpy as np

from pipeline.errors import ConfigError

MAX_DENOMINATOR = 10_000
MAX_PERIOD = 1_000_000


class SampleSource(Protocol):
    samples_per_epoch: int

    def __getitem__(self, index: int) -> np.ndarray: ...


def integer_weights(weights: list[float]) -> np.ndarray:
    """Smallest integers proportional to `weights` (int64 [K]); rounded if the period gets huge."""
    if not weights:
        raise ConfigError("blend needs at least one (weight, path) source")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"blend weights must be finite and > 0, got {weights}")
    fracs = [Fraction(w).limit_denominator(MAX_DENOMINATOR) for w in weights]
    denom = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * denom) for f in fracs]
    g = math.gcd(*ints)
    ints = [i // g for i in ints]
    if all(i > 0 for i in ints) and sum(ints) <= MAX_PERIOD:
        return np.array(ints, dtype=np.int64)
    # Incommensurable weights: largest-remainder apportionment of a long period (error < 1e-6).
    w = np.asarray(weights, dtype=np.float64)
    quota = w / w.sum() * MAX_PERIOD
    ints = np.maximum(np.floor(quota).astype(np.int64), 1)
    short = MAX_PERIOD - int(ints.sum())
    if short > 0:
        ints[np.argsort(-(quota - np.floor(quota)), kind="stable")[:short]] += 1
    return ints


def interleave_schedule(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One period of the interleave: (component [P], rank of the sample within its component [P])."""
    comp = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    rank = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    # Virtual time (2k + 1) / (2 n_c): a ratio of small ints, so equal rationals give equal floats
    # and the component index breaks ties deterministically.
    time = (2 * rank + 1) / (2.0 * counts[comp])
    order = np.lexsort((comp, time))
    return comp[order], rank[order]


class BlendedDataset:
    """Sample i comes from component `schedule[i % P]`; each component wraps its own epochs."""

    def __init__(self, datasets: list[SampleSource], weights: list[float]):
        if len(datasets) != len(weights):
            raise ConfigError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = [w / sum(weights) for w in weights]
        self.counts = integer_weights(list(weights))  # int64 [K], samples per period
        self.period = int(self.counts.sum())
        self._component, self._rank = interleave_schedule(self.counts)
        # An "epoch" of a blend: as many samples as its sources hold together.
        self.samples_per_epoch = int(sum(d.samples_per_epoch for d in self.datasets))
        self.seq_len = getattr(self.datasets[0], "seq_len", None)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, index: int) -> tuple[int, int]:
        """(component, index inside that component) of global sample `index`."""
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        period, pos = divmod(int(index), self.period)
        c = int(self._component[pos])
        return c, period * int(self.counts[c]) + int(self._rank[pos])

    def __getitem__(self, index: int) -> np.ndarray:
        c, local = self.locate(index)
        return self.datasets[c][local]
