"""Keyed pseudo-random permutations of [0, n) evaluated one index at a time: no array of n entries.

A balanced Feistel network over the smallest even number of bits that covers n, with cycle walking
(re-encrypt until the value lands inside [0, n)): a bijection of [0, 2^bits) restricted to [0, n) by
walking is a bijection of [0, n). Since 2^bits < 4n, a walk takes under 4 encryptions on average.
This is google/grain's `index_shuffle` and Levanter's permutation (which moved from an LCG to a
Feistel network for quality); the round function here is splitmix64 of (round key ^ half).

`FeistelPermutation(n, key)[i]` costs O(rounds x walk) integer operations; `.array(i)` does the
same for a numpy array of indices (tests and benchmarks check bijectivity with it).
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
ROUNDS = 6  # Luby-Rackoff needs >= 4 for a pseudo-random permutation; 6 for margin on small domains


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser: a fast, well-mixed 64-bit hash (also used to derive keys)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """One 64-bit key from non-negative ints (seed, stream, epoch, ...): chained splitmix64."""
    key = 0x243F6A8885A308D3
    for p in parts:
        key = splitmix64(key ^ (int(p) & _M64))
    return key


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """perm[i] for i in [0, n): a bijection fixed by (n, key)."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"permutation domain must be >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2  # balanced halves
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.round_keys = [derive_key(key, r) for r in range(ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (splitmix64(k ^ right) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} outside [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: stays on the cycle of i, so the map stays a bijection
            x = self._encrypt(x)
        return x

    def array(self, idx: np.ndarray) -> np.ndarray:
        """perm[idx] for an int array (int64 [m]), vectorised."""
        x = np.asarray(idx, dtype=np.uint64).copy()
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} outside [0, {self.n})")
        todo = np.ones(x.shape, dtype=bool)
        half, mask = np.uint64(self.half), np.uint64(self.mask)
        keys = [np.uint64(k) for k in self.round_keys]
        while todo.any():
            v = x[todo]
            left, right = v >> half, v & mask
            for k in keys:
                left, right = right, left ^ (_splitmix64_array(k ^ right) & mask)
            v = (left << half) | right
            x[todo] = v
            todo[todo] = v >= np.uint64(self.n)
        return x.astype(np.int64)
