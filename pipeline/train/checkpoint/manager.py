"""CheckpointManager: which checkpoint is the latest, saving, pruning, RNG states, and the resume
policy with every check a resume makes (same model, same global batch). Checkpoints live in
`RUN/checkpoints/step_N/`, resumable on any number of ranks, expert-parallel size or ZeRO stage.

Layout of one checkpoint::

    step_N/
      state-r*.safetensors, index.json   fp32 weights + Adam moments per parameter and per global
                                         expert, and model buffers (see format.py)
      rng_rank{R}.pt                     torch / numpy / python RNG states of rank R
      trainer_state.json                 step, consumed samples, Adam step, the shape that wrote it
      config.yaml, ds_config.json        the resolved run config and the DeepSpeed JSON actually used
    latest                               the tag of the newest *complete* checkpoint

One format serves the same shape and a new one: DeepSpeed's own per-rank shards are neither written
(they can only be read back by the same world size and would double the time and disk of a save)
nor read.
Per-rank RNG states cannot map onto another world size: they are restored when the world size and
expert-parallel size are unchanged, and otherwise every rank is reseeded from (seed, step, rank).

Crash safety: `latest` is replaced atomically (write + rename) only after a barrier proves every
rank finished writing its files, so a kill during a save leaves `latest` pointing at the previous
complete checkpoint. The half-written `step_N/` is never read and is removed by the next save of
that step. Older checkpoints are pruned only after `latest` moved past them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline.errors import CheckpointError, ConfigError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text
from pipeline.model.config import differing_fields
from pipeline.train.checkpoint.format import INDEX, load_state, save_state
from pipeline.train.checkpoint.zero_state import (
    link_optimizer_state,
    optimizer_step_count,
    set_engine_counters,
    set_optimizer_step_count,
)
from pipeline.train.config import TrainConfig

LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_of(step: int) -> str:
    return f"step_{step}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """A fresh, reproducible stream per rank, for when saved per-rank streams cannot be re-dealt."""
    value = (seed * 1_000_003 + step) * 4099 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := _TAG_RE.match(p.name)))


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, if that checkpoint is complete (its trainer_state.json is written last)."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / "trainer_state.json").is_file() else None


def find_checkpoint(ckpt_dir: Path, step: int | None = None) -> Path:
    """`step_N/` (the latest if `step` is None); ConfigError if it is absent or incomplete."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step) if step is not None else read_latest(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / "trainer_state.json").is_file():
        raise ConfigError(f"no complete checkpoint {tag_of(step) if step is not None else '(latest)'} under "
                          f"{ckpt_dir}; train first or pass --step with an existing step_N")
    return ckpt_dir / tag


def prunable(steps: list[int], keep: int, keep_last: int) -> list[int]:
    """Of the checkpoint steps on disk, those to delete once `keep` is the latest: all but the newest
    `keep_last` up to `keep` (later ones, e.g. of a run that went further before a restart from an
    earlier step, are left alone)."""
    upto = [s for s in sorted(steps) if s <= keep]
    return upto[: max(0, len(upto) - keep_last)]


def check_global_batch(saved_train: dict, saved_world: int, train: TrainConfig, world: int, where: Path) -> None:
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


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        tag = read_latest(self.dir)
        return None if tag is None else self.dir / tag

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # --- resume policy ------------------------------------------------------------------------
    def check_resume(self, model: dict, train: TrainConfig, run_dir: Path, sequence_parallel_size: int = 1) -> None:
        """ConfigError (before any engine is built) if the latest checkpoint cannot be resumed by
        this run: a different model (`model` is the run's resolved model section), or a different
        global batch (micro-batch x grad-accum x data-parallel ranks = ranks / sequence_parallel_size,
        for the checkpoint's run and this one)."""
        where = self.latest()
        if where is None:
            return
        saved_cfg = yaml.safe_load((where / "config.yaml").read_text())
        saved = {k: v for k, v in saved_cfg["model"].items() if k != "init_from"}
        diff = sorted(differing_fields(saved, {k: v for k, v in model.items() if k != "init_from"}))
        if diff:
            raise ConfigError(
                f"{run_dir} holds checkpoints of a different model (fields differ: {', '.join(diff)}); "
                "use a new run_dir, or the same model settings to resume"
            )
        written_by = json.loads((where / "trainer_state.json").read_text())["world_size"]
        saved_sp = int(saved_cfg.get("parallel", {}).get("sequence_parallel_size", 1))
        check_global_batch(saved_cfg["train"], written_by // saved_sp, train, self.world // sequence_parallel_size,
                           where)

    # --- save ---------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict, run_files: dict[str, str]) -> Path:
        tag = tag_of(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists() and read_latest(self.dir) != tag:
                shutil.rmtree(tag_dir)  # leftovers of a save that was killed half-way
            tag_dir.mkdir(parents=True, exist_ok=True)
        self._barrier()
        trainer_state = {**trainer_state, "optimizer_step": optimizer_step_count(engine)}
        link_optimizer_state(engine)
        save_state(engine.module, tag_dir)
        atomic_write_bytes(tag_dir / f"rng_rank{self.rank}.pt", lambda f: torch.save(rng_state(), f))
        if self.rank == 0:
            for name, text in run_files.items():
                atomic_write_text(tag_dir / name, text)
            atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=2))
        self._barrier()  # every rank's files are on disk
        if self.rank == 0:
            atomic_write_text(self.dir / LATEST, tag)
            for s in prunable(checkpoint_steps(self.dir), step, self.keep_last):
                shutil.rmtree(self.dir / tag_of(s), ignore_errors=True)
        self._barrier()
        return tag_dir

    # --- load ---------------------------------------------------------------------------------
    def load_latest(self, engine, expert_parallel_size: int, grad_accum_steps: int, seed: int) -> dict | None:
        """Load the newest complete checkpoint into `engine`, whatever shape wrote it; returns its
        trainer state (with `same_shape`: whether per-rank RNG states were restored), or None."""
        tag_dir = self.latest()
        if tag_dir is None:
            return None
        state = json.loads((tag_dir / "trainer_state.json").read_text())
        if not (tag_dir / INDEX).is_file():
            raise CheckpointError(
                f"{tag_dir} holds no {INDEX}: it is incomplete, or in DeepSpeed's per-rank format of versions "
                "before the reshardable format, which this version does not read; resume it once with such a "
                "version (its next checkpoint is reshardable), or point "
                f"{self.dir / LATEST} at an earlier checkpoint"
            )
        load_state(engine, tag_dir)
        if "optimizer_step" in state:
            set_optimizer_step_count(engine, state["optimizer_step"])
        set_engine_counters(engine, state["step"], state["consumed_samples"], grad_accum_steps)
        written_ep = state.get("expert_parallel_size", expert_parallel_size)
        state["same_shape"] = state.get("world_size") == self.world and written_ep == expert_parallel_size
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        if state["same_shape"] and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # per-rank streams cannot be re-dealt to other ranks
            reseed(seed, state["step"], self.rank)
            state["same_shape"] = False
        return state
