"""The run's data: the start-up check every rank must agree on before the engine is built, and the
datasets with this rank's micro-batches.

    identity, notes = check_data(cfg.data, vocab_size, rank, world)
    verifier, notes = start_background_verify(cfg.data, rank, world)       # damaged files found while training
    if stop.agreed(verifier.problem is not None): error = damaged_data_error(verifier, step, saved)
    data = RunData.build(cfg.data, micro_batch_size, dp_rank, dp_world, consumed_samples, order, prefetch)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data import MicroBatchIterator, build_dataset, check_vocab_compatible, source_paths
from pipeline.data.background_verify import BackgroundVerifier, deal_by_size, manifest_checksums
from pipeline.data.shard_cache import ShardCache
from pipeline.distributed.collectives import first_error, gather_objects
from pipeline.errors import DataError
from pipeline.train.config import DataConfig


def _prepared_dirs(data: DataConfig) -> list[str]:
    """The prepared dirs (not bare Megatron prefixes) of data.train and data.valid, each once."""
    return list(dict.fromkeys(d for d in source_paths(data.train) + source_paths(data.valid or []) if Path(d).is_dir()))


def check_data(data: DataConfig, vocab_size: int, rank: int, world: int, run_dir: Path) -> tuple[dict, list[str]]:
    """Before the engine build: the data's tokenizer fits the model's vocabulary, every shard's recorded
    id range fits the model (a Megatron prefix's range is read once, dealt over the ranks, and cached in
    a sidecar, or under `run_dir` where its directory is read-only), and (data.verify_checksums) every
    file's sha256 matches its manifest, the files dealt over the ranks. Returns the identity of
    `data.train` (and of the sample map built from it) stored in checkpoints, and notes to log."""
    from pipeline.data import load_manifest
    from pipeline.data.identity import check_token_ranges, data_identity, verify_checksums
    from pipeline.data.megatron_sources import (
        bare_prefixes,
        check_prefix_ids,
        check_prefixes,
        prefix_facts,
        recorded_notes,
        tokenizer_facts,
        tokenizer_notes,
    )
    from pipeline.errors import DataError

    train, valid = data.train, data.valid
    paths = source_paths(train) + source_paths(valid or [])
    dirs = _prepared_dirs(data)
    check_vocab_compatible(dirs, vocab_size)
    notes = check_token_ranges([load_manifest(d) for d in dirs], vocab_size)
    given = tokenizer_facts(data.tokenizer) if data.tokenizer else None
    notes += tokenizer_notes(paths, data.tokenizer, given)
    prefixes, fallback = list(dict.fromkeys(bare_prefixes(paths))), Path(run_dir) / "data_ranges"
    check_prefixes(prefixes)
    parts = gather_objects(prefix_facts(prefixes[rank::world], fallback))
    facts = {p: f for mine, _, _ in parts for p, f in mine.items()}
    notes += recorded_notes([p for _, read, _ in parts for p in read], [p for *_, fb in parts for p in fb], fallback)
    check_prefix_ids(facts, min(vocab_size, given["vocab_size"]) if given else vocab_size)
    if data.verify_checksums:
        problems = verify_checksums(dirs, rank, world)
        problems = [p for part in gather_objects(problems) for p in part]
        if problems:
            raise DataError(f"data.verify_checksums: {len(problems)} problem(s): {'; '.join(problems[:3])}"
                            f"{' ...' if len(problems) > 3 else ''}; re-prepare that data "
                            "(`python -m pipeline.prepare` with the same command repairs it)")
        notes.append(f"data.verify_checksums: every file of {', '.join(map(str, dirs))} matches its sha256")
    return data_identity(train, data.seq_len, data.seed, facts, given if prefixes else None), notes

def start_background_verify(data: DataConfig, rank: int, world: int) -> tuple[BackgroundVerifier | None, list[str]]:
    """The background sha256 check of this rank's share of every data file (data.verify_rate_mb_s),
    started; and notes to log. None when off, or when data.verify_checksums checked every file already.
    Bare Megatron prefixes have no manifest and so no checksums: they are not checked."""
    if data.verify_rate_mb_s == 0 or data.verify_checksums:
        return None, []
    files, notes = manifest_checksums(_prepared_dirs(data))
    if not files:
        return None, notes
    shares = deal_by_size(files, world)
    longest = max(sum(f.size for f in share) for share in shares) / (data.verify_rate_mb_s * 1e6)
    notes.append(f"data: checking the sha256 of {len(files)} files ({sum(f.size for f in files) / 1e9:.3g} GB) in the "
                 f"background, dealt over {world} rank(s) at {data.verify_rate_mb_s:g} MB/s each (about "
                 f"{_duration(longest)} per pass); data.verify_rate_mb_s=0 turns it off")
    return BackgroundVerifier(shares[rank], data.verify_rate_mb_s).start(), notes


def damaged_data_error(verifier: BackgroundVerifier | None, step: int, saved: bool) -> DataError | None:
    """Collective (every rank calls it when `StopSignal.agreed` said stop): the error of the lowest
    rank whose background check found a damaged file, or None. `saved`: a checkpoint was written at `step`."""
    problem = first_error(verifier.problem if verifier is not None else None)
    if problem is None:
        return None
    return DataError(f"damaged data: {problem}, found by the background check (data.verify_rate_mb_s); training "
                     f"stopped at step {step} {'with a checkpoint' if saved else 'without a new checkpoint'}. Restore "
                     "that file, or rerun the same `python -m pipeline.prepare` command (it rebuilds what fails its "
                     "checksum), then run the same training command to resume")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"



@dataclass
class RunData:
    """The run's datasets and this rank's micro-batches: `train_iter` continues from the samples the
    run consumed; `valid_batches()` starts over every time, so evaluations are comparable."""

    train: object
    valid: object
    train_iter: MicroBatchIterator
    micro_batch_size: int
    dp_rank: int
    dp_world: int

    @classmethod
    def build(cls, data: DataConfig, micro_batch_size: int, dp_rank: int, dp_world: int, consumed: int,
              order: str, prefetch: int) -> RunData:
        """`order`: the sample order (data.identity: the run's own when resuming); `prefetch`: micro-batches
        read ahead in the background while the step computes (the step's wait is time/data_wait)."""
        shards = ShardCache(data.max_open_files)  # one bound on open data files for both splits
        train = build_dataset(data.train, "train", data.seq_len, data.seed, shards, order)
        train_iter = MicroBatchIterator(train, micro_batch_size, dp_rank, dp_world, consumed, prefetch=prefetch)
        valid = build_dataset(data.valid or data.train, "valid", data.seq_len, data.seed, shards, order)
        return cls(train, valid, train_iter, micro_batch_size, dp_rank, dp_world)

    def valid_batches(self) -> MicroBatchIterator:
        return MicroBatchIterator(self.valid, self.micro_batch_size, self.dp_rank, self.dp_world, 0)
