"""The asynchronous checkpoint writer's policy, without ranks: buffers allocated once and reused, a
snapshot independent of later training, at most one save in flight, a failed save raised at the
next wait, and the host-memory check at start-up. (With real ranks and files: the kill-during-save,
SIGTERM and disk-full tests run asynchronous saves too, tests/checkpoint/test_checkpoint.py.)"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.checkpoint.async_writer import AsyncSaver, HostBuffers, host_memory_shortfall, mem_available_bytes
from pipeline.errors import CheckpointError


def test_buffers_are_allocated_once_and_hold_the_values_of_the_snapshot():
    weight, moment = torch.randn(64, 32), torch.randn(7)
    before = weight.clone()
    buffers = HostBuffers(pin=False)
    first = dict(buffers.snapshot([("weight/w", weight), ("exp_avg/w", moment[2:5])]))
    where = {k: t.data_ptr() for k, t in first.items()}
    weight.add_(1.0)  # training goes on after the snapshot
    assert torch.equal(first["weight/w"], before) and torch.equal(first["exp_avg/w"], moment[2:5])

    second = dict(buffers.snapshot([("weight/w", weight), ("exp_avg/w", moment[2:5])]))
    assert {k: t.data_ptr() for k, t in second.items()} == where  # reused, not reallocated
    assert torch.equal(second["weight/w"], weight)
    assert buffers.nbytes == (64 * 32 + 3) * 4


def test_at_most_one_save_in_flight_and_its_error_is_raised_at_the_next_wait():
    saver = AsyncSaver(pin=False)
    release, order = threading.Event(), []

    def slow():
        release.wait(10)
        order.append("first done")

    saver.submit(slow)
    assert saver.in_flight
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    saver.submit(lambda: order.append("second started"))  # waits for the first
    assert time.monotonic() - t0 >= 0.15
    saver.wait()
    assert order == ["first done", "second started"] and not saver.in_flight

    def fails():
        raise CheckpointError("could not save checkpoint step_4: disk full")

    saver.submit(fails)
    with pytest.raises(CheckpointError, match="disk full"):
        saver.wait()
    saver.wait()  # reported once; nothing in flight now
    with pytest.raises(CheckpointError, match="disk full"):  # or by the next save, before it starts
        saver.submit(fails)
        saver.submit(lambda: order.append("never"))
    assert "never" not in order


def test_host_memory_check_reads_memavailable_and_names_the_shortfall():
    available = mem_available_bytes()
    assert available is not None and available > 0  # Linux reports MemAvailable
    assert host_memory_shortfall(1 << 20, 2, available) is None
    short = host_memory_shortfall(available, 2, available)
    assert short == (f"asynchronous checkpoints need {2 * available / 2**30:.1f} GiB of host memory on this node "
                     f"({available / 2**30:.2f} GiB per rank x 2 ranks) but only {available / 2**30:.1f} GiB is "
                     "available (MemAvailable)")
    assert host_memory_shortfall(1 << 50, 1, None) is None  # unknown: not refused


def test_a_finished_save_is_reported_once_without_waiting_and_a_failed_one_is_left_for_wait():
    saver = AsyncSaver(pin=False)
    release = threading.Event()
    saver.submit(lambda: release.wait(10), name="step_2")
    assert saver.finished() is None and saver.in_flight  # still writing: no wait
    release.set()
    deadline = time.monotonic() + 10
    while (done := saver.finished()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done is not None and done[0] == "step_2" and done[1] >= 0
    assert saver.finished() is None and not saver.in_flight  # once
    assert saver.wait() is None  # nothing was in flight

    def fails():
        raise CheckpointError("could not save checkpoint step_4: disk full")

    saver.submit(fails, name="step_4")
    time.sleep(0.2)
    assert saver.finished() is None and saver.in_flight  # not reported as saved; wait() raises it
    with pytest.raises(CheckpointError, match="disk full"):
        saver.wait()
    saver.submit(lambda: None, name="step_6")
    assert saver.wait()[0] == "step_6"


def test_a_background_write_that_raises_still_ends_in_a_failed_save_not_a_wait(tmp_path):
    # A writer thread that raised before the agreement would leave the other ranks' threads waiting
    # in it; it meets them with its failure instead (with one rank the agreement is local).
    from pipeline.checkpoint.manager import CheckpointManager
    from pipeline.checkpoint.run_state import RunState

    def tensors():
        yield "weight/w", torch.ones(3)
        raise ValueError("not a tensor")

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, async_save=True)
    tag_dir = tmp_path / "checkpoints" / "step_2"
    tag_dir.mkdir(parents=True)
    error = manager._write_and_commit(tag_dir, RunState(step=2), {}, {}, tensors(), group="side group")
    assert "ValueError: not a tensor" in error and "no earlier checkpoint exists" in error
    assert not tag_dir.exists() and not (tmp_path / "checkpoints" / "latest").exists()
    with pytest.raises(ValueError, match="not a tensor"):  # synchronous: the ranks are out of step; it ends the run
        manager._write_and_commit(tag_dir, RunState(step=2), {}, {}, tensors())
