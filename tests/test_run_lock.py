"""The directory lock shared by training runs and prepare: real lock files, real processes, a real
read-only mount. (Two real training runs and two real prepares are in tests/train/test_run_safety.py
and tests/data/test_prepare_safety.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.errors import ConfigError
from pipeline.run_lock import LOCK_NAME, MALFORMED_GRACE_S, DirLock, process_start_time


def write_lock(directory, host, pid, age_s=0.0, start_time=None):
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "start_time": start_time, "job": "slurm job 77",
                                "what": "training run", "since": "earlier", "command": "python -m pipeline.train"}))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_held_by_a_live_process_on_this_host_is_refused_naming_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, socket.gethostname(), sleeper.pid, age_s=3600, start_time=process_start_time(sleeper.pid))
        with pytest.raises(ConfigError) as e:
            DirLock(tmp_path, "training run").acquire()
        assert str(e.value).startswith(f"{tmp_path} is in use by another training run: pid {sleeper.pid} on "
                                       f"{socket.gethostname()} (slurm job 77, since earlier")
        assert "wait for it to finish or stop it, or use another dir" in str(e.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Now its process is gone: the lock is stale and taken over, saying whose it was.
    lock = DirLock(tmp_path, "training run").acquire()
    assert f"pid {sleeper.pid}" in lock.note and "is gone" in lock.note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_held_while_its_heartbeat_is_fresh(tmp_path):
    write_lock(tmp_path, "node-b", 4242, age_s=5)
    with pytest.raises(ConfigError, match="in use by another training run: pid 4242 on node-b"):
        DirLock(tmp_path, "prepare", stale_after_s=60).acquire()
    write_lock(tmp_path, "node-b", 4242, age_s=120)
    lock = DirLock(tmp_path, "prepare", stale_after_s=60).acquire()
    assert "pid 4242 on node-b" in lock.note and "heartbeat is 120 s old" in lock.note
    # The holder's heartbeat keeps its lock fresh, so another taker keeps being refused.
    lock.release()


def test_an_empty_or_malformed_lock_is_named_as_such_and_taken_over(tmp_path):
    """A holder killed between creating and writing its lock leaves an empty file: never "in use by
    another ?: pid -1 on ?". A fresh one is given a moment (its writer may be mid-write), then judged."""
    path = tmp_path / LOCK_NAME
    for text, what in (("", "it is empty (a holder killed between creating and writing it)"),
                       ("[1, 2]", "it is not a lock record (no run or prepare writes such a file)")):
        path.write_text(text)  # fresh: judged after MALFORMED_GRACE_S
        t0 = time.monotonic()
        lock = DirLock(tmp_path, "training run").acquire()
        assert time.monotonic() - t0 >= MALFORMED_GRACE_S * 0.9
        assert lock.note.startswith(f"took over the malformed lock {path}: {what} and ")
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
    path.write_text("")
    old = time.time() - 600
    os.utime(path, (old, old))
    lock = DirLock(tmp_path, "prepare").acquire()  # an old empty lock is taken over at once
    assert "it is empty" in lock.note and "600 s old" in lock.note
    lock.release()


def test_heartbeat_refreshes_the_lock(tmp_path):
    lock = DirLock(tmp_path, "training run", heartbeat_s=0.05).acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.monotonic() + 30  # a loaded machine may run the heartbeat thread late
    while time.time() - lock.path.stat().st_mtime > 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - lock.path.stat().st_mtime < 100
    lock.release()


def test_unusable_dirs_are_one_line(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run dir should be")
    with pytest.raises(ConfigError, match=f"^{blocker} is not a directory"):
        DirLock(blocker, "run").acquire()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(ConfigError, match=f"^{ro} is not writable \\(Read-only file system\\)"):
            DirLock(ro, "run").acquire()
    finally:
        subprocess.run(["umount", str(ro)], check=True)
