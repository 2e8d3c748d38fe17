"""Stop requests turned into "checkpoint at an agreed step, then exit": SIGTERM / SIGUSR1 (SLURM
preemption, `scancel`, `--signal=USR1@120`), SIGINT (Ctrl-C) and a dead launcher.

    stop = StopSignal()                         # first thing at start-up (the CLI entry)
    stop.stage("building the engine")           # between set-up stages
    stop.start_training(device, abort)          # once set-up is done
    if stop.agreed(): save; exit                # once per step, on every rank

During start-up there is nothing to checkpoint: a stop request raises StoppedDuringStartup (from the
handler, at once, or at the next stage boundary for a dead launcher); the CLI prints one line and
exits 130, the run-dir lock released by the normal exit path. A second stop request of any kind
(launchers relay a Ctrl-C as SIGINT or SIGTERM; see SAME_REQUEST_S and RELAYED_AS_OTHER_KIND_S for
what counts as second) ends the process at once, in start-up and in training alike.

A dead launcher: `torchrun` and `deepspeed` (its runner and `deepspeed.launcher.launch`) run in the
process group of the job, and the ranks inherit it; a shell with job control starts each job in a
group of its own. So the launcher processes of a rank are its ancestors in its own process group,
plus our `launch/*.sh`, which run the job in a group of its own to forward signals to it and name
themselves in PIPELINE_LAUNCHER_PIDS. A watch thread polls them every `WATCH_S` seconds (Linux has no
"parent died" notice for a grandparent, and PR_SET_PDEATHSIG would kill instead of checkpointing);
when one is gone (or its pid now names another process), the rank raises its stop flag.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.run_lock import pid_alive, process_start_time

WATCH_S = 0.5
# A launcher relays one stop request to its ranks: signals of one kind this close together are one
# request (torchrun re-sends the SIGINT the ranks got), not a second one.
SAME_REQUEST_S = 2.0
# A rank in its launcher's process group (the deepspeed launcher) gets the terminal's signal itself
# and again as SIGTERM from `deepspeed.launcher.launch`, measured up to seconds later on busy
# cores: there a signal of another kind is a second request only this long after the first. (A rank
# of torchrun, in a session of its own, gets only torchrun's signals: a second Ctrl-C arrives as
# SIGTERM, and counts after SAME_REQUEST_S.)
RELAYED_AS_OTHER_KIND_S = 10.0


class StoppedDuringStartup(BaseException):
    """A stop request before training began (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` in a library on the way swallows it)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"stopped during start-up at {stage} ({reason}); nothing was trained, "
                         "run the same command again")


def launcher_ancestors() -> list[tuple[int, str | None]]:
    """(pid, start time) of this process's ancestors inside its own process group (see above)."""
    if not Path("/proc").is_dir():
        return [(os.getppid(), None)]
    me = os.getpgrp()
    out, pid = [], os.getppid()
    while pid > 1:
        try:
            if os.getpgid(pid) != me:
                break
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        out.append((pid, process_start_time(pid)))
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    if not out and os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun starts each rank in a session of its own: its launcher is its parent. (Not for a
        # plain `python -m pipeline.train`, whose parent is a shell that may go, e.g. under nohup.)
        out.append((os.getppid(), process_start_time(os.getppid())))
    # launch/*.sh run the job in a group of their own and name themselves here (launch/run_job.sh).
    for pid in os.environ.get("PIPELINE_LAUNCHER_PIDS", "").split():
        start = process_start_time(int(pid))
        if start is not None:
            out.append((int(pid), start))
    return out


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, `scancel`, `--signal=USR1@120`), SIGINT (Ctrl-C) or a dead
    launcher -> stop after the current step with a checkpoint. Ranks notice at different moments, so
    `agreed()` all-reduces the flag and the reason (MAX) once per step: every rank stops after the same
    step, the save cannot deadlock, and every rank names the same reason (a dead launcher before a
    signal, which may be that launcher's last act). A second request stops at once, without a
    checkpoint: `abort(what)` returns the line to print (and releases what must be released), then
    the process exits with 130 right from the handler -- raising KeyboardInterrupt instead would
    leave the other ranks in a collective with a traceback each."""

    def __init__(self):
        self.received: str | None = None
        self.dead_launcher = 0  # its pid, once the watch thread saw it gone
        self.device = None
        self.abort: Callable[[str], str] | None = None  # set by start_training
        self.current_stage = "importing the libraries"
        self.starting = True  # until start_training / end_startup: a request raises StoppedDuringStartup
        self._first_at: float | None = None
        self._first_kind: int | None = None
        try:  # the parent (launcher) shares this process group: group signals reach both, and it relays
            self._relayed = os.getpgid(os.getppid()) == os.getpgrp()
        except OSError:
            self._relayed = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)
        self._ancestors = launcher_ancestors()
        threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def stage(self, name: str) -> None:
        """Start-up moves on to `name`; a dead launcher noticed meanwhile stops here."""
        self.current_stage = name
        if self.received is not None:
            raise StoppedDuringStartup(name, self.received)

    def start_training(self, device, abort: Callable[[str], str]) -> None:
        """From now on a stop request is answered with a checkpoint after the current step."""
        self.device, self.abort = device, abort
        self.starting = False

    def end_startup(self) -> None:
        """Start-up ended (trained or failed): a first request no longer raises (an error being
        reported keeps its own line); a second one still ends the process at once."""
        self.starting = False

    def _handle(self, signum, _frame) -> None:
        now, name = time.monotonic(), signal.Signals(signum).name
        if self._first_at is not None:
            window = (SAME_REQUEST_S if signum == self._first_kind or not self._relayed
                      else RELAYED_AS_OTHER_KIND_S)
            if now - self._first_at > window:
                self._exit_at_once("a second Ctrl-C" if signum == signal.SIGINT else f"a second stop signal ({name})")
            return  # the first request, relayed once more by a launcher
        self._first_at, self._first_kind = now, signum
        if self.received is None:
            self.received = name
        if self.starting:
            raise StoppedDuringStartup(self.current_stage, name)
        if signum == signal.SIGINT and _prints():
            print("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to stop "
                  "at once without one", flush=True)

    def _exit_at_once(self, what: str) -> None:
        if self.abort is not None:
            line = self.abort(what)
        else:
            line = (f"stopped at once during start-up at {self.current_stage} by {what}; nothing was trained, "
                    "run the same command again")
        if _prints():
            print(f"error: {line}", file=sys.stderr, flush=True)
        if self.abort is None:  # the run-dir lock is released by its atexit handler
            from pipeline.process_exit import end_process

            end_process(130, join_threads=False)
        os._exit(130)

    def _watch(self) -> None:
        while self.received is None:
            time.sleep(WATCH_S)
            gone = [pid for pid, start in self._ancestors if not pid_alive(pid, start)]
            if gone:
                self.dead_launcher = gone[0]
                self.received = f"the death of its launcher (pid {gone[0]})"

    def agreed(self, also: bool = False) -> bool:
        """Collective: True on every rank iff one rank has a stop request; `received` then names the
        same reason on every rank (a dead launcher first, else this rank's signal). `also`: another
        reason of this rank to stop after this step (damaged data found by the background check),
        folded into the same all-reduce, so it costs no collective of its own."""
        from pipeline.distributed.collectives import max_over_ranks  # torch only once training
        from pipeline.distributed.ranks import current

        mine = 2 if self.dead_launcher else 1 if self.received is not None or also else 0
        # (signal number, rank + 1) in one integer: MAX picks one rank's signal, named as it was received.
        signalled = (self._first_kind << 32 | current().rank + 1) if self._first_kind is not None else 0
        code, pid, who = max_over_ranks([mine, self.dead_launcher, signalled], self.device)
        if code == 2 and not self.dead_launcher:
            self.received = f"the death of its launcher (pid {pid})"  # seen by another rank first
        elif code and self.received is None and who:  # another rank's signal (a launcher relays it to each)
            self.received = f"{signal.Signals(who >> 32).name} to rank {(who & 0xFFFFFFFF) - 1}"
        return code > 0


def _prints() -> bool:
    """One line per node: local rank 0 prints."""
    return os.environ.get("LOCAL_RANK", "0") == "0"
