"""Restart a failed training job by itself: `python -m pipeline.supervise [--restarts N] -- CMD ...`.

    python -m pipeline.supervise --restarts 3 -- deepspeed --num_gpus 8 --module pipeline.train --config run.yaml
    RESTARTS=3 bash launch/single_node.sh run.yaml          # the launch scripts wrap their command so

The job resumes from its last checkpoint each time (the trainer does that by itself). The policy
(`decide`, tested without ranks), what torchrun's `--max-restarts` and SLURM's requeue users expect:
- exit 0 (done, or stopped on a signal with a checkpoint) ends supervision;
- exit 2 (a user error: bad config or data) and 130 (stopped at once by a second stop signal) are
  not retried: the same command would fail alike, or the user asked to stop;
- a stop signal to the supervisor is forwarded to the job, which is then not restarted;
- anything else (a crash, a killed rank, a lost node, a hang ended by the watchdog) is restarted up
  to N times, after `backoff * 2**k` seconds (capped at MAX_BACKOFF_S);
- a job that fails twice in a row at the same step (the run's progress, read from its
  checkpoints/latest and metrics.jsonl after each attempt, did not move) is not restarted again: it
  would keep failing there.
Each restart and the final verdict are printed and appended to RUN/supervise.log. The job runs in a
process group of its own; INT, TERM, USR1 and HUP are forwarded to it, and the job's ranks watch this
process (PIPELINE_LAUNCHER_PIDS, pipeline/train/stop_signal.py). The attempt number (0, 1, ...) is
in PIPELINE_ATTEMPT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_USER_ERROR, EXIT_STOPPED_AT_ONCE = 2, 130
MAX_BACKOFF_S = 300.0
LOG_NAME = "supervise.log"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@dataclass
class Decision:
    restart: bool
    reason: str
    """What ended the attempt and why it is (not) restarted, for the console and supervise.log."""
    wait_s: float = 0.0


def describe_exit(code: int) -> str:
    """'exit code 1' or 'killed by SIGKILL' (subprocess gives -N for a signal; a shell 128+N)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def decide(code: int, restarts_done: int, max_restarts: int, backoff_s: float, step: int | None,
           last_failed_step: int | None, stopped: bool) -> Decision:
    """Whether to start the job again after an attempt that ended with `code` at progress `step`
    (None: unknown); `last_failed_step`: the progress after the previous failed attempt (None if
    there was none); `stopped`: a stop signal reached the supervisor."""
    what = describe_exit(code) + (f" at step {step}" if step is not None else "")
    if code == 0:
        return Decision(False, f"the job ended ({what})")
    if stopped:
        return Decision(False, f"the job was stopped on request ({what}); not restarted")
    if code == EXIT_USER_ERROR:
        return Decision(False, f"the job failed with a user error ({what}: see its error line); not restarted, "
                               "fix the config or data and run again")
    if code == EXIT_STOPPED_AT_ONCE:
        return Decision(False, f"the job was stopped at once ({what}); not restarted")
    if step is not None and step == last_failed_step:
        return Decision(False, f"the job failed ({what}) again at the same step as the previous attempt; "
                               "not restarted, it would keep failing there: see the errors above")
    if restarts_done >= max_restarts:
        return Decision(False, f"the job failed ({what}); no restarts left ({max_restarts} used)")
    wait = min(backoff_s * 2 ** restarts_done, MAX_BACKOFF_S)
    return Decision(True, f"the job failed ({what}); restart {restarts_done + 1} of {max_restarts} "
                          f"in {wait:.0f} s", wait)


def run_dir_of(cmd: list[str]) -> Path | None:
    """The run dir of a `pipeline.train --config C [key=value ...]` command (None if not one)."""
    if "--config" not in cmd:
        return None
    at = cmd.index("--config")
    overrides = [a for a in cmd[at + 2:] if "=" in a and not a.startswith("-")]
    from pipeline.train.config import load_run_config  # imports torch: only once a job has failed

    try:
        return Path(load_run_config(cmd[at + 1], overrides).run_dir)
    except Exception:  # noqa: BLE001 -- the job itself reports a bad config; we only lose the step
        return None


