"""Checkpoints resume exactly, survive SIGKILL (also during a save, synchronous or asynchronous), and keep the
last K; both writers write the same bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.checkpoint.manager import checkpoint_steps, read_latest
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import losses, train, write_run_config

STEPS, SAVE_EVERY = 10, 4


def start_training(config: Path, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.train", "--config", str(config)]
    return subprocess.Popen(cmd, env=rank_env(), cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.DEVNULL,
                            start_new_session=True, text=True)


def kill_job(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and every rank at once (torchrun starts each rank in a session of its own,
    so the launcher's process group alone would miss them)."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL the whole job (launcher and ranks) the moment `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "training finished before it could be killed"
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.002)
    kill_job(proc)


SECTIONS = {"train": {"steps": STEPS, "save_interval": SAVE_EVERY, "keep_last": 2}}


@pytest.fixture(scope="module")
def uninterrupted_run(prepared_data, tmp_path_factory) -> Path:
    """A run of the default settings: asynchronous saves."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train(2, write_run_config(tmp / "full.yaml", prepared_data, tmp / "full", **SECTIONS))
    # keep_last=2: step_4 was pruned once step_8 and step_10 were complete.
    assert checkpoint_steps(tmp / "full" / "checkpoints") == [8, 10]
    return tmp / "full"


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    return losses(uninterrupted_run)


def same_state(a: Path, b: Path) -> None:
    """Two checkpoints of the same step hold the same bytes: every tensor file and tensor checksum, and
    the torch RNG state (config.yaml, so index.json's checksum of it, names train.async_save; numpy's and
    Python's RNG streams are not restored into the same state by a resume)."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    index = [json.loads((d / "index.json").read_text()) for d in (a, b)]
    assert index[0]["tensor_checksums"] == index[1]["tensor_checksums"]
    for rng in (p.name for p in a.glob("rng_rank*.pt")):
        assert torch.equal(*(torch.load(d / rng, weights_only=False)["torch"] for d in (a, b))), rng


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_during_save_then_resume_is_exact(prepared_data, tmp_path, uninterrupted_run, uninterrupted,
                                                  async_save):
    run_dir = tmp_path / "killed"
    cfg = write_run_config(tmp_path / "killed.yaml", prepared_data, run_dir,
                           **{**SECTIONS, "train": {**SECTIONS["train"], "async_save": async_save}})
    proc = start_training(cfg)
    # The second save has started (rank 0 created step_8/): kill now, most likely mid-write (async: while
    # the background threads write it and the ranks train on).
    kill_when(proc, lambda: (run_dir / "checkpoints" / "step_8").exists())
    assert proc.returncode != 0
    latest = read_latest(run_dir / "checkpoints")
    assert latest in ("step_4", "step_8"), latest  # never a half-written one
    resumed_from = int(latest.split("_")[1])

    train(2, cfg)
    got = losses(run_dir)  # later records (the resumed run) overwrite the killed run's
    for step in range(resumed_from + 1, STEPS + 1):
        assert got[step] == uninterrupted[step], f"step {step}: resumed {got[step]} vs {uninterrupted[step]}"
    assert read_latest(run_dir / "checkpoints") == f"step_{STEPS}"
    # The synchronous and the asynchronous writer save the same bytes for the same state.
    same_state(run_dir / "checkpoints" / f"step_{STEPS}", uninterrupted_run / "checkpoints" / f"step_{STEPS}")


def test_sigterm_checkpoints_at_an_agreed_step_and_resumes_exactly(prepared_data, tmp_path, uninterrupted):
    """SLURM preemption signals every process of the job: the launcher and each rank."""
    run_dir = tmp_path / "preempted"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, **SECTIONS)
    proc = start_training(cfg, stdout=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # past step 2
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be signalled"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped = re.search(r"stopped at step (\d+) on SIGTERM", out)
    assert stopped, out[-2000:]
    step = int(stopped[1])
    assert 2 <= step < STEPS and read_latest(run_dir / "checkpoints") == f"step_{step}"

    train(2, cfg)
    got = losses(run_dir)
    assert [got[s] for s in range(step + 1, STEPS + 1)] == [uninterrupted[s] for s in range(step + 1, STEPS + 1)]


def test_rerun_of_finished_run_does_nothing_and_keeps_checkpoints(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", train={"steps": 2})
    train(2, cfg)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    proc = train(2, cfg)
    assert "nothing to do" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()}
    assert before == after


def test_resume_into_run_dir_of_another_model_is_refused(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", train={"steps": 1})
    train(2, cfg)
    proc = train(2, cfg, "model.n_layer=2", check=False)
    assert proc.returncode != 0
    assert "holds checkpoints of a different model (fields differ: n_layer)" in proc.stderr
