"""CheckpointManager: saving and loading a run's checkpoints, with the save policy (only finite
weights, crash safety, pruning). Which checkpoint is the latest lives in tags.py, the resume checks
in resume.py, the run state in run_state.py, RNG streams in pipeline/rng.py. Checkpoints live in
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

Asynchronous saves (`async_save`, async_writer.py): the same steps and files, but the main thread
only snapshots this rank's state into reused host buffers; the writes, the agreement (over a side
gloo group) and the commit above run in a background thread, one save at a time; `wait()` ends it.
"""

from __future__ import annotations

import pickle
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.checkpoint.async_writer import AsyncSaver, host_memory_shortfall, local_world_size, mem_available_bytes
from pipeline.checkpoint.format import (
    INDEX,
    StateReader,
    file_checksum,
    load_state,
    owned_bytes,
    owned_tensors,
    write_error_reason,
    write_index,
    write_owned,
)
from pipeline.checkpoint.resume import BatchSettings, check_resume
from pipeline.checkpoint.run_state import RunState
from pipeline.checkpoint.tags import (
    LATEST,
    TRAINER_STATE,
    checkpoint_steps,
    complete_tags,
    is_complete,
    prunable,
    read_latest,
    tag_of,
)
from pipeline.checkpoint.zero_state import (
    link_optimizer_state,
    optimizer_step_count,
    set_engine_counters,
    set_optimizer_step_count,
)
from pipeline.distributed.collectives import any_rank, barrier, first_error, from_rank0
from pipeline.distributed.process_group import side_group_of_all_ranks
from pipeline.distributed.ranks import current
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text
from pipeline.rng import reseed, rng_state, set_rng_state


@dataclass(frozen=True)
class Resumed:
    """What load_latest restored: the checkpoint, its run state, and whether per-rank RNG streams
    were restored (the same world size and expert-parallel size wrote it) or reseeded."""

    path: Path
    state: RunState
    same_shape: bool


