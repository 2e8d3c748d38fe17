"""A run never silently loses or corrupts work (real runs, real files, real mounts): one run per run
dir, unusable run dirs and a full disk are one line, resuming on other data is refused, corrupt
shards are named, and a lost `latest` or a damaged checkpoint never means "start fresh" (nor does
a `latest` naming another run's checkpoint mean resuming it)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import checkpoint_steps, read_latest
from tests.checkpoint.test_checkpoint import kill_job, start_training
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import train, write_run_config
from tests.train.test_launch import free_port


def run_single(cfg: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """One rank under plain python (another launcher than torchrun)."""
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg), "parallel.expert_parallel_size=1", *overrides]
    env = {**rank_env(), "MASTER_PORT": str(free_port())}
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines; no traceback from our code (torchrun prints its own for a failed child)."""
    assert f'File "{REPO_ROOT}/pipeline' not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_second_run_on_a_run_dir_is_refused_and_a_killed_runs_lock_is_taken_over(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 500})
    first = start_training(cfg)  # 2 ranks under torchrun
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it was seen"
        time.sleep(0.05)
    holder = json.loads((run_dir / ".lock").read_text())

    second = run_single(cfg, "train.grad_accum_steps=2")  # another launcher, same run dir
    assert second.returncode == 2 and errors(second) == [
        f"error: {run_dir} is in use by another training run: pid {holder['pid']} on {holder['host']} "
        f"(torchrun run {holder['job'].split()[-1]}, since {holder['since']}, `{holder['command'][:120]}`); wait for "
        f"it to finish or stop it, or use another dir. If it is gone, delete {run_dir / '.lock'} (or wait 120 s after "
        "its last heartbeat)"], second.stderr[-3000:]
    assert "training 4-layer model" not in second.stdout  # refused before the engine build

    kill_job(first)  # a crash of the whole job: the lock stays, naming a dead process
    third = run_single(cfg, "train.grad_accum_steps=2", "train.steps=1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the stale lock {run_dir / '.lock'} of training run pid {holder['pid']}" in third.stdout
    assert not (run_dir / ".lock").exists()


def test_run_dir_that_is_a_file_or_read_only_is_one_line(prepared_data, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, blocker)
    proc = run_single(cfg)
    assert proc.returncode == 2 and errors(proc) == [
        f"error: {blocker} is not a directory (a file is in the way); choose another training run dir or move "
        "that file"]

    mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        proc = run_single(cfg, f"run_dir={tmp_path / 'ro'}")
        assert proc.returncode == 2 and errors(proc) == [
            f"error: {tmp_path / 'ro'} is not writable (Read-only file system); choose a writable training run dir "
            "or fix its permissions / mount"]
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def test_disk_full_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(prepared_data, tmp_path):
    run_dir = tmp_path / "small"
    mount_tmpfs(run_dir, "size=6m")  # one checkpoint of the debug preset is 3.8 MB: the second does not fit
    try:
        cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, tensorboard=False,
                               train={"steps": 4, "save_interval": 2, "keep_last": 5})
        proc = run_single(cfg)
        ckpt = run_dir / "checkpoints"
        assert proc.returncode == 2 and errors(proc) == [
            f"error: could not save checkpoint {ckpt / 'step_4'}: rank 0: writing {ckpt / 'step_4'}/"
            "state-r00000-000.safetensors.tmp failed (No space left on device); the partial step_4 was removed and "
            f"the last complete checkpoint {ckpt / 'step_2'} is kept. Free space on that filesystem (or fix the "
            "error) and run the same command again to resume"], proc.stderr[-3000:]
        assert checkpoint_steps(ckpt) == [2] and read_latest(ckpt) == "step_2"
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_2"]
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)


