"""The checks a resume makes before any engine is built, as pure functions of the checkpoint's
saved files and this run's values (tests/checkpoint/test_manager_policy.py runs them without ranks):
the same model, the same global batch (unless train.allow_batch_change), the same data (unless
train.allow_data_change). Each refusal is one ConfigError naming the checkpoint and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pipeline.checkpoint.run_state import RunState
from pipeline.checkpoint.tags import latest_problem, read_saved_config
from pipeline.errors import ConfigError
from pipeline.model.config import differing_fields


class BatchSettings(Protocol):
    """What a resume check reads of the run's training settings (the trainer's TrainConfig has them)."""

    micro_batch_size: int
    grad_accum_steps: int
    allow_batch_change: bool
    allow_data_change: bool


def check_model_unchanged(saved_model: dict, model: dict, run_dir: Path) -> None:
    """The checkpoint's model section equals this run's (`init_from` aside: it only seeds a fresh run)."""
    saved = {k: v for k, v in saved_model.items() if k != "init_from"}
    diff = sorted(differing_fields(saved, {k: v for k, v in model.items() if k != "init_from"}))
    if diff:
        raise ConfigError(
            f"{run_dir} holds checkpoints of a different model (fields differ: {', '.join(diff)}); "
            "use a new run_dir, or the same model settings to resume"
        )


def check_data_unchanged(saved: dict | None, current: dict, where: Path, allow: bool) -> list[str]:
    """Resume only on the data the checkpoint was trained on (train.allow_data_change overrides);
    returns notes to log."""
    from pipeline.data.identity import identity_change

    if saved is None:
        return [f"{where} records no data identity (written by an older version): data changes are not checked"]
    change = identity_change(saved, current)
    if change is None:
        return []
    if not allow:
        raise ConfigError(f"{where} was trained on other data: {change}; resume with the data it was trained on, "
                          "or set train.allow_data_change=true to continue on this data")
    return [f"train.allow_data_change=true: continuing {where} on other data: {change}"]


def check_global_batch(saved_train: dict, saved_world: int, train: BatchSettings, world: int, where: Path) -> None:
    """A resume must keep samples per optimizer step (the LR schedule and the data position are in
    steps and samples) unless train.allow_batch_change says otherwise."""
    old = int(saved_train["micro_batch_size"]) * int(saved_train["grad_accum_steps"]) * saved_world
    new = train.micro_batch_size * train.grad_accum_steps * world
    if old == new or train.allow_batch_change:
        return
    per_accum = train.micro_batch_size * world
    if old % per_accum == 0:
        fix = f"train.grad_accum_steps={old // per_accum}"
    elif old % world == 0:
        fix = f"train.micro_batch_size x train.grad_accum_steps = {old // world}"
    else:
        fix = f"a number of ranks that divides {old}"
    raise ConfigError(
        f"{where} was trained with a global batch of {old} samples (micro_batch_size x grad_accum_steps x ranks = "
        f"{saved_train['micro_batch_size']} x {saved_train['grad_accum_steps']} x {saved_world}) but this run has "
        f"{new} ({train.micro_batch_size} x {train.grad_accum_steps} x {world}); "
        f"keep it with {fix}, or set train.allow_batch_change=true"
    )


def check_resume(where: Path, ckpt_dir: Path, model: dict, train: BatchSettings, run_dir: Path, dp_world: int,
                 data: dict | None = None) -> list[str]:
    """ConfigError if checkpoint `where` cannot be resumed by this run: a different model (`model` is
    the run's resolved model section), a different global batch (micro-batch x grad-accum x
    data-parallel ranks, `dp_world` for this run), or other data (`data`: data.identity.data_identity
    of this run's data.train). Returns notes to log (a `latest` that was not usable, an allowed data
    change)."""
    notes = [p] if (p := latest_problem(ckpt_dir)) else []
    saved_cfg = read_saved_config(where)
    check_model_unchanged(saved_cfg["model"], model, run_dir)
    saved_state = RunState.read(where)
    saved_sp = int(saved_cfg.get("parallel", {}).get("sequence_parallel_size", 1))
    check_global_batch(saved_cfg["train"], saved_state.world_size // saved_sp, train, dp_world, where)
    if data is not None:
        notes += check_data_unchanged(saved_state.data, data, where, train.allow_data_change)
    return notes
