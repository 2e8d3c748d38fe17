"""The restart policy of pipeline/supervise.py, without ranks: the decision table, then the supervisor
on real (small, non-training) processes and real signals. The real training run restarted after a
crash is in tests/train/test_launch.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.supervise import decide, describe_exit, progress_step
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env


def supervise(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.supervise", *args], env=rank_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_decide():
    assert not decide(0, 0, 3, 10, None, None, False).restart
    first = decide(1, 0, 3, 10, 5, None, False)
    assert first.restart and first.wait_s == 10 and "exit code 1 at step 5" in first.reason
    assert decide(-9, 2, 3, 10, 7, 5, False).wait_s == 40  # doubled per restart
    assert "killed by SIGKILL" in decide(-9, 2, 3, 10, 7, 5, False).reason
    assert decide(1, 9, 10, 100, 7, 5, False).wait_s == 300  # capped
    user = decide(2, 0, 3, 10, None, None, False)
    assert not user.restart and "user error" in user.reason
    assert not decide(130, 0, 3, 10, 4, None, False).restart
    assert not decide(1, 0, 3, 10, 4, None, True).restart  # stopped on request: its end is not a failure
    same = decide(1, 1, 3, 10, 5, 5, False)
    assert not same.restart and "again at the same step" in same.reason
    assert decide(1, 1, 3, 10, 6, 5, False).restart  # progress since the last failure
    assert decide(1, 1, 3, 10, None, None, False).restart  # progress unknown: only the count limits
    spent = decide(1, 3, 3, 10, 9, 5, False)
    assert not spent.restart and "no restarts left (3 used)" in spent.reason
    assert describe_exit(-15) == "killed by SIGTERM" and describe_exit(3) == "exit code 3"


def test_progress_step_reads_checkpoints_and_metrics(tmp_path):
    assert progress_step(tmp_path) is None and progress_step(None) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss/total": 1.0}\n{"step": 4, "eval/lo')  # cut by a crash
    assert progress_step(tmp_path) == 3
    done = tmp_path / "checkpoints" / "step_6"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text(json.dumps({"step": 6}))
    (tmp_path / "checkpoints" / "latest").write_text("step_6")
    assert progress_step(tmp_path) == 6


# A job that fails with EXIT (attempts listed in FAIL) and writes its progress STEP to metrics.jsonl.
JOB = """
import json, os, sys
attempt = int(os.environ["PIPELINE_ATTEMPT"])
run = sys.argv[1]
with open(os.path.join(run, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": int(sys.argv[2]) + attempt * int(sys.argv[3])}) + "\\n")
sys.exit(int(sys.argv[4]) if attempt < int(sys.argv[5]) else 0)
"""


def job(run_dir: Path, step: int, per_attempt: int, code: int, failures: int) -> list[str]:
    return ["--run-dir", str(run_dir), "--", sys.executable, "-c", JOB, str(run_dir), str(step), str(per_attempt),
            str(code), str(failures)]


def test_supervisor_restarts_failures_but_not_user_errors_or_the_same_step(tmp_path):
    # Fails twice with progress in between, then succeeds: two restarts, logged in the run dir.
    proc = supervise("--restarts", "3", "--backoff", "0", *job(tmp_path, 2, 3, 1, 2))
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "supervise.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in log] == [
        "the job failed (exit code 1 at step 2); restart 1 of 3 in 0 s",
        "the job failed (exit code 1 at step 5); restart 2 of 3 in 0 s",
        "the job ended (exit code 0)",
    ]
    assert "supervise: the job ended (exit code 0)" in proc.stderr

    # Fails at the same step every time: stops after the second failure there.
    (tmp_path / "supervise.log").unlink()
    proc = supervise("--restarts", "5", "--backoff", "0", *job(tmp_path, 9, 0, 1, 99))
    assert proc.returncode == 1
    assert "again at the same step" in proc.stderr and len((tmp_path / "supervise.log").read_text().splitlines()) == 2

    # A user error (exit 2) is never retried.
    proc = supervise("--restarts", "5", "--backoff", "0", *job(tmp_path, 1, 1, 2, 99))
    assert proc.returncode == 2 and proc.stderr.count("supervise:") == 1 and "user error" in proc.stderr


def test_a_stop_signal_is_forwarded_and_not_restarted(tmp_path):
    ready = tmp_path / "ready"
    script = (f"import signal, sys, time, pathlib; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); "
              f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.supervise", "--restarts", "3", "--backoff", "0",
                             "--run-dir", str(tmp_path), "--", sys.executable, "-c", script],
                            env=rank_env(), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # the supervisor alone: it forwards to the job's process group
    assert proc.wait(timeout=30) == 7
    assert "the job was stopped on request (exit code 7); not restarted" in proc.stderr.read()
