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

Resume checks: the same model, the same global batch, and the same data (data/identity.py) unless
train.allow_data_change.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.distributed.collectives import barrier, first_error, from_rank0
from pipeline.distributed.ranks import current
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text
from pipeline.model.config import differing_fields
from pipeline.train.checkpoint.format import (
    INDEX,
    StateReader,
    file_checksum,
    load_state,
    save_state,
    write_error_reason,
)
from pipeline.train.checkpoint.zero_state import (
    link_optimizer_state,
    optimizer_step_count,
    set_engine_counters,
    set_optimizer_step_count,
)
from pipeline.train.config import TrainConfig

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
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


def is_complete(tag_dir: Path) -> bool:
    """The save finished: trainer_state.json, written last, parses. (Damage after the save, e.g. a
    truncated or flipped file, is not judged here but by the reader, which refuses it naming the
    file: a damaged checkpoint must stop the run, never be mistaken for "no checkpoint".)"""
    try:
        return "step" in json.loads((Path(tag_dir) / TRAINER_STATE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints, newest first."""
    ckpt_dir = Path(ckpt_dir)
    return [tag_of(s) for s in reversed(checkpoint_steps(ckpt_dir)) if is_complete(ckpt_dir / tag_of(s))]


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
    try:
        tag = (Path(ckpt_dir) / LATEST).read_text().strip()
    except OSError:
        tag = ""
    if tag and is_complete(Path(ckpt_dir) / tag):
        return tag
    tags = complete_tags(ckpt_dir)
    return tags[0] if tags else None


def find_checkpoint(ckpt_dir: Path, step: int | None = None) -> Path:
    """`step_N/` (the latest if `step` is None); ConfigError if it is absent or incomplete."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step) if step is not None else read_latest(ckpt_dir)
    if tag is None or not is_complete(ckpt_dir / tag):
        raise ConfigError(f"no complete checkpoint {tag_of(step) if step is not None else '(latest)'} under "
                          f"{ckpt_dir}; train first or pass --step with an existing step_N")
    return ckpt_dir / tag


def prunable(steps: list[int], keep: int, keep_last: int) -> list[int]:
    """Of the checkpoint steps on disk, those to delete once `keep` is the latest: all but the newest
    `keep_last` up to `keep` (later ones, e.g. of a run that went further before a restart from an
    earlier step, are left alone)."""
    upto = [s for s in sorted(steps) if s <= keep]
    return upto[: max(0, len(upto) - keep_last)]


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
        view = current()
        self.rank, self.world = view.rank, view.world

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        tag = read_latest(self.dir)
        return None if tag is None else self.dir / tag

    # --- resume policy ------------------------------------------------------------------------
    def check_resume(self, model: dict, train: TrainConfig, run_dir: Path, sequence_parallel_size: int = 1,
                     data: dict | None = None) -> list[str]:
        """ConfigError (before any engine is built) if the latest checkpoint cannot be resumed by
        this run: a different model (`model` is the run's resolved model section), a different
        global batch (micro-batch x grad-accum x data-parallel ranks = ranks / sequence_parallel_size,
        for the checkpoint's run and this one), or other data (`data`: data.identity.data_identity of
        this run's data.train). Returns notes to log (a `latest` that was not usable, an allowed data
        change)."""
        where = self.latest()
        if where is None:
            return []
        notes = [p] if (p := latest_problem(self.dir)) else []
        saved_cfg = yaml.safe_load((where / "config.yaml").read_text())
        saved = {k: v for k, v in saved_cfg["model"].items() if k != "init_from"}
        diff = sorted(differing_fields(saved, {k: v for k, v in model.items() if k != "init_from"}))
        if diff:
            raise ConfigError(
                f"{run_dir} holds checkpoints of a different model (fields differ: {', '.join(diff)}); "
                "use a new run_dir, or the same model settings to resume"
            )
        saved_state = json.loads((where / TRAINER_STATE).read_text())
        saved_sp = int(saved_cfg.get("parallel", {}).get("sequence_parallel_size", 1))
        check_global_batch(saved_cfg["train"], saved_state["world_size"] // saved_sp, train,
                           self.world // sequence_parallel_size, where)
        if data is not None:
            notes += check_data_unchanged(saved_state.get("data"), data, where, train.allow_data_change)
        return notes

    # --- save ---------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict, run_files: dict[str, str]) -> Path:
        tag = tag_of(step)
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
        error = from_rank0(error)  # rank 0's verdict includes every rank's errors
        if error:
            raise CheckpointError(self._failed(tag_dir, error))
        trainer_state = {**trainer_state, "optimizer_step": optimizer_step_count(engine)}
        link_optimizer_state(engine)
        written, error = [], None
        try:  # before save_state, so that index.json holds their checksums
            atomic_write_bytes(tag_dir / f"rng_rank{self.rank}.pt", lambda f: torch.save(rng_state(), f))
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
        error = from_rank0(error)
        if error:
            raise CheckpointError(self._failed(tag_dir, error))
        if self.rank == 0:
            for s in prunable(checkpoint_steps(self.dir), step, self.keep_last):
                shutil.rmtree(self.dir / tag_of(s), ignore_errors=True)
        barrier()
        return tag_dir

    def _failed(self, tag_dir: Path, error: str) -> str:
        """Remove this save's own half-written dir (rank 0) and say what to do, in one line."""
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        good = read_latest(self.dir)
        kept = f"the last complete checkpoint {self.dir / good} is kept" if good else "no earlier checkpoint exists"
        return (f"could not save checkpoint {tag_dir}: {error}; the partial {tag_dir.name} was removed and {kept}. "
                "Free space on that filesystem (or fix the error) and run the same command again to resume")

    def resume_fix(self, tag: str) -> str:
        """What to do when checkpoint `tag` cannot be loaded: the other complete checkpoints."""
        others = [t for t in complete_tags(self.dir) if t != tag]
        listed = f"complete ones: {', '.join(others)}" if others else f"none other is complete in {self.dir}"
        return (f"restore it, or resume from an earlier checkpoint by writing its tag into {self.dir / LATEST} "
                f"({listed})")

    def last_good(self) -> str | None:
        """The newest complete checkpoint whose every tensor verifies (checksum, finite); collective:
        the files are dealt over the ranks."""
        for tag in complete_tags(self.dir):
            problem = None
            try:
                if (self.dir / tag / INDEX).is_file():
                    StateReader(self.dir / tag).verify(self.rank, self.world)
            except CheckpointError as e:
                problem = str(e)
            if first_error(problem) is None:
                return tag
        return None

    def last_good_message(self, verified: bool = False) -> str:
        """`last good checkpoint: PATH` (verified: collective) or `newest complete checkpoint: PATH`."""
        tag = self.last_good() if verified else read_latest(self.dir)
        if tag is None:
            return "no checkpoint was written yet" if not complete_tags(self.dir) else "no checkpoint verifies"
        return f"{'last good' if verified else 'newest complete'} checkpoint: {self.dir / tag}"

    # --- load ---------------------------------------------------------------------------------
    def _check_rng_file(self, rng_file: Path, reader: StateReader) -> None:
        want = reader.file_checksums.get(rng_file.name)
        if want is not None and file_checksum(rng_file) != want:
            raise CheckpointError(f"checkpoint file {rng_file} fails its checksum; "
                                  f"{self.resume_fix(rng_file.parent.name)}")

    def load_latest(self, engine, expert_parallel_size: int, grad_accum_steps: int, seed: int) -> dict | None:
        """Load the newest complete checkpoint into `engine`, whatever shape wrote it; returns its
        trainer state (with `same_shape`: whether per-rank RNG states were restored), or None."""
        tag_dir = self.latest()
        if tag_dir is None:
            return None
        state = json.loads((tag_dir / TRAINER_STATE).read_text())
        if not (tag_dir / INDEX).is_file():
            raise CheckpointError(
                f"{tag_dir} holds no {INDEX}: it is incomplete, or in DeepSpeed's per-rank format of versions "
                "before the reshardable format, which this version does not read; resume it once with such a "
                "version (its next checkpoint is reshardable), or point "
                f"{self.dir / LATEST} at an earlier checkpoint"
            )
        # Per-rank RNG streams are restored only onto the shape that wrote them.
        written_ep = state.get("expert_parallel_size", expert_parallel_size)
        state["same_shape"] = state.get("world_size") == self.world and written_ep == expert_parallel_size
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        error = None
        try:  # each tensor is verified by one of its readers: the others must learn of a failure
            reader = load_state(engine, tag_dir, fix=self.resume_fix(tag_dir.name))
            if state["same_shape"]:
                self._check_rng_file(rng_file, reader)
        except CheckpointError as e:
            error = str(e)
        if error := first_error(error):
            raise CheckpointError(error)
        if "optimizer_step" in state:
            set_optimizer_step_count(engine, state["optimizer_step"])
        set_engine_counters(engine, state["step"], state["consumed_samples"], grad_accum_steps)
        if state["same_shape"] and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:  # per-rank streams cannot be re-dealt to other ranks
            reseed(seed, state["step"], self.rank)
            state["same_shape"] = False
        return state
