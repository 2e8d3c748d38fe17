"""A checkpoint written by 4 ranks with expert parallelism 2 resumes on other shapes (2 ranks ep=2,
2 ranks ep=1 under ZeRO-2, 4 ranks ep=4) with losses equal to the uninterrupted run; bad checkpoints and a
changed global batch are refused with one line naming the file or the fix, and nothing is lost."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint.manager import read_latest
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import losses, train, write_run_config

STEPS, SAVED = 10, 6


@pytest.fixture(scope="module")
def base(prepared_data, tmp_path_factory) -> tuple[Path, Path, dict[int, float]]:
    """4 ranks, ep=2, checkpoint at step 6, then on to step 10 uninterrupted."""
    tmp = tmp_path_factory.mktemp("elastic")
    cfg = write_run_config(tmp / "base.yaml", prepared_data, tmp / "base",
                           train={"steps": STEPS, "save_interval": SAVED})
    train(4, cfg)
    return tmp, prepared_data, losses(tmp / "base")


def resume_dir(base_dir: Path, tmp: Path, name: str, data: Path, **sections) -> tuple[Path, Path]:
    """A new run dir holding only the base run's step_6 checkpoint as `latest`."""
    run_dir = tmp / name
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(base_dir / "checkpoints" / f"step_{SAVED}", run_dir / "checkpoints" / f"step_{SAVED}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{SAVED}")
    cfg = write_run_config(tmp / f"{name}.yaml", data, run_dir, train={"steps": STEPS, "save_interval": SAVED},
                           **sections)
    return cfg, run_dir


@pytest.mark.parametrize("nproc,ep,accum,zero", [(2, 2, 2, 3), (2, 1, 2, 2), (4, 4, 1, 3)])
def test_resume_on_another_shape_continues_exactly(base, nproc, ep, accum, zero):
    """Written by ZeRO-3; the ep=1 resume also switches to ZeRO-2."""
    tmp, data, uninterrupted = base
    cfg, run_dir = resume_dir(tmp / "base", tmp, f"n{nproc}_ep{ep}_zero{zero}", data)
    proc = train(nproc, cfg, f"parallel.expert_parallel_size={ep}", f"train.grad_accum_steps={accum}",
                 f"deepspeed_config=ds_configs/zero{zero}.json")
    assert "resharded, RNG reseeded" in proc.stdout
    got = losses(run_dir)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    for step in range(SAVED + 1, STEPS + 1):
        assert math.isclose(got[step], uninterrupted[step], abs_tol=1e-5), (step, got[step], uninterrupted[step])


def test_checkpoint_layout_is_per_global_expert(base):
    """Every expert of every layer is its own tensor, whatever EP size wrote it; no DeepSpeed shards."""
    from pipeline.checkpoint.format import StateReader

    tmp, _, _ = base
    reader = StateReader(tmp / "base" / "checkpoints" / f"step_{STEPS}")
    names = reader.names("exp_avg_sq")
    assert {f"blocks.0.ffn.experts.down_proj[{e}]" for e in range(4)} <= names
    assert "blocks.0.ffn.experts.down_proj" not in names
    assert not list((tmp / "base" / "checkpoints" / f"step_{STEPS}").glob("*optim_states.pt"))


def test_changed_global_batch_is_refused_with_the_fix(base):
    tmp, data, _ = base
    cfg, run_dir = resume_dir(tmp / "base", tmp, "batch", data)
    proc = train(2, cfg, check=False)
    assert proc.returncode != 0
    assert ("was trained with a global batch of 8 samples (micro_batch_size x grad_accum_steps x ranks = 2 x 1 x 4) "
            "but this run has 4 (2 x 1 x 2); keep it with train.grad_accum_steps=2, or set "
            "train.allow_batch_change=true") in proc.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_missing_or_truncated_file_is_one_clear_line_and_nothing_is_lost(base, tmp_path):
    tmp, data, _ = base
    cfg, run_dir = resume_dir(tmp / "base", tmp_path, "bad", data)
    ckpt = run_dir / "checkpoints" / f"step_{SAVED}"
    shard = ckpt / "state-r00001-000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk or an interrupted copy
    before = snapshot(run_dir / "checkpoints")
    proc = train(1, cfg, "train.grad_accum_steps=4", "parallel.expert_parallel_size=1", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line == errors[0] for line in errors), proc.stderr[-3000:]
    assert f"checkpoint file {shard} is" in errors[0] and "(truncated or corrupt)" in errors[0]
    assert "restore it, or resume from an earlier checkpoint" in errors[0]
    assert snapshot(run_dir / "checkpoints") == before and read_latest(run_dir / "checkpoints") == f"step_{SAVED}"

    # Export reads the same files without ranks: the same check, and an existing export is kept.
    out = tmp_path / "exported"
    export = [sys.executable, "-m", "pipeline.export", "--run-dir", str(tmp / "base"), "--output", str(out)]
    subprocess.run(export, env=rank_env(), cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    exported = snapshot(out)
    shard.unlink()
    export[export.index(str(tmp / "base"))] = str(run_dir)
    proc = subprocess.run(export, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint file {shard} is missing; restore it, or resume from an earlier checkpoint by writing "
        f"its tag into {run_dir / 'checkpoints' / 'latest'}"
    ]
    assert snapshot(out) == exported


def test_global_batch_rule():
    from pipeline.checkpoint.resume import check_global_batch
    from pipeline.errors import ConfigError
    from pipeline.train.config import TrainConfig

    saved = {"micro_batch_size": 4, "grad_accum_steps": 2}  # x 4 ranks = 32
    check_global_batch(saved, 4, TrainConfig(micro_batch_size=2, grad_accum_steps=2), 8, Path("ck"))
    check_global_batch(saved, 4, TrainConfig(micro_batch_size=4, allow_batch_change=True), 2, Path("ck"))
    with pytest.raises(ConfigError, match=r"this run has 12 \(4 x 1 x 3\); keep it with a number of ranks that "
                                          r"divides 32, or set train.allow_batch_change=true"):
        check_global_batch(saved, 4, TrainConfig(micro_batch_size=4), 3, Path("ck"))
    with pytest.raises(ConfigError, match=r"keep it with train.micro_batch_size x train.grad_accum_steps = 16"):
        check_global_batch(saved, 4, TrainConfig(micro_batch_size=3), 2, Path("ck"))