def test_resume_on_data_of_another_tokenizer_is_refused_unless_allowed(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 1})
    assert run_single(cfg, "train.grad_accum_steps=2").returncode == 0
    # The same corpus under another tokenizer of the same vocabulary size (512).
    other = tmp_path / "other"
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    inputs = [s["path"] for s in manifest["inputs"]]
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "--input", *inputs, "--output", str(other),
                    "--train-tokenizer", "unigram", "--vocab-size", "512", "--valid-fraction", "0.05",
                    "--no-progress"], check=True, env=rank_env(), cwd=REPO_ROOT, capture_output=True)

    proc = run_single(cfg, "train.grad_accum_steps=2", "train.steps=2", f"data.train=[{other}]")
    assert proc.returncode == 2
    [line] = errors(proc)
    assert line.startswith(f"error: {run_dir / 'checkpoints' / 'step_1'} was trained on other data: data.train[0] "
                           f"({other}) was tokenised with another tokenizer (sentencepiece ")
    assert line.endswith("vocab 512); resume with the data it was trained on, or set train.allow_data_change=true "
                         "to continue on this data")

    proc = run_single(cfg, "train.grad_accum_steps=2", "train.steps=2", f"data.train=[{other}]",
                      "train.allow_data_change=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.allow_data_change=true: continuing" in proc.stdout and "another tokenizer" in proc.stdout


def test_corrupt_shard_ids_are_named_by_shard_and_sequence(prepared_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    tokens = np.memmap(data / "train_00000.bin", dtype=np.uint16, mode="r+")
    tokens[::50] = 0xFFFF  # corrupted bytes: ids far past the 512-token vocabulary, size unchanged
    tokens.flush()
    del tokens
    cfg = write_run_config(tmp_path / "run.yaml", data, tmp_path / "run", train={"steps": 2})
    proc = run_single(cfg)
    assert proc.returncode == 2
    [line] = errors(proc)
    assert re.fullmatch(
        rf"error: {data}/train_00000\.bin: sequence \d+ holds token id 65535, outside the tokenizer's \[0, 512\): "
        rf"the shard is corrupt; check it with `python -m pipeline.prepare --verify {data}` and re-prepare it", line)

    # The full checksum check (opt-in, over the ranks) refuses it before the engine is built.
    proc = train(2, cfg, "data.verify_checksums=true", check=False)
    assert errors(proc) == [f"error: data.verify_checksums: 1 problem(s): {data}/train_00000.bin fails its sha256 "
                            "(changed or corrupted since prepare); re-prepare that data (`python -m pipeline.prepare` "
                            "with the same command repairs it)"]

    # A shard whose recorded ids do not fit the model is refused at start.
    m = json.loads((data / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["max_id"] = 600
    (data / "manifest.json").write_text(json.dumps(m))
    proc = run_single(cfg)
    assert proc.returncode == 2 and errors(proc) == [
        f"error: {data}/train_00000.bin holds token ids {m['splits']['train']['shards'][0]['min_id']}..600 (recorded "
        f"in {data}/manifest.json) but the model's vocab_size is 512; re-prepare the data with the model's "
        "tokenizer, or set model.vocab_size above the largest id"]


def test_a_changed_in_vocabulary_token_is_found_in_the_background_and_stops_the_run(prepared_data, tmp_path):
    """The default settings (no start-up pass over the data): one token changed to another valid id
    passes every read-time check; the background sha256 check finds it on the rank that owns the
    file, and every rank stops after the same step, with a checkpoint and one line naming the file."""
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    shard = data / "train_00000.bin"
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = (int(tokens[len(tokens) // 2]) + 1) % 512
    tokens.flush()
    del tokens
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", data, run_dir, tensorboard=False, train={"steps": 20})
    proc = train(2, cfg, check=False)
    assert proc.returncode != 0 and "data: checking the sha256 of" in proc.stdout
    [line] = errors(proc)
    step = int(re.search(r"training stopped at step (\d+) ", line)[1])
    assert line == (
        f"error: damaged data: {shard} fails its sha256 (changed or corrupted since prepare), found by the "
        f"background check (data.verify_rate_mb_s); training stopped at step {step} with a checkpoint. Restore that "
        "file, or rerun the same `python -m pipeline.prepare` command (it rebuilds what fails its checksum), then "
        "run the same training command to resume"), proc.stderr[-3000:]
    assert step < 20 and checkpoint_steps(run_dir / "checkpoints") == [step]


def flip_byte_of(file: Path, key: str) -> None:
    """Flip one bit in the middle of tensor `key` of a safetensors file (size unchanged)."""
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x10
    file.write_bytes(bytes(raw))


def test_lost_latest_resumes_from_newest_complete_and_damaged_tensors_are_refused(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir,
                           train={"steps": 4, "save_interval": 2, "keep_last": 3})
    train(2, cfg)
    assert checkpoint_steps(ckpt) == [2, 4]

    (ckpt / "latest").unlink()  # lost (or empty, or naming a deleted tag): never "start fresh"
    proc = train(2, cfg, "train.steps=6")
    assert (f"{ckpt / 'latest'} is missing: resuming from the newest complete checkpoint, step_4" in proc.stdout
            and f"resumed from {ckpt / 'step_4'} at step 4" in proc.stdout), proc.stdout[-3000:]
    assert checkpoint_steps(ckpt) == [2, 4, 6]  # the good checkpoints are still there

    index = json.loads((ckpt / "step_6" / "index.json").read_text())
    key = "weight/blocks.0.attn.q_proj.weight"  # not an expert tensor: every rank reads it
    damaged = ckpt / "step_6" / index["tensors"][key]
    flip_byte_of(damaged, key)  # a finite bit flip: same size, still loads as numbers
    proc = train(2, cfg, "train.steps=8", check=False)
    assert proc.returncode != 0
    assert errors(proc)[0] == (
        f"error: checkpoint file {damaged}: tensor {key} fails its xxh3_64 checksum (damaged on disk since it was "
        f"written); restore it, or resume from an earlier checkpoint by writing its tag into {ckpt / 'latest'} "
        "(complete ones: step_4, step_2)")
    assert checkpoint_steps(ckpt) == [2, 4, 6] and read_latest(ckpt) == "step_6"  # nothing deleted

    flip_byte_of(damaged, key)  # the same bit again: the tensor is whole; now one rank's RNG file is not
    rng_file = ckpt / "step_6" / "rng_rank1.pt"
    raw = bytearray(rng_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    rng_file.write_bytes(bytes(raw))
    proc = train(2, cfg, "train.steps=8", check=False)
    assert errors(proc)[0] == (
        f"error: checkpoint file {rng_file} fails its checksum; restore it, or resume from an earlier checkpoint by "
        f"writing its tag into {ckpt / 'latest'} (complete ones: step_4, step_2)")
    rng_file.unlink()  # missing: one line naming it on every rank (not rank 1's FileNotFoundError, rank 0's gloo error)
    proc = train(2, cfg, "train.steps=8", check=False)
    assert proc.returncode != 0 and set(errors(proc)) == {
        f"error: checkpoint file {rng_file} is missing; restore it, or resume from an earlier checkpoint by "
        f"writing its tag into {ckpt / 'latest'} (complete ones: step_4, step_2)"}, proc.stderr[-3000:]

    # `latest` naming another run's checkpoint: one line, before anything is loaded or moved aside.
    shutil.copytree(ckpt / "step_4", tmp_path / "other_run" / "checkpoints" / "step_4")
    held = "../../other_run/checkpoints/step_4"
    (ckpt / "latest").write_text(held)
    proc = train(2, cfg, "train.steps=8", check=False)
    assert proc.returncode != 0 and set(errors(proc)) == {
        f"error: {ckpt / 'latest'} holds {held!r}, which is not a checkpoint tag of this run (a step_N directory "
        f"inside {ckpt}); write one of this run's tags into it (step_6, step_4, step_2) or delete it to resume "
        "from the newest; to start from another run's weights use train.init_from"}, proc.stderr[-3000:]
    assert checkpoint_steps(ckpt) == [2, 4, 6]

    # A checkpoint written before checksums (none in its index) still loads; NaN is still refused.
    (ckpt / "latest").write_text("step_4")
    index = json.loads((ckpt / "step_4" / "index.json").read_text())
    for k in ("checksum", "tensor_checksums", "file_checksums"):
        index.pop(k)
    (ckpt / "step_4" / "index.json").write_text(json.dumps(index))
    from safetensors.torch import load_file, save_file

    nan_file = ckpt / "step_4" / index["tensors"][key]
    tensors = load_file(nan_file)
    tensors[key].view(-1)[3] = float("nan")
    save_file(tensors, nan_file)
    proc = train(2, cfg, "train.steps=8", check=False)
    assert errors(proc)[0] == (f"error: checkpoint file {nan_file}: tensor {key} holds NaN or Inf values; restore "
                               f"it, or resume from an earlier checkpoint by writing its tag into {ckpt / 'latest'} "
                               "(complete ones: step_6, step_2)")
    (ckpt / "latest").write_text("step_2")
    index = json.loads((ckpt / "step_2" / "index.json").read_text())
    for k in ("checksum", "tensor_checksums", "file_checksums"):
        index.pop(k)
    (ckpt / "step_2" / "index.json").write_text(json.dumps(index))
    proc = train(2, cfg, "train.steps=3")
    assert f"resumed from {ckpt / 'step_2'} at step 2" in proc.stdout