def progress_step(run_dir: Path | None) -> int | None:
    """How far the run got: the larger of its latest checkpoint's step and the last step in metrics.jsonl."""
    if run_dir is None:
        return None
    from pipeline.checkpoint.tags import read_latest, step_of_tag
    from pipeline.errors import ConfigError

    steps = []
    try:
        tag = read_latest(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    except ConfigError:  # a `latest` the job itself refuses (and names): metrics.jsonl still tells
        tag = None
    if tag is not None:
        steps.append(step_of_tag(tag))
    try:
        for line in reversed((run_dir / "metrics.jsonl").read_text().splitlines()):
            try:
                steps.append(int(json.loads(line)["step"]))
                break
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the crash, or a record without a step
    except OSError:
        pass
    return max(steps) if steps else None


class Supervisor:
    def __init__(self, cmd: list[str], max_restarts: int, backoff_s: float, run_dir: Path | None = None):
        self.cmd, self.max_restarts, self.backoff_s = cmd, max_restarts, backoff_s
        self.child: subprocess.Popen | None = None
        self.stopped: str | None = None
        self.run_dir = run_dir  # found from the command at the first failure when not given

    def _forward(self, signum, _frame) -> None:
        self.stopped = self.stopped or signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signum)
            except ProcessLookupError:
                pass

    def note(self, text: str) -> None:
        line = f"supervise: {text}"
        print(line, file=sys.stderr, flush=True)
        if self.run_dir is not None and self.run_dir.is_dir():
            with open(self.run_dir / LOG_NAME, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def run(self) -> int:
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        env = dict(os.environ)
        env["PIPELINE_LAUNCHER_PIDS"] = " ".join(filter(None, [str(os.getpid()), env.get("PIPELINE_LAUNCHER_PIDS")]))
        restarts, last_failed_step = 0, None
        while True:
            env["PIPELINE_ATTEMPT"] = str(restarts)
            self.child = subprocess.Popen(self.cmd, env=env, preexec_fn=os.setpgrp)  # a group of its own (3.10)
            code = self.child.wait()
            retryable = code not in (0, EXIT_USER_ERROR, EXIT_STOPPED_AT_ONCE) and self.stopped is None
            if code != 0 and self.run_dir is None:
                self.run_dir = run_dir_of(self.cmd)
            step = progress_step(self.run_dir) if retryable else None  # imports torch: only when it matters
            decision = decide(code, restarts, self.max_restarts, self.backoff_s, step, last_failed_step,
                              self.stopped is not None)
            if code != 0 or restarts:
                self.note(decision.reason)
            if not decision.restart:
                return code if code >= 0 else 128 - code
            last_failed_step, restarts = step, restarts + 1
            deadline = time.monotonic() + decision.wait_s
            while time.monotonic() < deadline and self.stopped is None:
                time.sleep(min(0.2, deadline - time.monotonic()))
            if self.stopped is not None:
                self.note(f"stopped by {self.stopped} before restart {restarts}; not restarted")
                return EXIT_STOPPED_AT_ONCE if self.stopped == "SIGINT" else 128 + signal.Signals[self.stopped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.supervise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=int(os.environ.get("RESTARTS", 3)),
                        help="restarts after a failure (default: RESTARTS, else 3)")
    parser.add_argument("--backoff", type=float, default=float(os.environ.get("RESTART_BACKOFF_S", 10)),
                        help="seconds before the first restart, doubled each time (default: RESTART_BACKOFF_S, "
                             "else 10)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the job's progress is read and supervise.log written (default: the "
                             "run_dir of the command's `--config` and overrides)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the job's command")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command: python -m pipeline.supervise [--restarts N] -- CMD ...")
    if args.restarts < 0 or args.backoff < 0:
        parser.error("--restarts and --backoff must be >= 0")
    return Supervisor(cmd, args.restarts, args.backoff, args.run_dir).run()


if __name__ == "__main__":
    sys.exit(main())