def local_params_finite(engine) -> bool:
    """True on every rank iff every rank's share of every parameter is finite (MAX all-reduce)."""
    bad = False
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)
        if local.numel() and not torch.isfinite(local).all():
            bad = True
            break
    return not any_rank(bad, engine.device)


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, async_save: bool = False):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        view = current()
        self.rank, self.world = view.rank, view.world
        self.saver = AsyncSaver(pin=torch.cuda.is_available()) if async_save else None
        self.side_group = None  # the background writers' own process group (async_writer.py)

    def prepare_async(self, engine, required: bool) -> str | None:
        """At start-up, after the engine build (collective: every rank calls it): checks an
        asynchronous save's host memory on each node and creates the background writers' process
        group now, while the rendezvous store is surely there (a stop after the launcher died saves
        without it). Short of memory: ConfigError if `required` (train.async_save=true), else this
        manager saves synchronously from now on and the note says so. None when nothing is to be said."""
        if self.saver is None:
            return None
        short = host_memory_shortfall(owned_bytes(engine.module), local_world_size(), mem_available_bytes())
        short = first_error(None if short is None else f"rank {self.rank}: {short}")
        if short is None:
            self.side_group = side_group_of_all_ranks()
            return None
        if required:
            raise ConfigError(f"{short}; set train.async_save=false (synchronous saves need no extra host "
                              "memory), or run fewer ranks per node")
        self.saver = None
        return f"{short}: saving synchronously (train.async_save=false); set it true to require asynchronous saves"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        tag = read_latest(self.dir)
        return None if tag is None else self.dir / tag

    # --- resume policy ------------------------------------------------------------------------
    def check_resume(self, model: dict, train: BatchSettings, run_dir: Path, sequence_parallel_size: int = 1,
                     data: dict | None = None) -> list[str]:
        """resume.check_resume on the latest checkpoint for this run's data-parallel size (ranks /
        sequence_parallel_size); nothing to check (no notes) without a checkpoint."""
        where = self.latest()
        if where is None:
            return []
        return check_resume(where, self.dir, model, train, run_dir, self.world // sequence_parallel_size, data)

    # --- save ---------------------------------------------------------------------------------
    def save(self, engine, state: RunState, run_files: dict[str, str]) -> Path:
        """Write checkpoint step_{state.step} (collective; see the module docstring for the order).
        Asynchronous (`async_save`): returns once this rank's state is in host memory; the files and
        the commit follow in the background (async_writer.py); `wait()` returns when they are done."""
        self.wait()  # at most one save in flight; raises the error of the previous one
        step = state.step
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
        state = replace(state, optimizer_step=optimizer_step_count(engine))
        link_optimizer_state(engine)
        if self.saver is None:
            if error := self._write_and_commit(tag_dir, state, run_files, rng_state(), owned_tensors(engine.module)):
                raise CheckpointError(error)
            return tag_dir
        if self.side_group is None:  # not prepared at start-up (prepare_async): now, on every rank
            self.side_group = side_group_of_all_ranks()
        rng = rng_state()
        tensors = self.saver.buffers.snapshot(owned_tensors(engine.module, self.saver.gather))  # collective
        self.saver.submit(lambda: self._finish_async(tag_dir, state, run_files, rng, tensors), name=str(tag_dir))
        return tag_dir

    def committed(self) -> str | None:
        """A line for the log once a background save has committed (checked without waiting), else None."""
        done = self.saver.finished() if self.saver is not None else None
        return None if done is None else self._committed_line(*done)

    @staticmethod
    def _committed_line(tag_dir: str, seconds: float) -> str:
        return f"saved checkpoint {tag_dir} ({seconds:.1f} s in the background)"

    def _finish_async(self, tag_dir, state, run_files, rng, tensors) -> None:
        if error := self._write_and_commit(tag_dir, state, run_files, rng, tensors, self.side_group):
            raise CheckpointError(error)

    def wait(self) -> str | None:
        """Return once no save is in flight (at once for synchronous saves); raises CheckpointError
        if the last one failed. Every rank calls it at the same point (it ends a save on every rank).
        Returns the log line of the save that was in flight, if one was."""
        done = self.saver.wait() if self.saver is not None else None
        return None if done is None else self._committed_line(*done)

    def _write_and_commit(self, tag_dir: Path, state: RunState, run_files: dict[str, str], rng: dict,
                          tensors, group=None) -> str | None:
        """This rank's files; then every rank's results meet (collectives over `group`) and rank 0
        commits: index.json, trainer_state.json, `latest`, pruning. Returns the one-line error of a
        failed save (its partial dir removed), else None. The synchronous save runs it on the main
        thread with the default group, the asynchronous one in its thread with the side group."""
        written, error = [], None
        try:  # before the tensors, so that index.json holds their checksums
            atomic_write_bytes(tag_dir / f"rng_rank{self.rank}.pt", lambda f: torch.save(rng, f))
            written.append(f"rng_rank{self.rank}.pt")
            if self.rank == 0:
                for name, text in run_files.items():
                    atomic_write_text(tag_dir / name, text)
                    written.append(name)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            error = f"writing into {tag_dir} failed ({write_error_reason(e)})"
        try:
            mine = write_owned(tag_dir, tensors, written, error)
        except Exception as e:  # noqa: BLE001 (a bug, not an I/O error)
            if group is None:  # synchronous: the tensors' iteration gathers, so the ranks are out of step anyway
                raise
            # In the background the tensors are snapshots (no collective): this rank still meets the
            # others below with its failure, so that their writer threads do not wait for it.
            mine = {"files": {}, "checksums": {}, "extra": {},
                    "error": f"writing into {tag_dir} failed ({type(e).__name__}: {e})"}
        errors = write_index(tag_dir, mine, group=group)  # collective
        error = "; ".join(errors) if errors else None
        if self.rank == 0 and not error:
            try:
                atomic_write_text(tag_dir / TRAINER_STATE, state.to_json())  # complete now
                atomic_write_text(self.dir / LATEST, tag_dir.name)
            except OSError as e:
                error = f"rank 0: writing {tag_dir / TRAINER_STATE} or {self.dir / LATEST} failed ({e.strerror})"
                (tag_dir / TRAINER_STATE).unlink(missing_ok=True)
        error = from_rank0(error, group)
        if error:
            return self._failed(tag_dir, error)
        if self.rank == 0:
            for s in prunable(checkpoint_steps(self.dir), state.step, self.keep_last):
                shutil.rmtree(self.dir / tag_of(s), ignore_errors=True)
        barrier(group)
        return None

    def save_if_finite(self, engine, state: RunState, run_files: dict[str, str]) -> Path | None:
        """The save policy: a checkpoint is only ever written from finite weights (checked on every
        rank's shard, collective). Returns the checkpoint written, or None when the weights are not finite."""
        if not local_params_finite(engine):
            return None
        return self.save(engine, state, run_files)

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
    def _read_rng_file(self, rng_file: Path, reader: StateReader) -> dict:
        """This rank's RNG states, verified; CheckpointError naming the file when it is missing, damaged
        or unreadable (inside load_latest's rank agreement: one rank's fault must stop every rank)."""
        fix = self.resume_fix(rng_file.parent.name)
        if not rng_file.is_file():  # every rank of the shape that wrote a checkpoint writes its own
            raise CheckpointError(f"checkpoint file {rng_file} is missing; {fix}")
        want = reader.file_checksums.get(rng_file.name)
        if want is not None and file_checksum(rng_file) != want:
            raise CheckpointError(f"checkpoint file {rng_file} fails its checksum; {fix}")
        try:
            return torch.load(rng_file, weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"checkpoint file {rng_file} cannot be read ({e}); {fix}") from None

    def load_latest(self, engine, expert_parallel_size: int, grad_accum_steps: int, seed: int) -> Resumed | None:
        """Load the newest complete checkpoint into `engine`, whatever shape wrote it; returns its run
        state and whether per-rank RNG states were restored (`same_shape`), or None."""
        tag_dir = self.latest()
        if tag_dir is None:
            return None
        state = RunState.read(tag_dir)
        if not (tag_dir / INDEX).is_file():
            raise CheckpointError(
                f"{tag_dir} holds no {INDEX}: it is incomplete, or in DeepSpeed's per-rank format of versions "
                "before the reshardable format, which this version does not read; resume it once with such a "
                "version (its next checkpoint is reshardable), or point "
                f"{self.dir / LATEST} at an earlier checkpoint"
            )
        # Per-rank RNG streams are restored only onto the shape that wrote them.
        written_ep = state.expert_parallel_size if state.expert_parallel_size is not None else expert_parallel_size
        same_shape = state.world_size == self.world and written_ep == expert_parallel_size
        rng_file = tag_dir / f"rng_rank{self.rank}.pt"
        error, rng = None, None
        try:  # each tensor is verified by one of its readers: the others must learn of a failure
            reader = load_state(engine, tag_dir, fix=self.resume_fix(tag_dir.name))
            if same_shape:
                rng = self._read_rng_file(rng_file, reader)
        except CheckpointError as e:
            error = str(e)
        if error := first_error(error):
            raise CheckpointError(error)
        if state.optimizer_step is not None:
            set_optimizer_step_count(engine, state.optimizer_step)
        set_engine_counters(engine, state.step, state.consumed_samples, grad_accum_steps)
        if rng is not None:
            set_rng_state(rng)
        else:  # per-rank streams cannot be re-dealt to other ranks
            reseed(seed, state.step, self.rank)
            same_shape = False
        return Resumed(tag_dir, state, same_shape)
