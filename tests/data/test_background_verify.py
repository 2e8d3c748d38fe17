"""The background data check (pipeline/data/background_verify.py) on a real prepared dir, no ranks:
which files each rank checks, that a damaged or missing file is named, the rate limiter's
arithmetic, and the note for a manifest without checksums. (A real 2-rank run that it stops is in
tests/train/test_run_safety.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.data.background_verify import (
    BackgroundVerifier,
    deal_by_size,
    manifest_checksums,
    throttle_sleep_s,
)
from pipeline.data.manifest import load_manifest
from tests.data.conftest import run_prepare, write_jsonl


@pytest.fixture
def data_dir(spm_bpe, docs, tmp_path, capsys):
    out = tmp_path / "out"
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    args = ["--input", inp, "--output", out, "--tokenizer", spm_bpe, "--shard-size-tokens", "3000",
            "--valid-fraction", "0.2"]
    assert run_prepare(capsys, *args)[0] == 0
    return out


def check(files, rate_mb_s: float = 1000.0) -> BackgroundVerifier:
    verifier = BackgroundVerifier(files, rate_mb_s, start=0).start()
    assert verifier.finished.wait(60)
    return verifier


def test_each_rank_checks_its_share_and_names_the_damaged_shard(data_dir):
    files, notes = manifest_checksums([data_dir])
    m = load_manifest(data_dir)
    assert notes == [] and [f.path for f in files] == [data_dir / rel for rel in sorted(m.files)]
    for f in files:  # sizes come from the manifest's counts, not a stat per file: they must be exact
        assert f.size == f.path.stat().st_size, f.path
    shares = deal_by_size(files, 2)
    assert sorted(f.path for share in shares for f in share) == sorted(f.path for f in files)  # each once
    loads = [sum(f.size for f in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(f.size for f in files)  # bytes balanced, not counts
    assert deal_by_size(files, 2) == shares  # the same on every rank

    clean = check(files)
    assert clean.problem is None and clean.checked_files == len(files)
    assert clean.checked_bytes == sum(f.size for f in files)

    # One in-vocabulary token changed in a shard: ids, sizes and structure all still valid.
    shard = data_dir / "train_00001.bin"
    tokens = np.memmap(shard, dtype=m.dtype, mode="r+")
    tokens[len(tokens) // 2] = (int(tokens[len(tokens) // 2]) + 1) % m.vocab_size
    tokens.flush()
    del tokens
    owner = next(r for r, share in enumerate(shares) if any(f.path == shard for f in share))
    assert check(shares[owner]).problem == f"{shard} fails its sha256 (changed or corrupted since prepare)"
    assert check(shares[1 - owner]).problem is None

    shard.unlink()
    assert check(shares[owner]).problem == f"{shard} is missing"


def test_the_rate_limiter_waits_out_each_block():
    mb = 1_000_000
    assert throttle_sleep_s(mb, 0.0, 8 * mb) == pytest.approx(0.125)  # 8 MB/s: one MB per 1/8 s
    assert throttle_sleep_s(mb, 0.025, 8 * mb) == pytest.approx(0.1)  # the block's own time counts
    assert throttle_sleep_s(mb, 0.5, 8 * mb) == 0.0  # slower than the rate: no wait, and no burst later
    assert throttle_sleep_s(mb // 2, 0.0, 8 * mb) == pytest.approx(0.0625)  # a file's short last block


def test_stop_ends_a_slow_pass_and_old_manifests_are_named(data_dir):
    files, _ = manifest_checksums([data_dir])
    slow = BackgroundVerifier(files, 0.01, start=0).start()  # 10 kB/s: would take minutes
    slow.stop()
    assert slow.finished.is_set() and slow.problem is None and slow.checked_files < len(files)

    old = data_dir.parent / "old"
    shutil.copytree(data_dir, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["files"]["train_00000.bin"]
    (old / "manifest.json").write_text(json.dumps(raw))
    files, notes = manifest_checksums([old])
    assert old / "train_00000.bin" not in [f.path for f in files]
    assert notes == [f"{old / 'manifest.json'} records no sha256 for 1 shard file(s) (e.g. train_00000.bin; "
                     "prepared by an older version): those are not checked for damage; re-prepare the data to "
                     "record them"]
