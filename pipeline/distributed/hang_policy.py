"""When a run is hung, and which rank stopped it: the policy of the hang watchdog
(hang_watchdog.py), pure functions of the ranks' heartbeats and stack reports, tested without ranks.

Allowances (train.hang_timeout_s, default 600 s; train.hang_slow_timeout_s, default 3x that):
a rank may go `hang_timeout_s` without a heartbeat inside a training step, and `hang_slow_timeout_s`
in the phases that are legitimately long and uneven across ranks: start-up (engine build, resume),
the first step of a process (allocation, first-use builds), evaluation, downstream evaluation and
checkpoint saves. Like torchtitan's init vs. train timeouts and nvidia-resiliency-ext's initial vs.
rank heartbeat timeouts, but one knob plus a multiple suffices for most runs.

Hung: some rank has made no progress (no new heartbeat) for longer than the LONGEST allowance any
rank currently has. One rank in a slow phase (a save to a slow filesystem) therefore protects the
ranks waiting for it in a collective; once every rank is in a step, the step allowance applies.

Who stopped it (in a synchronous job every rank stalls shortly after one does, so staleness alone
cannot say): (1) ranks that do not answer the request to dump their stacks (a SIGSTOPped process,
a dead host); else (2) the ranks behind the others (lower step, or an earlier phase of the same
step: the others went on to the next phase and wait there); else (3) the ranks whose main thread is
not inside a collective (stuck in Python while the others wait); else every stalled rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SLOW_FACTOR = 3.0
# The process-group timeout is a backstop behind the watchdog: longer than any allowance, so the
# watchdog (which names the rank) fires first and gloo/NCCL's own timeout (which does not) never does.
COLLECTIVE_MARGIN_S = 60.0
# Order of the phases within one step: a rank that beat a later phase went on and waits for the others.
PHASES = ("startup", "step", "forward", "eval", "downstream", "save", "exit")
SLOW_PHASES = ("startup", "eval", "downstream", "save")
# Frames whose code is a collective (or waits in one): the main thread is then waiting for peers.
COLLECTIVE_FILES = ("torch/distributed/", "deepspeed/comm/")
# Frames left out of "where a rank is": libraries and our thin collective wrappers (the caller says more).
LIBRARY_FILES = ("/torch/", "/deepspeed/", "/threading.py", "/pipeline/distributed/collectives.py")


@dataclass(frozen=True)
class HangPolicy:
    timeout_s: float
    """Seconds without progress within a step; 0 = the watchdog is off."""
    slow_timeout_s: float
    """Seconds without progress in start-up, the first step, evaluation and saves."""

    @classmethod
    def of(cls, timeout_s: float, slow_timeout_s: float | None = None) -> HangPolicy:
        return cls(timeout_s, SLOW_FACTOR * timeout_s if slow_timeout_s is None else slow_timeout_s)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    @property
    def poll_s(self) -> float:
        """How often a watchdog looks: a hang is named within timeout + about this."""
        return min(max(self.timeout_s / 20, 0.25), 2.0)

    def allowance(self, phase: str, first_step: bool = False) -> float:
        if phase == "exit":  # finished ranks are not hung; the launcher sees them exit
            return math.inf
        return self.slow_timeout_s if phase in SLOW_PHASES or first_step else self.timeout_s

    def collective_timeout_s(self) -> float | None:
        """The process-group timeout derived from the allowances (None: the library default)."""
        return self.slow_timeout_s + COLLECTIVE_MARGIN_S if self.enabled else None


@dataclass(frozen=True)
class Beat:
    """One rank's last report of progress, as stored (one short string, one store set)."""

    step: int
    phase: str
    allowance_s: float
    time: float
    """Wall-clock time of the beat (time.time(); clocks of a cluster agree far better than the allowances)."""
    pid: int
    host: str

    def encode(self) -> str:
        return f"{self.step}|{self.phase}|{self.allowance_s}|{self.time:.3f}|{self.pid}|{self.host}"

    @classmethod
    def decode(cls, raw: str | bytes) -> Beat:
        text = raw.decode() if isinstance(raw, bytes) else raw
        step, phase, allowance, when, pid, host = text.split("|", 5)
        return cls(int(step), phase, float(allowance), float(when), int(pid), host)

    @property
    def progress(self) -> tuple[int, int]:
        return self.step, PHASES.index(self.phase) if self.phase in PHASES else 0


