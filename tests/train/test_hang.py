"""Hung ranks on real 2-rank jobs (torchrun, gloo, the real trainer): a SIGSTOPped rank, a rank stuck
in Python and a rank stuck in a collective its peer never joins each end the job within the hang
timeout plus a few seconds, exit code 4, one line naming the rank, the live ranks' stacks in
RUN/hang/; the same command then resumes from the last checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from pipeline.checkpoint import read_latest
from tests.runs import losses, write_run_config
from tests.train.test_signals import job_gone, job_pids, launch, rank_pid, wait_for

TIMEOUT_S = 5
# Start-up and the first step get the slow allowance: generous, since 2 busy cores build the engine.
HANG = {"hang_timeout_s": TIMEOUT_S, "hang_slow_timeout_s": 90}
# Detection polls every 0.25 s; the live ranks then dump, answer and exit (torchrun needs ~1 s more).
MARGIN_S = 8


def hung_run(proc: subprocess.Popen, out: Path, run_dir: Path, stalled_at: float) -> tuple[str, list[Path]]:
    """Waits for the job to end; checks the ending shared by every kind of hang; returns the error line
    and the stack files written. `stalled_at`: time.monotonic() when the rank stopped (or just before)."""
    pids = job_pids(proc)
    code = proc.wait(timeout=180)
    took = time.monotonic() - stalled_at
    job_gone(pids, timeout=10)
    text = out.read_text()
    assert code != 0 and re.search(r"exitcode\s*:\s*4 ", text), text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: hung: rank 1 stopped making progress"), text[-3000:]
    assert "Traceback" not in "\n".join(l for l in text.splitlines() if l.startswith("[rank")), text[-3000:]
    assert took < TIMEOUT_S + MARGIN_S, (took, text[-2000:])
    dumps = sorted((run_dir / "hang").glob("*/verdict.txt"), key=os.path.getmtime)
    dump_dir = dumps[-1].parent
    assert dumps[-1].read_text().strip() == errors[0].removeprefix("error: ")
    assert "Python stacks of rank(s) " in errors[0] and str(dump_dir) in errors[0]
    return errors[0], sorted(dump_dir.glob("rank*.txt"))


def logged(run_dir: Path, step: int) -> bool:
    try:
        return step in losses(run_dir)
    except (OSError, ValueError):  # not written yet, or a line being written
        return False


def test_a_sigstopped_rank_is_named_and_the_job_ends(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir,
                           train={**HANG, "steps": 1000, "save_interval": 0})
    out = tmp_path / "out.txt"
    proc = launch("torchrun", cfg, out)
    wait_for(proc, lambda: logged(run_dir, 3))  # past the first step (slow allowance); no save (the same)
    # A stopped rank is judged by the last beat its watch thread sent (every 0.25 s here): a stop within
    # a poll of the first step would leave that step's slow allowance (90 s) standing. Some polls more.
    time.sleep(2.0)
    os.kill(rank_pid(proc, 1), signal.SIGSTOP)
    stopped_at = time.monotonic()
    line, stacks = hung_run(proc, out, run_dir, stopped_at)
    assert re.search(r"\(rank 1 at step \d+ in \w+, no progress for [5-9] s: stopped, process state T as after "
                     r"SIGSTOP, pid \d+ killed\); rank\(s\) 0 waited for it; Python stacks of rank\(s\) 0 in ",
                     line), line
    assert [p.name for p in stacks] == ["rank0.txt"]
    assert "Thread" in stacks[0].read_text() and "hang_watchdog.py" in stacks[0].read_text()


def test_ranks_stuck_in_python_or_in_a_lone_collective_are_named_then_the_job_resumes(prepared_data, tmp_path,
                                                                                       monkeypatch):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir,
                           train={**HANG, "steps": 8, "save_interval": 2})
    out = tmp_path / "out.txt"
    # A fresh run stalls at step 5 (after the step-4 save); the same command then resumes from step 4
    # and stalls at step 6 (step 5, its first, has the slow allowance).
    for kind, step, where in (("hang", 5, r"stuck at pipeline/train/health.py:\d+ in stall"),
                              ("collective", 6, r"waiting in a collective at pipeline/train/health.py:\d+ in stall")):
        monkeypatch.setenv("PIPELINE_INJECT_NAN", f"{kind}:1:{step}")
        proc = launch("torchrun", cfg, out)
        wait_for(proc, lambda before=step - 1: read_latest(run_dir / "checkpoints") == "step_4"
                 and logged(run_dir, before))  # the last step before the fault
        line, stacks = hung_run(proc, out, run_dir, time.monotonic())  # the fault comes right after
        assert re.search(rf"\(rank 1 at step {step} in step, no progress for [5-9] s: {where}\); rank\(s\) 0 "
                         r"waited for it; Python stacks of rank\(s\) 0, 1 in ", line), line
        assert [p.name for p in stacks] == ["rank0.txt", "rank1.txt"]
        assert re.search(r'File ".*health.py", line \d+ in stall', stacks[1].read_text())
        assert "(in a collective)" in stacks[0].read_text().splitlines()[0]
        assert read_latest(run_dir / "checkpoints") == "step_4"

    # The same command, without the fault: resumes from step 4 and finishes.
    monkeypatch.delenv("PIPELINE_INJECT_NAN")
    proc = launch("torchrun", cfg, out)
    assert proc.wait(timeout=180) == 0, out.read_text()[-3000:]
    assert re.search(r"resumed from .*step_4 at step 4", out.read_text()), out.read_text()[-3000:]
    assert read_latest(run_dir / "checkpoints") == "step_8" and logged(run_dir, 8)
