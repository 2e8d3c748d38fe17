"""Damaged data found while training, without a start-up pass: each rank hashes its share of the data
files in a background thread at a throttled rate and raises a flag on a sha256 mismatch.

    files, notes = manifest_checksums(dirs)                  # (path, sha256, size) of every file the manifests list
    verifier = BackgroundVerifier(deal_by_size(files, world)[rank], rate_mb_s)
    verifier.start()
    ...
    verifier.problem                                         # None, or "PATH fails its sha256 (...)"

Why a thread and plain reads: the check must cost no step time, so it reads with `read` into one
reused buffer (both `readinto` and sha256 release the GIL for large blocks) and sleeps between
blocks so it never reads faster than `rate_mb_s`; it does not go through the training loader's
maps, and after each block it tells the kernel it will not need those pages again
(POSIX_FADV_DONTNEED), so a pass over a corpus larger than memory does not push the training's
pages out of the page cache. (The kernel keeps pages that a process has mapped, so the pages the
training loader reads through its maps stay.)

One pass per process: the thread ends when its share is checked. A pass starts at a random file of
the share, so that a job restarted more often than a pass takes (preemptions, hourly requeues) still
checks every file over its restarts instead of the first ones each time.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import threading
import time
from pathlib import Path
from typing import NamedTuple

from pipeline.data.indexed import index_size
from pipeline.data.manifest import load_manifest
from pipeline.data.verify import checksum_line, sha256_problem

STOP_WAIT_S = 2.0
# Read and hash 8 MiB at a time (~5 ms of work, the GIL released throughout), then sleep: each block
# costs a few GIL hand-offs with the training thread, so fewer, larger blocks disturb it less (1 MiB
# blocks measured up to 1.15x step time at 8 MB/s on a loaded 2-core machine, bench_verify.py).
BLOCK_BYTES = 8 << 20
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)  # absent on macOS


class DataFile(NamedTuple):
    path: Path
    sha256: str
    size: int  # bytes, from the manifest's counts (no stat of thousands of files on a shared filesystem)


def manifest_checksums(data_dirs: list) -> tuple[list[DataFile], list[str]]:
    """Every file the manifests of `data_dirs` list with its recorded sha256, in a fixed order, and a
    note per dir whose manifest records no sha256 for some shard file (written by an older prepare)."""
    files, notes = [], []
    for d in data_dirs:
        m = load_manifest(d)
        sizes = {}
        for split in m.splits.values():
            for s in split.shards:
                sizes[f"{s.name}.bin"] = s.tokens * m.dtype.itemsize
                sizes[f"{s.name}.idx"] = index_size(s.documents)
        files += [DataFile(m.path / rel, digest, sizes[rel] if rel in sizes else _size(m.path / rel))
                  for rel, digest in sorted(m.files.items())]
        unrecorded = sorted(set(sizes) - set(m.files))
        if unrecorded:
            notes.append(f"{m.path / 'manifest.json'} records no sha256 for {len(unrecorded)} shard file(s) "
                         f"(e.g. {unrecorded[0]}; prepared by an older version): those are not checked for damage; "
                         "re-prepare the data to record them")
    return files, notes


def deal_by_size(files: list[DataFile], world: int) -> list[list[DataFile]]:
    """Each rank's share of `files`: largest first, each to the rank with the fewest bytes so far (ties:
    the lowest rank), so every rank reads about as much (dealing by count would give one rank every
    .bin of a dir whose files alternate .bin / .idx). The same on every rank."""
    shares: list[list[DataFile]] = [[] for _ in range(world)]
    loads = [(0, r) for r in range(world)]  # a heap of (bytes so far, rank)
    for f in sorted(files, key=lambda f: (-f.size, str(f.path))):
        load, r = heapq.heappop(loads)
        shares[r].append(f)
        heapq.heappush(loads, (load + f.size, r))
    return shares


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def throttle_sleep_s(block_bytes: int, block_seconds: float, rate_bytes_s: float) -> float:
    """Seconds to sleep after reading and hashing `block_bytes` in `block_seconds` so that the block
    takes block_bytes / rate in all. Per block, not averaged over the pass: a thread that was held
    up (a slow disk, a busy CPU) never makes up for it with a burst."""
    return max(0.0, block_bytes / rate_bytes_s - block_seconds)


class BackgroundVerifier:
    """Checks `files` (DataFile) in a daemon thread at most `rate_mb_s` MB/s (1 MB =
    1e6 bytes). `problem`: the first damaged or missing file found, as one phrase naming it; the pass
    stops there. `start` (int): the file to begin with (None: a random one, see the module doc)."""

    def __init__(self, files: list[DataFile], rate_mb_s: float, start: int | None = None):
        if rate_mb_s <= 0:
            raise ValueError(f"rate_mb_s ({rate_mb_s}) must be > 0")
        # Not the global `random`: its state is the run's (saved in checkpoints, pipeline/rng.py).
        k = random.SystemRandom().randrange(len(files)) if start is None and files else (start or 0)
        self.files = files[k:] + files[:k]
        self.rate_bytes_s = rate_mb_s * 1e6
        self.problem: str | None = None
        self.checked_files = 0
        self.checked_bytes = 0
        self.finished = threading.Event()  # the pass ended: every file checked, a problem found, or stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="data-verify", daemon=True)

    def start(self) -> BackgroundVerifier:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the pass within one block's sleep. Waits for the thread a little only: a read stuck on
        a lost mount must not hold up the end of the run (the thread is a daemon)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_WAIT_S)

    def _run(self) -> None:
        try:
            for path, digest, _ in self.files:
                if self._stop.is_set():
                    return
                if why := sha256_problem(path, digest, self._sha256):
                    if not self._stop.is_set():  # stopped mid-file: the digest is of a part
                        self.problem = checksum_line(path, why)
                    return
                self.checked_files += 1
        except OSError as e:  # unreadable now (permissions, a lost mount): damaged as far as training goes
            self.problem = f"{e.filename or path} cannot be read ({e.strerror or e})"
        finally:
            self.finished.set()

    def _sha256(self, path: Path) -> str:
        h, buf = hashlib.sha256(), bytearray(BLOCK_BYTES)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            offset = 0
            while not self._stop.is_set():
                t0 = time.perf_counter()
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
                if _DONTNEED is not None:
                    os.posix_fadvise(f.fileno(), offset, n, _DONTNEED)
                offset += n
                self.checked_bytes += n
                self._stop.wait(throttle_sleep_s(n, time.perf_counter() - t0, self.rate_bytes_s))
        return h.hexdigest()
