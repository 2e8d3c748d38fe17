"""Checkpoints: `RUN/checkpoints/step_N/`, resumable on any number of ranks, expert-parallel size
or ZeRO stage.

Layout of one checkpoint::

    step_N/
      state-r*.safetensors, index.json   fp32 weights + Adam moments per parameter and per global
                                         expert, and model buffers (see universal_ckpt.py)
      rng_rank{R}.pt                     torch / numpy / python RNG states of rank R
      trainer_state.json                 step, consumed samples, Adam step, the shape that wrote it
      config.yaml, ds_config.json        the resolved run config and the DeepSpeed JSON actually used
    latest                               the tag of the newest *complete* checkpoint

One format serves the same shape and a new one: DeepSpeed's own per-rank shards are not written
(they can only be read back by the same world size and would double the time and disk of a save).
Per-rank RNG states cannot map onto another world size: they are restored when the world size and
expert-parallel size are unchanged, and otherwise every rank is reseeded from (seed, step, rank).

Crash safety: `latest` is replaced atomically (write + rename) only after a barrier proves every
rank finished writing its files, so a kill during a save leaves `latest` pointing at the previous
complete checkpoint. The half-written `step_N/` is never read and is removed by the next save of
that step. Older checkpoints are pruned only after `latest` moved past them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import CheckpointError
from pipeline.io_utils import atomic_write_text
from pipeline.train.checkpoint.format import INDEX, load_state, save_state
from pipeline.train.checkpoint.zero_state import (
    link_optimizer_state,
    optimizer_step_count,
    set_engine_counters,
    set_optimizer_step_count,
)

LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d+)$")


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


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _TAG_RE.match(p.name)))


def read_latest(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag / "trainer_state.json").is_file() else None


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, engine, step: int, trainer_state: dict, run_files: dict[str, str]) -> Path:
        tag = f"step_{step}"
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
        torch.save(rng_state(), tag_dir / f".rng_rank{self.rank}.pt.tmp")
        os.replace(tag_dir / f".rng_rank{self.rank}.pt.tmp", tag_dir / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            for name, text in run_files.items():
                atomic_write_text(tag_dir / name, text)
            atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=2))
        self._barrier()  # every rank's files are on disk
        if self.rank == 0:
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=step)
        self._barrier()
        return tag_dir

    def _prune(self, keep: int) -> None:
        steps = [s for s in checkpoint_steps(self.dir) if s <= keep]
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.dir / f"step_{s}", ignore_errors=True)

    def load_latest(self, engine, expert_parallel_size: int, grad_accum_steps: int, seed: int) -> dict | None:
        """Load the newest complete checkpoint into `engine`, whatever shape wrote it; returns its
        trainer state (with `same_shape`: whether per-rank RNG states were restored), or None."""
        tag = read_latest(self.dir)
        if tag is None:
            return None
        tag_dir = self.dir / tag
        state = json.loads((tag_dir / "trainer_state.json").read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        if not (tag_dir / INDEX).is_file() and state.get("world_size") != world:
            raise CheckpointError(
                f"{tag_dir} is in the per-rank format of an older version and was written by "
                f"{state.get('world_size')} ranks; resume it once with {state.get('world_size')} ranks "
                "(its next checkpoint can be resumed on any number of ranks)"
            )
        if (tag_dir / INDEX).is_file():
            load_state(engine, tag_dir)
        else:  # legacy DeepSpeed shards, same world size
            load_path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {tag_dir}; resume from an earlier checkpoint")
        if "optimizer_step" in state:
            set_optimizer_step_count(engine, state["optimizer_step"])
        set_engine_counters(engine, state["step"], state["consumed_samples"], grad_accum_steps)
        written_ep = state.get("expert_parallel_size", expert_parallel_size)
        state["same_shape"] = state.get("world_size") == world and written_ep == expert_parallel_size
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        if state["same_shape"] and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # per-rank streams cannot be re-dealt to other ranks: a fresh, reproducible one each
            reseed = (seed * 1_000_003 + state["step"]) * 4099 + self.rank
            torch.manual_seed(reseed)
            np.random.seed(reseed % 2**32)
            random.seed(reseed)
            state["same_shape"] = False
        return state
