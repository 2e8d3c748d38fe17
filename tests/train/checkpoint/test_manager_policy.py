"""CheckpointManager's policy without ranks: which checkpoint is the latest, what is pruned, and the
resume checks (same model, same global batch), on real checkpoint directories' metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config_utils import to_dict
from pipeline.errors import ConfigError
from pipeline.model import get_preset
from pipeline.model.config import differing_fields
from pipeline.train.checkpoint.manager import (
    CheckpointManager,
    checkpoint_steps,
    find_checkpoint,
    prunable,
    read_latest,
)
from pipeline.train.config import TrainConfig


def write_checkpoint(ckpt_dir: Path, step: int, model: dict, world: int = 2, mbs: int = 2, gas: int = 1,
                     complete: bool = True) -> Path:
    """The metadata files of `step_N/` as CheckpointManager.save writes them."""
    tag_dir = ckpt_dir / f"step_{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "config.yaml").write_text(yaml.safe_dump(
        {"model": model, "train": {"micro_batch_size": mbs, "grad_accum_steps": gas}}))
    if complete:  # trainer_state.json is the last file a save writes
        (tag_dir / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    return tag_dir


def debug_model(**overrides) -> dict:
    return {"preset": "debug", **to_dict(get_preset("debug", **overrides))}


def test_latest_is_only_a_complete_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    write_checkpoint(tmp_path, 4, debug_model())
    write_checkpoint(tmp_path, 8, debug_model(), complete=False)
    (tmp_path / "latest").write_text("step_8")
    assert read_latest(tmp_path) is None and manager.latest() is None  # step_8 is half-written
    (tmp_path / "latest").write_text("step_4\n")
    assert manager.latest() == tmp_path / "step_4"
    assert checkpoint_steps(tmp_path) == [4, 8]
    assert find_checkpoint(tmp_path) == tmp_path / "step_4"
    with pytest.raises(ConfigError, match="no complete checkpoint step_8"):
        find_checkpoint(tmp_path, 8)


def test_pruning_keeps_the_newest_up_to_the_latest():
    assert prunable([2, 4, 6, 8], keep=8, keep_last=2) == [2, 4]
    assert prunable([2, 4, 6, 8], keep=8, keep_last=10) == []
    # Restarted from step 4 of a run that had reached step 8: later checkpoints are not ours to prune.
    assert prunable([2, 4, 6, 8], keep=4, keep_last=1) == [2]


def test_resume_of_another_model_is_refused_naming_the_fields(tmp_path):
    write_checkpoint(tmp_path / "checkpoints", 2, debug_model())
    (tmp_path / "checkpoints" / "latest").write_text("step_2")
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    manager.world = 2
    manager.check_resume(debug_model(), TrainConfig(micro_batch_size=2), tmp_path)  # same model: fine
    manager.check_resume({**debug_model(), "init_from": "/w"}, TrainConfig(micro_batch_size=2), tmp_path)
    with pytest.raises(ConfigError, match=r"different model \(fields differ: n_layer, top_k\)"):
        manager.check_resume(debug_model(n_layer=2, top_k=1), TrainConfig(micro_batch_size=2), tmp_path)


def test_a_field_added_after_the_checkpoint_reads_as_its_default():
    current = debug_model()
    saved = {k: v for k, v in current.items() if k != "aux_loss_granularity"}
    assert differing_fields(saved, current) == []
    assert differing_fields(saved, {**current, "aux_loss_granularity": "sequence"}) == ["aux_loss_granularity"]


def test_resume_with_another_global_batch_is_refused_with_the_fix(tmp_path):
    write_checkpoint(tmp_path, 2, debug_model(), world=2, mbs=2, gas=2)  # global batch 8
    (tmp_path / "latest").write_text("step_2")
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.world = 4
    with pytest.raises(ConfigError, match=r"global batch of 8 samples .* keep it with train.grad_accum_steps=1"):
        manager.check_resume(debug_model(), TrainConfig(micro_batch_size=2, grad_accum_steps=2), tmp_path)
    manager.check_resume(debug_model(), TrainConfig(micro_batch_size=2, grad_accum_steps=1), tmp_path)
    manager.check_resume(debug_model(), TrainConfig(micro_batch_size=2, grad_accum_steps=2,
                                                    allow_batch_change=True), tmp_path)
