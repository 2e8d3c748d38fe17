"""One writer per directory: the lock a training run holds on its run dir and `prepare` on its
output dir.

    with DirLock(run_dir, what="training run"):   # or lock = DirLock(...).acquire(); lock.release()
        ...

Why a lock *file* and not `fcntl.flock`: flock/lockf locks are not seen across nodes on many NFS
and Lustre setups (and vanish silently when a client loses its lease), while `O_CREAT | O_EXCL`
is atomic on every shared filesystem we target (NFSv3+, Lustre, GPFS, local). The file says who
holds it (host, pid, process start time, launcher / job id, command) and its mtime is a heartbeat
the holder refreshes every `HEARTBEAT_S` seconds from a daemon thread.

A crashed holder must not block forever, so a lock is *stale* when
- its host is this host and its pid is gone (or is another process that reused the pid: the
  recorded start time differs), or
- its host is another host and its heartbeat is older than `stale_after_s` (default 120 s). The
  age is measured against the filesystem's own clock (mtime of a probe file written next to it),
  so clock skew between nodes does not matter.
- it is empty or not a lock record (a holder killed between creating and writing it, or a file
  someone else wrote) and older than `MALFORMED_GRACE_S`: the create-to-write window of a live
  holder is microseconds, so a younger one is waited for, then judged again.
A stale lock is taken over (renamed away, then created anew) with a message saying whose it was.
An unreadable lock (no permission) is refused naming the file.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from pipeline.errors import ConfigError

LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
MALFORMED_GRACE_S = 2.0  # an empty lock younger than this may be a live holder between create and write
STALE_AFTER_S = float(os.environ.get("PIPELINE_LOCK_STALE_S", 120))


def process_start_time(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart;
    None when it is gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is the state, fields[19] the start time
    return None if fields[0] in ("Z", "X") else fields[19]


def pid_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = process_start_time(pid)
    if not Path("/proc").is_dir():
        return True
    return now is not None and (start_time is None or now == start_time)


def launcher_id() -> str:
    """The job this process belongs to, as the scheduler / launcher names it."""
    for var, name in (("SLURM_JOB_ID", "slurm job"), ("TORCHELASTIC_RUN_ID", "torchrun run"),
                      ("PBS_JOBID", "pbs job"), ("LSB_JOBID", "lsf job")):
        if os.environ.get(var):
            return f"{name} {os.environ[var]}"
    return "no launcher job id"


def _io_error(path: Path, what: str, e: OSError) -> ConfigError:
    """One line for a directory we cannot write into (read-only, a file, no permission, full)."""
    if e.errno == errno.ENOTDIR or (path.exists() and not path.is_dir()):
        return ConfigError(f"{path} is not a directory (a file is in the way); choose another {what} dir "
                           "or move that file")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"{path} is not writable ({os.strerror(e.errno)}); choose a writable {what} dir "
                           "or fix its permissions / mount")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConfigError(f"no space left to write in {path} ({os.strerror(e.errno)}); free space or "
                           f"choose another {what} dir")
    return ConfigError(f"cannot write in {path} ({e.strerror or e}); choose another {what} dir")


class DirLock:
    def __init__(self, directory: str | Path, what: str, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what  # "training run" / "prepare": names the holder's kind in messages
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.note: str | None = None  # set when a stale lock was taken over
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- acquire / release ------------------------------------------------------------------
    def acquire(self) -> DirLock:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _io_error(self.dir, self.what, e) from None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()),
            "job": launcher_id(),
            "what": self.what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500],
        }
        waited = False  # for an empty lock's writer, once
        for _ in range(3):  # a takeover can race with another taker: retry from the top
            if self._create(record):
                self._record = record
                self._start_heartbeat()
                atexit.register(self.release)  # also on errors after this point; not on SIGKILL (stale then)
                return self
            holder = self._read()
            if holder is None:
                continue  # released between our create and our read
            if holder.get("malformed") and not waited and (age := self._age_s()) < MALFORMED_GRACE_S:
                time.sleep(MALFORMED_GRACE_S - age)  # its writer may still be writing: judge it again
                waited = True
                continue
            stale = self._stale_reason(holder)
            if stale is None:
                raise ConfigError(self._held_message(holder))
            self._take_over(holder, stale)
        raise ConfigError(f"{self.path}: could not take the lock (another process keeps taking it); "
                          f"check which {self.what} uses {self.dir}")

    def release(self) -> None:
        atexit.unregister(self.release)  # released now: nothing left for exit to do
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._record is not None and self._read() == self._record:  # never remove another's lock
            self.path.unlink(missing_ok=True)
        self._record = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- internals --------------------------------------------------------------------------
    def _create(self, record: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise _io_error(self.dir, self.what, e) from None
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise _io_error(self.dir, self.what, e) from None
        os.close(fd)
        return True

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"{self.path} (the lock of {self.dir}) cannot be read ({e.strerror or e}); fix its "
                              f"permissions, or delete it if no {self.what} uses {self.dir}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "pid" not in record:
            # A holder killed between create and write leaves an empty file: judged by its age alone.
            return {"malformed": "empty" if not text.strip() else "not a lock record"}
        return record

    def _age_s(self) -> float:
        """Seconds since the lock's last heartbeat, on the filesystem's clock."""
        probe = self.dir / f".lock-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            probe.write_text("")
            now = probe.stat().st_mtime
            probe.unlink()
        except OSError:
            now = time.time()
        try:
            return now - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("malformed"):
            how = ("a holder killed between creating and writing it" if holder["malformed"] == "empty"
                   else "no run or prepare writes such a file")
            return f"it is {holder['malformed']} ({how}) and {self._age_s():.0f} s old"
        if holder.get("host") == socket.gethostname():
            if not pid_alive(int(holder.get("pid", -1)), holder.get("start_time")):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        age = self._age_s()
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _take_over(self, holder: dict, reason: str) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed or took it: retry
        try:
            taken = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            taken = None
        if isinstance(taken, dict) and taken != holder and "pid" in taken:
            # We moved a lock that was created after we judged the old one stale: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        if holder.get("malformed"):
            self.note = f"took over the malformed lock {self.path}: {reason}"
            return
        self.note = (f"took over the stale lock {self.path} of {holder.get('what')} pid {holder.get('pid')} on "
                     f"{holder.get('host')} ({holder.get('job')}): {reason}")

    def _held_message(self, holder: dict) -> str:
        return (f"{self.dir} is in use by another {holder.get('what', self.what)}: pid {holder.get('pid')} on "
                f"{holder.get('host')} ({holder.get('job')}, since {holder.get('since')}, "
                f"`{str(holder.get('command', ''))[:120]}`); wait for it to finish or stop it, or use another dir. "
                f"If it is gone, delete {self.path} (or wait {self.stale_after_s:.0f} s after its last heartbeat)")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:
                    pass  # a missing lock is reported by whoever takes it; the run goes on

        self._thread = threading.Thread(target=beat, name="dir-lock-heartbeat", daemon=True)
        self._thread.start()


def hold_run_dir(run_dir: Path, rank: int) -> DirLock | None:
    """Rank 0 takes the run dir's lock (also the check that run_dir is a writable directory); every
    rank raises its ConfigError. A collective when several ranks run."""
    from pipeline.distributed.collectives import agree_on_error  # torch only where a run needs it
    from pipeline.distributed.ranks import RankView

    return agree_on_error(lambda: DirLock(run_dir, "training run").acquire(), RankView(rank=rank))
