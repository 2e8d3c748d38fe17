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

Crash safety: `trainer_state.json` is written last, by rank 0, once every rank reported its files
written (and index.json holds their checksums): a `step_N/` with it is *complete*. `latest` is then
replaced atomically, so a kill during a save leaves `latest` pointing at the previous complete
checkpoint. A `latest` that is missing, empty or names an incomplete tag never means "start fresh"
while complete checkpoints exist: the newest complete one is resumed, and the run says so. A save
that fails (disk full, I/O error) on any rank removes its own half-written `step_N/` on every rank's
word and stops with one line; the previous checkpoint is untouched. Clean-up deletes only an
incomplete `step_N/` (no trainer_state.json: provably a leftover) and, after `latest` moved past
them, checkpoints older than the last `keep_last`; a complete `step_N/` that a save would
overwrite (the user pointed `latest` back) is renamed aside, never deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import CheckpointError
from pipeline.io_utils import atomic_write_text
from pipeline.train.universal_ckpt import (
    INDEX,
    StateReader,
    file_checksum,
    load_state,
    save_state,
    write_error_reason,
)
from pipeline.train.zero_state import (
    link_optimizer_state,
    optimizer_step_count,
    set_engine_counters,
    set_optimizer_step_count,
)

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
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


def is_complete(tag_dir: Path) -> bool:
    """The save finished: trainer_state.json, written last, parses. (Damage after the save, e.g. a
    truncated or flipped file, is not judged here but by the reader, which refuses it naming the
    file: a damaged checkpoint must stop the run, never be mistaken for "no checkpoint".)"""
    try:
        return "step" in json.loads((tag_dir / TRAINER_STATE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints, newest first."""
    ckpt_dir = Path(ckpt_dir)
    return [f"step_{s}" for s in reversed(checkpoint_steps(ckpt_dir)) if is_complete(ckpt_dir / f"step_{s}")]


def latest_problem(ckpt_dir: Path) -> str | None:
    """Why `latest` cannot be used as it is (None: it names a complete checkpoint, or there is none)."""
    path = Path(ckpt_dir) / LATEST
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    if not path.is_file():
        why = f"{path} is missing"
    else:
        tag = path.read_text().strip()
        if tag and is_complete(Path(ckpt_dir) / tag):
            return None
        why = f"{path} is empty" if not tag else f"{path} names {tag}, which is not a complete checkpoint"
    return f"{why}: resuming from the newest complete checkpoint, {tags[0]}"


def read_latest(ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from: the tag `latest` names if that checkpoint is complete, else the
    newest complete one (see `latest_problem`), else None (nothing to resume)."""
    path = Path(ckpt_dir) / LATEST
    try:
        tag = path.read_text().strip()
    except OSError:
        tag = ""
    if tag and is_complete(Path(ckpt_dir) / tag):
        return tag
    tags = complete_tags(ckpt_dir)
    return tags[0] if tags else None


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _agree(self, error: str | None) -> str | None:
        """Rank 0's verdict (which includes every rank's errors) reaches every rank."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            return box[0]
        return error

    def save(self, engine, step: int, trainer_state: dict, run_files: dict[str, str]) -> Path:
        tag = f"step_{step}"
        tag_dir = self.dir / tag
        error = None
        if self.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():
                    if is_complete(tag_dir):  # `latest` was pointed back past it: keep it, aside
                        tag_dir.rename(tag_dir.with_name(f"{tag}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
                    else:
                        shutil.rmtree(tag_dir)  # leftovers of a save that was killed half-way
                tag_dir.mkdir(parents=True)
            except OSError as e:
                error = f"rank 0: creating {tag_dir} failed ({e.strerror})"
        error = self._agree(error)
        if error:
            raise CheckpointError(self._failed(tag_dir, error))
        trainer_state = {**trainer_state, "optimizer_step": optimizer_step_count(engine)}
        link_optimizer_state(engine)
        written, error = [], None
        try:  # before save_state, so that index.json holds their checksums
            torch.save(rng_state(), tag_dir / f".rng_rank{self.rank}.pt.tmp")
            os.replace(tag_dir / f".rng_rank{self.rank}.pt.tmp", tag_dir / f"rng_rank{self.rank}.pt")
            written.append(f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                for name, text in run_files.items():
                    atomic_write_text(tag_dir / name, text)
                    written.append(name)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            error = f"writing into {tag_dir} failed ({write_error_reason(e)})"
        errors = save_state(engine.module, tag_dir, written, error)  # collective; every rank's errors
        error = "; ".join(errors) if errors else None
        if self.rank == 0 and not error:
            try:
                atomic_write_text(tag_dir / TRAINER_STATE, json.dumps(trainer_state, indent=2))  # complete now
                atomic_write_text(self.dir / LATEST, tag)
            except OSError as e:
                error = f"rank 0: writing {tag_dir / TRAINER_STATE} or {self.dir / LATEST} failed ({e.strerror})"
                (tag_dir / TRAINER_STATE).unlink(missing_ok=True)
        error = self._agree(error)
        if error:
            raise CheckpointError(self._failed(tag_dir, error))
        if self.rank == 0:
            self._prune(keep=step)
        self._barrier()
        return tag_dir

    def _failed(self, tag_dir: Path, error: str) -> str:
        """Remove this save's own half-written dir (rank 0) and say what to do, in one line."""
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        good = read_latest(self.dir)
        kept = f"the last complete checkpoint {self.dir / good} is kept" if good else "no earlier checkpoint exists"
        return (f"could not save checkpoint {tag_dir}: {error}; the partial {tag_dir.name} was removed and {kept}. "
                "Free space on that filesystem (or fix the error) and run the same command again to resume")

    def _prune(self, keep: int) -> None:
        steps = [s for s in checkpoint_steps(self.dir) if s <= keep]
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(self.dir / f"step_{s}", ignore_errors=True)

    def resume_fix(self, tag: str) -> str:
        """What to do when checkpoint `tag` cannot be loaded: the other complete checkpoints."""
        others = [t for t in complete_tags(self.dir) if t != tag]
        listed = f"complete ones: {', '.join(others)}" if others else f"none other is complete in {self.dir}"
        return (f"restore it, or resume from an earlier checkpoint by writing its tag into {self.dir / LATEST} "
                f"({listed})")

    def last_good(self) -> str | None:
        """The newest complete checkpoint whose every tensor verifies (checksum, finite); collective:
        the files are dealt over the ranks."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        for tag in complete_tags(self.dir):
            problem = None
            try:
                if (self.dir / tag / INDEX).is_file():
                    StateReader(self.dir / tag).verify(self.rank, world)
            except CheckpointError as e:
                problem = str(e)
            if dist.is_initialized() and world > 1:
                problems: list = [None] * world
                dist.all_gather_object(problems, problem)
                problem = next((p for p in problems if p), None)
            if problem is None:
                return tag
        return None

    def last_good_message(self, verified: bool = False) -> str:
        tag = self.last_good() if verified else read_latest(self.dir)
        if tag is None:
            return "no checkpoint was written yet" if not complete_tags(self.dir) else "no checkpoint verifies"
        return f"{'last good' if verified else 'newest complete'} checkpoint: {self.dir / tag}"

    def _check_rng_file(self, tag_dir: Path, tag: str, state: dict, world: int, ep: int) -> None:
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        same_shape = state.get("world_size") == world and state.get("expert_parallel_size", ep) == ep
        want = StateReader(tag_dir).file_checksums.get(rng_file.name)
        if same_shape and want is not None and file_checksum(rng_file) != want:
            raise CheckpointError(f"checkpoint file {rng_file} fails its checksum; {self.resume_fix(tag)}")

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
            error = None
            try:  # each tensor is verified by one of its readers: the others must learn of a failure
                load_state(engine, tag_dir, fix=self.resume_fix(tag))
                self._check_rng_file(tag_dir, tag, state, world, expert_parallel_size)
            except CheckpointError as e:
                error = str(e)
            if dist.is_initialized() and world > 1:
                found: list = [None] * world
                dist.all_gather_object(found, error)
                error = next((e for e in found if e), None)
            if error:
                raise CheckpointError(error)
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