def overdue_ranks(beats: dict[int, Beat | None], now: float, started: float, startup_allowance: float) -> list[int]:
    """Ranks without progress for longer than the longest allowance any rank has now (module
    docstring). A rank that has not beaten yet counts as in start-up since `started`."""
    longest = max([b.allowance_s for b in beats.values() if b is not None] +
                  ([startup_allowance] if None in beats.values() else []))
    return [r for r, b in sorted(beats.items()) if now - (b.time if b is not None else started) > longest]


@dataclass(frozen=True)
class Report:
    """What a live rank's watchdog says when asked: where its main thread is."""

    where: str
    """The innermost frame outside torch/deepspeed: `file:line in function`."""
    in_collective: bool
    """The main thread waits inside a collective (for its peers)."""

    def to_dict(self) -> dict:
        return asdict(self)


def report_of(frames: list[tuple[str, int, str]]) -> Report:
    """`frames`: the main thread's stack, outermost first, as (filename, line, function)."""
    if not frames:
        return Report("?", False)
    in_collective = any(c in frames[-1][0].replace("\\", "/") for c in COLLECTIVE_FILES)
    ours = [f for f in frames if not any(lib in f[0].replace("\\", "/") for lib in LIBRARY_FILES)] or frames
    filename, line, function = ours[-1]
    short = filename.replace("\\", "/")
    if "/pipeline/" in short:
        short = "pipeline/" + short.rsplit("/pipeline/", 1)[1]
    return Report(f"{short}:{line} in {function}", in_collective)


@dataclass(frozen=True)
class Verdict:
    culprits: list[int]
    line: str


def name_culprits(beats: dict[int, Beat | None], reports: dict[int, Report | None], stopped: dict[int, str],
                  now: float, dump_dir: str) -> Verdict:
    """The one line naming the rank(s) that stopped the job (module docstring, rules 1-3).
    `reports`: None for ranks that did not answer; `stopped`: why a non-answering rank did not
    (e.g. "stopped (process state T: SIGSTOP)"), where known."""
    silent = [r for r, rep in sorted(reports.items()) if rep is None]
    live = [r for r in sorted(reports) if reports[r] is not None]
    if silent:
        culprits = silent
    else:
        known = {r: b.progress for r, b in beats.items() if b is not None}
        behind = [r for r in sorted(beats) if beats[r] is None or (known and known[r] == min(known.values()))]
        stuck_in_python = [r for r in live if not reports[r].in_collective]
        if len(behind) < len(beats):
            culprits = behind
        elif 0 < len(stuck_in_python) < len(live):
            culprits = stuck_in_python
        else:
            culprits = sorted(beats)
    parts = []
    for r in culprits:
        b = beats.get(r)
        doing = (f"at step {b.step} in {b.phase}, no progress for {now - b.time:.0f} s"
                 if b is not None else "in start-up, no heartbeat yet")
        if reports.get(r) is None:
            state = stopped.get(r, "not answering (stopped, or its host is gone)")
        else:
            rep = reports[r]
            state = f"{'waiting in a collective' if rep.in_collective else 'stuck'} at {rep.where}"
        parts.append(f"rank {r} {doing}: {state}")
    others = [r for r in live if r not in culprits]
    waiting = f"; rank(s) {', '.join(map(str, others))} waited for it" if others else ""
    stacks = (f"; Python stacks of rank(s) {', '.join(map(str, live))} in {dump_dir}" if live else "")
    noun = "rank" if len(culprits) == 1 else "ranks"
    line = (f"hung: {noun} {', '.join(map(str, culprits))} stopped making progress ({'; '.join(parts)}){waiting}"
            f"{stacks}; run the same command again to resume from the last checkpoint")
    return Verdict(culprits, line)
