"""The run's data: the start-up check every rank must agree on before the engine is built, and the
datasets with this rank's micro-batches.

    identity, notes = check_data(cfg.data, vocab_size, rank, world)
    data = RunData.build(cfg.data, micro_batch_size, dp_rank, dp_world, consumed_samples, order, prefetch)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data import MicroBatchIterator, build_dataset, check_vocab_compatible, source_paths
from pipeline.data.shard_cache import ShardCache
from pipeline.distributed.collectives import gather_objects
from pipeline.train.config import DataConfig


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
    dirs = list(dict.fromkeys(d for d in paths if Path(d).is_dir()))
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
