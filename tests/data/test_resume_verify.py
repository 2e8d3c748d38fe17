"""Crash and rerun of prepare, --verify, and the CLI as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.data.conftest import make_docs, run_prepare, write_jsonl


def kill_after_shards(proc: subprocess.Popen, out, n: int) -> None:
    """SIGKILL a running prepare once `n` train shards are recorded as finished in its state file."""
    state = out / ".prepare_state.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(state.read_text())["shards"].get("train", [])) >= n:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the end (make the corpus bigger if not)"


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.prepare", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".bin", ".idx")}


def _manifest(d: Path) -> dict:
    m = json.loads((d / "manifest.json").read_text())
    m.pop("command")  # names the output dir, which differs between the two runs
    return m


def big_jsonl(tmp_path: Path) -> Path:
    """1,440 documents: enough for several 2,000-token shards, so a prepare can be caught mid-run."""
    return write_jsonl(tmp_path / "big.jsonl", [d for k in range(12) for d in make_docs(seed=k, n=120)])


def test_sigkill_mid_run_then_rerun_is_byte_identical(spm_bpe, tmp_path, capsys):
    inp = big_jsonl(tmp_path)
    args = ["--input", inp, "--tokenizer", spm_bpe, "--shard-size-tokens", "2000", "--valid-fraction", "0.1"]
    ref = tmp_path / "ref"
    assert run_prepare(capsys, *args, "--output", ref)[0] == 0

    out = tmp_path / "out"
    proc = _cli(*args, "--output", out, "--no-progress")
    state = out / ".prepare_state.json"
    kill_after_shards(proc, out, 4)
    recorded = json.loads(state.read_text())["shards"]["train"]
    assert len(recorded) >= 4
    # Also corrupt the third recorded shard: the rerun must keep shards 0-1 and redo from 2 on.
    third = out / f"{recorded[2]['name']}.bin"
    data = bytearray(third.read_bytes())
    data[5] ^= 0xFF
    third.write_bytes(bytes(data))
    first = out / f"{recorded[0]['name']}.bin"
    first_mtime = first.stat().st_mtime_ns

    code, stdout, err = run_prepare(capsys, *args, "--output", out)
    assert code == 0, err
    assert "reused" in stdout and first.stat().st_mtime_ns == first_mtime, "verified shards are not rewritten"
    assert not state.exists() and not list(out.glob("*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert _manifest(out) == _manifest(ref)


def test_verify_detects_a_corrupted_byte(spm_bpe, docs, tmp_path, capsys):
    out = tmp_path / "out"
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    assert (
        run_prepare(
            capsys, "--input", inp, "--output", out, "--tokenizer", spm_bpe, "--shard-size-tokens", "3000"
        )[0]
        == 0
    )
    code, stdout, _ = run_prepare(capsys, "--verify", out)
    assert code == 0 and "verify" in stdout
    shard = out / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = run_prepare(capsys, "--verify", out)
    assert code == 1 and "train_00001.bin: sha256 mismatch" in err
    idx = out / "train_00002.idx"
    raw = bytearray(idx.read_bytes())
    raw[20] ^= 0x01  # the sequence count in the header
    idx.write_bytes(bytes(raw))
    code, _, err = run_prepare(capsys, "--verify", out)
    assert code == 1 and "train_00002.idx: sha256 mismatch" in err and "corrupt" in err
    (out / "train_00000.idx").unlink()
    code, _, err = run_prepare(capsys, "--verify", out)
    assert code == 1 and "train_00000.idx: missing" in err


def test_cli_subprocess_trains_tokenizer_and_reports_user_errors(docs, tmp_path):
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    proc = _cli(
        "--input",
        inp,
        "--output",
        out,
        "--train-tokenizer",
        "bpe",
        "--vocab-size",
        "500",
        "--workers",
        "2",
        "--valid-fraction",
        "0.2",
    )
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "tokenising" in stderr and "tokens/s" in stdout  # progress bar, then the summary
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"].startswith("python -m pipeline.prepare --input")
    assert m["tokenizer"]["type"] == "sentencepiece" and m["tokenizer"]["vocab_size"] == 500
    assert set(m["files"]) >= {"tokenizer/tokenizer.model", "train_00000.bin", "train_00000.idx"}
    proc = _cli("--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o2", "--tokenizer", out)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and stderr.startswith("error: input") and "Traceback" not in stderr


def test_rerun_on_a_damaged_finished_dir_rebuilds_only_what_failed(spm_bpe, docs, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    args = ["--input", inp, "--tokenizer", spm_bpe, "--shard-size-tokens", "3000", "--valid-fraction", "0.2"]
    out = tmp_path / "out"
    assert run_prepare(capsys, *args, "--output", out)[0] == 0
    reference = _shard_bytes(out)
    (out / "train_00002.bin").write_bytes(b"garbage")
    (out / "valid_00000.idx").unlink()
    kept = out / "train_00000.bin"
    mtime = kept.stat().st_mtime_ns
    code, stdout, err = run_prepare(capsys, *args, "--output", out)
    assert code == 0, err
    assert "2 file(s) fail their checksum" in stdout and "reused 2 verified shard(s)" in stdout
    assert kept.stat().st_mtime_ns == mtime and _shard_bytes(out) == reference
    assert run_prepare(capsys, "--verify", out)[0] == 0
    code, stdout, _ = run_prepare(capsys, *args, "--output", out)
    assert code == 0 and "nothing to do" in stdout
