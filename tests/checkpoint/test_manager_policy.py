"""CheckpointManager's policy without ranks: which checkpoint is the latest, what is pruned, and the
resume checks (same model, same global batch), on real checkpoint directories' metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.tags import (
    checkpoint_steps,
    find_checkpoint,
    latest_problem,
    prunable,
    read_latest,
)
from pipeline.config_utils import to_dict
from pipeline.errors import ConfigError
from pipeline.model import get_preset
from pipeline.model.config import differing_fields
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
    (tmp_path / "latest").write_text("step_8")  # step_8 is half-written: never "start fresh"
    assert read_latest(tmp_path) == "step_4" and manager.latest() == tmp_path / "step_4"
    assert latest_problem(tmp_path) == (f"{tmp_path / 'latest'} names step_8, which is not a complete checkpoint: "
                                        "resuming from the newest complete checkpoint, step_4")
    (tmp_path / "latest").write_text("step_4\n")
    assert latest_problem(tmp_path) is None
    assert manager.latest() == tmp_path / "step_4"
    assert checkpoint_steps(tmp_path) == [4, 8]
    assert find_checkpoint(tmp_path) == tmp_path / "step_4"
    with pytest.raises(ConfigError, match="no complete checkpoint step_8"):
        find_checkpoint(tmp_path, 8)


def test_missing_or_empty_latest_resumes_the_newest_complete_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 2, debug_model())
    write_checkpoint(tmp_path, 6, debug_model())
    write_checkpoint(tmp_path, 8, debug_model(), complete=False)
    assert read_latest(tmp_path) == "step_6"  # no `latest` at all
    assert latest_problem(tmp_path).startswith(f"{tmp_path / 'latest'} is missing: resuming from the newest complete")
    (tmp_path / "latest").write_text("")
    assert read_latest(tmp_path) == "step_6" and latest_problem(tmp_path).startswith(f"{tmp_path / 'latest'} is empty")
    assert CheckpointManager(tmp_path, keep_last=1).resume_fix("step_6") == (
        f"restore it, or resume from an earlier checkpoint by writing its tag into {tmp_path / 'latest'} "
        "(complete ones: step_2)")


def test_latest_naming_anything_but_a_tag_of_this_run_stops_in_one_line(tmp_path):
    other = tmp_path / "other_run" / "checkpoints"
    write_checkpoint(other, 8, debug_model())
    ckpt = tmp_path / "run" / "checkpoints"
    write_checkpoint(ckpt, 2, debug_model())
    write_checkpoint(ckpt, 4, debug_model())
    for held in ("../../other_run/checkpoints/step_8", str(other / "step_8"), "step_4/../step_2"):
        (ckpt / "latest").write_text(held + "\n")
        for read in (read_latest, latest_problem, lambda d: CheckpointManager(d, keep_last=2).latest()):
            with pytest.raises(ConfigError) as e:
                read(ckpt)
            assert str(e.value).startswith(f"{ckpt / 'latest'} holds {held!r}, which is not a checkpoint tag of "
                                           "this run") and "\n" not in str(e.value)
            assert "(step_4, step_2) or delete it" in str(e.value) and "train.init_from" in str(e.value)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_2", "step_4"]  # nothing renamed aside


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


def test_run_state_reads_the_keys_of_older_checkpoints_and_refuses_unknown_ones_in_one_line(tmp_path):
    from pipeline.checkpoint.run_state import RunState
    from pipeline.errors import CheckpointError

    fixture = Path(__file__).parent / "fixtures"
    older = sorted(fixture.rglob("trainer_state.json"))
    assert older, "the pre-refactor fixture holds a trainer_state.json"
    for path in older:  # written before RunState existed: no version key
        raw = json.loads(path.read_text())
        state = RunState.read(path.parent)
        assert (state.step, state.consumed_samples, state.world_size) == (raw["step"], raw["consumed_samples"],
                                                                         raw["world_size"])
        assert json.loads(state.to_json()) == {**raw, "version": 1, "sequence_parallel_size": 1, "data": None}
    for bad, message in (({"step": 1, "version": 2}, "run state version 2"),
                         ({"step": 1, "world": 2}, r"unknown field\(s\) world")):
        (tmp_path / "trainer_state.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=message) as e:
            RunState.read(tmp_path)
        assert "\n" not in str(e.value)
