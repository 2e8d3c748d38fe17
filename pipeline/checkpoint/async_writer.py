"""Asynchronous checkpoints: the training step pays only for a snapshot of this rank's state into
host memory; the files, their checksums and the commit are written by a background thread.

    saver = AsyncSaver(pin=torch.cuda.is_available())
    tensors = saver.buffers.snapshot(owned_tensors(module, saver.gather))    # main thread, collective
    saver.submit(lambda: write_and_commit(tensors))                          # waits for the one in flight
    ...
    saver.wait()                                                              # final save, stop, error

What the step pays: each parameter's fp32 state is all-gathered into one reused device buffer
(zero_state.GatherBuffer), and `HostBuffers.snapshot` copies each tensor this rank writes
(format.owned_tensors: its share of the fp32 weights, Adam moments and rank 0's buffers) into one
host tensor per key, allocated at the first save and reused by every later one (pinned on CUDA, so
the device-to-host copies run asynchronously and at full bandwidth). No memory is allocated from the
second save on: fresh pages cost more than the copies. The gathers of owned_tensors are collectives on
the default group, so they run on the main thread, at the same point on every rank, like any
other collective of the loop. The files are then serialised from those buffers by the same code a
synchronous save runs (format.write_owned / write_index, manager.CheckpointManager._write_and_commit),
so both write the same bytes.

Agreement without deadlock: the background threads of all ranks agree (every rank's files and
checksums meet on rank 0, which writes index.json, trainer_state.json and `latest` only when every
rank wrote its files; then rank 0's verdict reaches every rank) over a *side* gloo group of all ranks
(process_group.side_group_of_all_ranks), used by nothing else. The training loop's collectives run
on the default group from the main thread; the two groups share no connection and no sequence
number, so neither can consume the other's messages or wait on it (the design of torch's
distributed-checkpoint async_save, which torchtitan uses). The side group is made once, on the
main thread, at the first asynchronous save (a collective every rank reaches there). Each rank has
at most one save in flight and every rank's thread runs the same collectives in the same order
(one save's), so the side group's calls always match up. The main thread waits for its own thread
only at points every rank reaches in the same order (the next save, the end of the run, a stop,
an error), so a thread never waits for a main thread that waits for it.

A rank that dies mid-write: `latest` still names the previous complete checkpoint (trainer_state.json
and `latest` are written only after every rank's files; a dead peer makes the side group's
collective fail on the others, and their threads report it at the next wait). The thread is a daemon:
a process that ends without waiting (SIGKILL, a crash) leaves an incomplete step_N/ that the next
save or resume treats as a leftover, as after a synchronous save killed half-way.

When the host lacks the memory the buffers need (MemAvailable in /proc/meminfo, for every rank on
the node), `train.async_save` unset falls back to synchronous saves with one line; set true, the run
stops at start-up with one line naming what to lower.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pipeline.checkpoint.zero_state import GatherBuffer


class HostBuffers:
    """One host tensor per checkpoint key, allocated at the first snapshot and reused by every later
    one (a new tensor only if a key's shape or dtype changed, which a run's model does not)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def snapshot(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Copy every (key, tensor) into its buffer; returns (key, buffer) in the same order. The
        buffers hold the values of this moment however the sources change afterwards."""
        out = []
        for key, t in tensors:
            buf = self.tensors.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self.tensors[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
            buf.copy_(t, non_blocking=self.pin and t.is_cuda)
            out.append((key, buf))
        if self.pin and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return out


class AsyncSaver:
    """At most one background save at a time: `submit` waits for the one in flight first; `wait`
    returns once none is in flight, raising what the last one raised."""

    def __init__(self, pin: bool):
        self.buffers = HostBuffers(pin)
        self.gather = GatherBuffer()  # the device-side scratch the snapshot gathers each parameter into
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._name, self._seconds = "", 0.0  # the save in flight, and how long its thread ran

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def submit(self, job: Callable[[], None], name: str = "checkpoint-writer") -> None:
        self.wait()
        self._error, self._name = None, name
        start = time.monotonic()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # re-raised on the main thread by wait()
                self._error = e
            self._seconds = time.monotonic() - start

        # A daemon: a process that ends without wait() (killed, crashed) must not hang on it; its
        # checkpoint stays incomplete and `latest` on the previous one.
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def finished(self) -> tuple[str, float] | None:
        """(name, seconds in the background) of a save that has just completed successfully, once;
        else None, without waiting. Local to this rank; a failed save is left for `wait()`, which
        every rank calls at the same point."""
        if self._thread is None or self._thread.is_alive() or self._error is not None:
            return None
        self._thread.join()
        self._thread = None
        return self._name, self._seconds

    def wait(self) -> tuple[str, float] | None:
        """Returns once none is in flight: (name, seconds) of the save that was, None if none was."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._name, self._seconds


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of memory available to new allocations; None where it does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def local_world_size() -> int:
    """Ranks on this node (torchrun and the deepspeed launcher set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def host_memory_shortfall(per_rank_bytes: int, ranks_on_node: int, available: int | None) -> str | None:
    """None when the node has the host memory every rank's buffers need, else what is missing."""
    need = per_rank_bytes * ranks_on_node
    if available is None or need <= available:
        return None
    gib = 1 << 30
    return (f"asynchronous checkpoints need {need / gib:.1f} GiB of host memory on this node "
            f"({per_rank_bytes / gib:.2f} GiB per rank x {ranks_on_node} ranks) but only {available / gib:.1f} GiB "
            "is available (MemAvailable)")
