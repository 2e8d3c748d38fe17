"""Hang detection: every rank reports progress (a heartbeat) and a watchdog thread ends a job whose
ranks stopped making progress, naming the rank(s) that stopped it (policy: hang_policy.py).

    watchdog = HangWatchdog(HangPolicy.of(600), ranks, run_dir)   # right after init_distributed
    watchdog.beat("step", step)                                   # at step boundaries and phase changes
    watchdog.stop()                                               # at the end of the run

The side channel is the rendezvous store (a TCPStore at MASTER_ADDR:MASTER_PORT), through a client
of its own with a short timeout: store requests are answered by the store's server thread whatever
the ranks' collectives are doing, every launcher provides one (torchrun's agent hosts it, under
`deepspeed` or a plain `python` rank 0 does), and it needs no shared filesystem. Files in the run dir
were the alternative: a stuck NFS server (one cause of hangs) would then stall the watchdog too, and
NFS attribute caching delays what other nodes see. The store cannot help when its host stops (rank 0
outside torchrun): a rank whose store stops answering for the step allowance names it as the cause.

Cost: a beat (about three per step: step, forward, and eval / save when they run) is noted in this
process (a few microseconds; the training thread never waits on the store); the watch thread wakes
every `policy.poll_s` (<= 2 s) and sends the newest beat (one store set, one-way), after a look at
its own connection to the store (the store may be gone: see `SideStore.alive`), then one `check`
for a verdict, and on the coordinating rank (rank 0) one `multi_get` of all beats. It never opens
another connection to the store: a connection that closes without a request (a plain TCP probe)
wedges another client's next request on torch 2.13's store server, libuv or not (one probe in ~50
suffices; tests/distributed/test_side_store.py), and that client is torchrun's own rendezvous
heartbeat or a rank's new_group.

When the coordinator finds a rank overdue it claims the verdict key (first claim wins); every rank's
watchdog that can still run then writes its Python stacks (faulthandler, all threads) to
`RUN/hang/<step>-<time>/rank<R>.txt` and where its main thread is; the coordinator names the
culprits in one line (`error: hung: ...`), SIGKILLs a culprit that is stopped (process state T)
on its own host, so that the launcher does not wait its grace period (torchrun: 30 s) for a
process that cannot exit, and every live rank ends with EXIT_HUNG through process_exit.end_process:
the main thread stays blocked, atexit handlers (the run-dir lock) run, gloo cannot abort the exit.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from pipeline.distributed.hang_policy import Beat, HangPolicy, Report, name_culprits, overdue_ranks, report_of
from pipeline.distributed.ranks import RankView
from pipeline.process_exit import end_process

EXIT_HUNG = 4
STORE_TIMEOUT_S = 10.0
# Live ranks answer a verdict within a poll; the coordinator waits this much longer for silent ones.
ANSWER_GRACE_S = 1.5
# If the process cannot end cleanly (an atexit handler that blocks), it ends this much later anyway.
EXIT_BACKSTOP_S = 10.0


class SideStore:
    """A client of the rendezvous store of its own (keys under a prefix per launch attempt), and a
    look at whether the store's host is still there that sends nothing to it.

    A request to a store whose host is gone makes c10d log a C++ stack on stderr (e.g. torchrun
    killed, its ranks saving before they exit, or rank 0 hosting the store ended first). `alive()`
    peeks at this client's own socket instead: a host whose process ended has closed the connection
    (EOF or reset). A host that vanished from the network is not seen here; its requests time out."""

    def __init__(self, address: tuple[str, int], timeout_s: float):
        before = _socket_fds()
        client = dist.TCPStore(address[0], address[1], is_master=False,
                               timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self._client = client  # the PrefixStore below does not keep it alive on every torch version
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(f"pipeline_hang/{attempt}/", client)
        self._conn = _new_connection_to(address[1], before)

    def alive(self) -> bool:
        if self._conn is None:  # not found (no /proc): requests tell, at the cost of a logged stack
            return True
        try:
            return self._conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:  # open, nothing to read: the usual answer
            return True
        except OSError:  # reset
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()  # our duplicate of the descriptor; the client keeps its own
            self._conn = None


def _socket_fds() -> set[int]:
    fds = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:  # closed meanwhile
            pass
    return fds


def _new_connection_to(port: int, before: set[int]) -> socket.socket | None:
    """The one socket opened since `before` whose peer listens on `port` (the store client's), as a
    duplicate of its descriptor; None unless exactly one (another thread opened one too)."""
    found = []
    for fd in _socket_fds() - before:
        try:
            conn = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            peer = conn.getpeername()
        except OSError:
            peer = None
        if isinstance(peer, tuple) and peer[1] == port:
            found.append(conn)
        else:
            conn.close()
    if len(found) != 1:
        for conn in found:
            conn.close()
        return None
    return found[0]


def process_state(pid: int) -> str | None:
    """The state letter of a process on this host (R, S, D, T ...), None if gone or unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def main_thread_report() -> Report:
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = traceback.extract_stack(frame) if frame is not None else []
    return report_of([(f.filename, f.lineno, f.name) for f in stack])


class HangWatchdog:
    """Heartbeats of this rank and the watch thread (module docstring). Off (every call a no-op) for
    one rank or `policy.enabled` False."""

    def __init__(self, policy: HangPolicy, ranks: RankView, run_dir: Path):
        self.policy, self.rank, self.world, self.run_dir = policy, ranks.rank, ranks.world, Path(run_dir)
        self.store: dist.Store | None = None
        self.side: SideStore | None = None
        self.host = socket.gethostname()
        self._store_address = (os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0")))
        self._beat: Beat | None = None
        self._sent: Beat | None = None
        self.first_step: int | None = None
        self.started = time.time()
        self._stopped = threading.Event()
        if not policy.enabled or ranks.world < 2:
            return
        try:
            if not self._store_address[0] or not self._store_address[1]:
                raise KeyError("MASTER_ADDR and MASTER_PORT are not both set")
            self.side = SideStore(self._store_address, STORE_TIMEOUT_S)
            self.store = self.side.store
        except (KeyError, RuntimeError, dist.DistError) as e:  # a process group started by the caller
            if ranks.rank == 0:
                print(f"warning: no hang watchdog: the rendezvous store at MASTER_ADDR:MASTER_PORT cannot be "
                      f"reached ({e!r}); set both to the process group's store", file=sys.stderr, flush=True)
            return
        self.beat("startup", 0)
        self._send_beat()
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self, phase: str, step: int) -> None:
        """This rank is now in `phase` of `step`: noted here, sent by the watch thread (module docstring)."""
        if self.store is None:
            return
        if phase in ("step", "forward") and self.first_step is None:
            self.first_step = step
        first = phase in ("step", "forward") and step == self.first_step
        self._beat = Beat(step, phase, self.policy.allowance(phase, first), time.time(), os.getpid(), self.host)

    def stop(self) -> None:
        """The run ended (or failed in a way it reports itself): no longer watched."""
        if self.store is not None and not self._stopped.is_set():
            self._stopped.set()
            self.beat("exit", 0)
            if self._store_reachable():
                try:
                    self._send_beat()
                except (RuntimeError, dist.DistError):
                    pass

    def _send_beat(self) -> None:
        beat = self._beat
        if beat is not self._sent:
            self.store.set(f"beat/{self.rank}", beat.encode())
            self._sent = beat

    def _store_reachable(self) -> bool:
        return self.side is not None and self.side.alive()

    # --- the watch thread ------------------------------------------------------------------------
    def _watch(self) -> None:
        store_ok = time.time()
        while not self._stopped.wait(self.policy.poll_s):
            try:
                if not self._store_reachable():
                    raise ConnectionError(f"no store at {self._store_address[0]}:{self._store_address[1]}")
                self._send_beat()
                if self.store.check(["verdict"]):
                    return self._answer()
                if self.rank == 0:
                    self.store.set("watch", str(time.time()))
                if (self.rank == 0 or self._coordinator_gone()) and self._look():
                    return self._answer()
                store_ok = time.time()
            except (OSError, RuntimeError, dist.DistError) as e:
                if self._stopped.is_set():
                    return
                if time.time() - store_ok > self.policy.timeout_s:
                    return self._store_gone(e)

    def _coordinator_gone(self) -> bool:
        """Rank 0's watch thread has not looked for a while (rank 0 stopped): any rank looks."""
        takeover_s = max(5 * self.policy.poll_s, 5.0)
        if not self.store.check(["watch"]):
            return time.time() - self.started > self.policy.slow_timeout_s
        return time.time() - float(self.store.get("watch")) > takeover_s

    def _beats(self) -> dict[int, Beat | None]:
        keys = [f"beat/{r}" for r in range(self.world)]
        if self.store.check(keys):
            return {r: Beat.decode(raw) for r, raw in enumerate(self.store.multi_get(keys))}
        return {r: Beat.decode(self.store.get(k)) if self.store.check([k]) else None for r, k in enumerate(keys)}

    def _look(self) -> bool:
        """Claims the verdict when a rank is overdue; True when a verdict now stands."""
        beats = self._beats()
        if not overdue_ranks(beats, time.time(), self.started, self.policy.slow_timeout_s):
            return False
        step = max(b.step for b in beats.values() if b is not None)
        name = f"step{step}-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}"
        self.store.compare_set("verdict", "", f"{self.rank}|{name}")
        return True

    def _answer(self) -> None:
        """A verdict stands: dump this rank's stacks, report, then (the coordinator) name the culprits; exit."""
        self._stopped.set()
        try:  # whatever fails on the way (the store, the disk), this rank still ends
            owner, name = self.store.get("verdict").decode().split("|", 1)
            dump_dir = self.run_dir / "hang" / name
            report = self._dump(dump_dir)
            self.store.set(f"report/{self.rank}", json.dumps(report.to_dict()))
            if int(owner) == self.rank:
                line = self._judge(dump_dir)
                print(f"error: {line}", file=sys.stderr, flush=True)
                self.store.set("line", line)
            else:
                deadline = time.time() + self._answer_wait_s() + 5
                while not self.store.check(["line"]) and time.time() < deadline:
                    time.sleep(0.1)
        finally:
            self._exit()

    def _dump(self, dump_dir: Path) -> Report:
        """This rank's stacks in `dump_dir` (if the disk lets us: the report matters more); its report."""
        report = main_thread_report()
        path = dump_dir / f"rank{self.rank}.txt"
        tmp = path.with_name(path.name + ".tmp")
        try:
            dump_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(f"rank {self.rank} pid {os.getpid()} on {socket.gethostname()}; main thread at "
                        f"{report.where}{' (in a collective)' if report.in_collective else ''}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            os.replace(tmp, path)
        except OSError as e:
            print(f"warning: rank {self.rank} could not write its stacks to {path}: {e}", file=sys.stderr, flush=True)
        return report

    def _answer_wait_s(self) -> float:
        return 2 * self.policy.poll_s + ANSWER_GRACE_S

    def _judge(self, dump_dir: Path) -> str:
        now = time.time()  # the verdict's time: what the line reports
        keys = {r: f"report/{r}" for r in range(self.world)}
        deadline = now + self._answer_wait_s()
        while not self.store.check(list(keys.values())) and time.time() < deadline:
            time.sleep(0.1)
        reports = {r: Report(**json.loads(self.store.get(k))) if self.store.check([k]) else None
                   for r, k in keys.items()}
        beats = self._beats()
        stopped = {}
        for r, rep in reports.items():
            b = beats.get(r)
            if rep is None and b is not None and b.host == socket.gethostname() and process_state(b.pid) == "T":
                os.kill(b.pid, signal.SIGKILL)  # it cannot exit by itself; the launcher would wait for it
                stopped[r] = f"stopped, process state T as after SIGSTOP, pid {b.pid} killed"
        verdict = name_culprits(beats, reports, stopped, now, str(dump_dir))
        try:
            (dump_dir / "verdict.txt").write_text(verdict.line + "\n")
        except OSError:  # the line is printed all the same
            pass
        return verdict.line

    def _store_gone(self, error: Exception) -> None:
        self._stopped.set()
        self._dump(self.run_dir / "hang" / f"store-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}")
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        print(f"error: hung: rank {self.rank} lost the rendezvous store at {where} for over "
              f"{self.policy.timeout_s:.0f} s ({str(error).splitlines()[0]}); its host (rank 0 under deepspeed or "
              "python, the launcher under torchrun) stopped or died; run the same command again to resume "
              "from the last checkpoint", file=sys.stderr, flush=True)
        self._exit()

    def _exit(self) -> None:
        backstop = threading.Timer(EXIT_BACKSTOP_S, os._exit, (EXIT_HUNG,))
        backstop.daemon = True
        backstop.start()
        end_process(EXIT_HUNG)
