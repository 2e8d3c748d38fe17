"""The run's data at start-up: the check every rank must agree on before the engine is built.

    identity, notes = check_data(train, valid, vocab_size, verify, rank, world)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.distributed.collectives import gather_objects


def check_data(train: list, valid: list | None, vocab_size: int, verify: bool, rank: int,
               world: int) -> tuple[dict, list[str]]:
    """Before the engine build: every shard's recorded id range fits the model, and (data.verify_checksums)
    every file's sha256 matches its manifest, the files dealt over the ranks. Returns the identity of
    `data.train` stored in checkpoints, and notes to log."""
    from pipeline.data import load_manifest, source_paths
    from pipeline.data.identity import check_token_ranges, data_identity, verify_checksums
    from pipeline.errors import DataError

    dirs = list(dict.fromkeys(d for d in source_paths(train) + source_paths(valid or []) if Path(d).is_dir()))
    notes = check_token_ranges([load_manifest(d) for d in dirs], vocab_size)
    if verify:
        problems = verify_checksums(dirs, rank, world)
        problems = [p for part in gather_objects(problems) for p in part]
        if problems:
            raise DataError(f"data.verify_checksums: {len(problems)} problem(s): {'; '.join(problems[:3])}"
                            f"{' ...' if len(problems) > 3 else ''}; re-prepare that data "
                            "(`python -m pipeline.prepare` with the same command repairs it)")
        notes.append(f"data.verify_checksums: every file of {', '.join(map(str, dirs))} matches its sha256")
    return data_identity(train), notes

