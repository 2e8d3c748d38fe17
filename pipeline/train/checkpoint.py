"""Checkpoints: `RUN/checkpoints/step_N/` written by the DeepSpeed engine, plus our own state.

Layout of one checkpoint::

    step_N/
      <DeepSpeed's ZeRO shards>     model + optimizer partitions, one file set per rank
      rng_rank{R}.pt                torch / numpy / python RNG states of rank R
      trainer_state.json            step, consumed samples, world size, eval history
      config.yaml, ds_config.json   the resolved run config and the DeepSpeed JSON actually used
    latest                          the tag of the newest *complete* checkpoint

Crash safety: `latest` is replaced atomically (write + rename) only after a barrier proves every
rank finished writing its shards, so a kill during a save leaves `latest` pointing at the previous
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

from pipeline.io_utils import atomic_write_text

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
        self._barrier()
        # save_latest=False: DeepSpeed would otherwise write its own `latest` before every rank is done.
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save(rng_state(), tag_dir / f".rng_rank{self.rank}.pt.tmp")
        os.replace(tag_dir / f".rng_rank{self.rank}.pt.tmp", tag_dir / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            for name, text in run_files.items():
                atomic_write_text(tag_dir / name, text)
            atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=2))
        self._barrier()  # every rank's shards are on disk
        if self.rank == 0:
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep=step)
        self._barrier()
        return tag_dir

    def _prune(self, keep: int) -> None:
        steps = [s for s in checkpoint_steps(self.dir) if s <= keep]
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.dir / f"step_{s}", ignore_errors=True)

    def load_latest(self, engine) -> dict | None:
        """Load the newest complete checkpoint into `engine`; returns its trainer state, or None."""
        tag = read_latest(self.dir)
        if tag is None:
            return None
        tag_dir = self.dir / tag
        state = json.loads((tag_dir / "trainer_state.json").read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        if state.get("world_size", world) != world:
            raise RuntimeError(
                f"checkpoint {tag_dir} was written by {state['world_size']} ranks but this run has {world}; "
                f"ZeRO-3 shards are per rank: resume with {state['world_size']} ranks, or export the "
                "checkpoint (python -m pipeline.export) and start a new run from it"
            )
        load_path, _ = engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        return state
