"""Stop requests turned into "checkpoint at an agreed step, then exit": SIGTERM / SIGUSR1 (SLURM
preemption, `scancel`, `--signal=USR1@120`), SIGINT (Ctrl-C) and a dead launcher.

    stop = StopSignal(device, abort)            # after the engine build
    if stop.agreed(): save; exit                # once per step, on every rank

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

import torch

from pipeline.distributed.collectives import any_rank
from pipeline.run_lock import pid_alive, process_start_time

WATCH_S = 0.5
# A launcher relays the same Ctrl-C to its ranks (torchrun re-sends SIGINT): SIGINTs this close
# together are one keypress, not a second Ctrl-C.
SAME_CTRL_C_S = 2.0


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
    `agreed()` all-reduces the flag (MAX) once per step: every rank stops after the same step and the
    save cannot deadlock. A second Ctrl-C stops at once, without a checkpoint: `abort()` returns the
    line to print (and releases what must be released), then the process exits with 130 right from
    the handler -- raising KeyboardInterrupt instead would leave the other ranks in a collective
    with a traceback each."""

    def __init__(self, device: torch.device, abort: Callable[[], str] = lambda: "stopped at once"):
        self.received: str | None = None
        self.device = device
        self.abort = abort
        self._first_int: float | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)
        self._ancestors = launcher_ancestors()
        threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_int is not None and now - self._first_int > SAME_CTRL_C_S:  # the second Ctrl-C
                line = self.abort()
                if os.environ.get("LOCAL_RANK", "0") == "0":
                    print(f"error: {line}", file=sys.stderr, flush=True)
                os._exit(130)
            if self._first_int is None:
                self._first_int = now
                if os.environ.get("LOCAL_RANK", "0") == "0":
                    print("Ctrl-C: stopping after this step with a checkpoint; press Ctrl-C again to stop "
                          "at once without one", flush=True)
        if self.received is None:
            self.received = signal.Signals(signum).name

    def _watch(self) -> None:
        while self.received is None:
            time.sleep(WATCH_S)
            gone = [pid for pid, start in self._ancestors if not pid_alive(pid, start)]
            if gone:
                self.received = f"the death of its launcher (pid {gone[0]})"

    def agreed(self, also: bool = False) -> bool:
        """`also`: another reason of this rank to stop after this step (damaged data found by the
        background check), folded into the same all-reduce, so it costs no collective of its own."""
        return any_rank(self.received is not None or also, self.device)
