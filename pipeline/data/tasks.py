"""Prepare across nodes: which inputs one of N tasks (a SLURM array task) tokenises, and where it writes.

The inputs, in their expanded order, are laid end to end as one byte stream of `total` bytes and
cut into N equal byte ranges; task t owns [t * total // N, (t + 1) * total // N). A record belongs
to the task whose range holds its first byte:
- an uncompressed JSONL file is cut inside: a task reads the lines that *start* in its range
  (line-aligned; the line that straddles a cut belongs to the task before);
- a Parquet file is cut between row groups: a row group belongs to the task holding its first byte;
- any other input (plain text, .gz/.zst JSONL, which cannot be entered mid-stream, a saved
  Hugging Face dataset) is one record: the task holding its first byte reads it whole.
Every line / row group / file thus goes to exactly one task, tasks read contiguous stretches in
input order, and the plan is a pure function of the input list and N (datatrove instead deals
whole files round-robin, so one huge file stays on one task).

Task t of N writes only DIR/tasks/task_<t>_of_<N>/: a complete prepared dir of its own (shards,
tokenizer/, resume state, manifest.json written last by write-then-rename), so the single-task
prepare's resume-after-kill holds per task. pipeline/data/merge.py writes DIR/manifest.json.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

from pipeline.data.readers import COMPRESSED, Source
from pipeline.errors import ConfigError, DataError

TASKS_DIR = "tasks"
_TASK_DIR_RE = re.compile(r"^task_(\d{5})_of_(\d{5})$")


def task_dir(out: Path, index: int, count: int) -> Path:
    return Path(out) / TASKS_DIR / f"task_{index:05d}_of_{count:05d}"


def parse_task_dir(name: str) -> tuple[int, int] | None:
    """`task_00003_of_00008` -> (3, 8); None for any other name."""
    m = _TASK_DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def resolve_task(num_tasks: int | None, task_index: int | None, env=os.environ) -> tuple[int, int]:
    """(index, count) from the flags, else from a SLURM array task's variables, else (0, 1).

    Under `sbatch --array=A-B` SLURM sets SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID and
    SLURM_ARRAY_TASK_MIN; the task index is ID - MIN, so `--array=1-8` works as well as `0-7`."""
    if num_tasks is None and env.get("SLURM_ARRAY_TASK_COUNT"):
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    if task_index is None and env.get("SLURM_ARRAY_TASK_ID") and num_tasks is not None and num_tasks > 1:
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
    num_tasks = 1 if num_tasks is None else num_tasks
    if num_tasks < 1:
        raise ConfigError(f"--num-tasks must be >= 1, got {num_tasks}")
    if task_index is None:
        if num_tasks > 1:
            raise ConfigError(f"--num-tasks {num_tasks} needs --task-index I (0..{num_tasks - 1}), "
                              "or run it as a SLURM array task (sbatch --array=0-N-1)")
        task_index = 0
    if not 0 <= task_index < num_tasks:
        raise ConfigError(f"--task-index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks}); "
                          f"submit the array as sbatch --array=0-{num_tasks - 1}")
    return task_index, num_tasks


def _splittable(src: Source) -> bool:
    return src.kind == "parquet" or (src.kind == "jsonl" and not src.path.lower().endswith(COMPRESSED))


def _size(src: Source) -> int:
    """Bytes an input counts for in the plan (a Hub dataset, whose size is unknown, counts 0)."""
    if src.kind == "hf_hub":
        return 0
    p = Path(src.path)
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else p.stat().st_size


def plan_digest(sources: list[Source], count: int) -> str:
    """Identifies the input list and task count that a plan was dealt from: tasks dealt from
    different lists (another glob, a file added) must not be merged."""
    items = [[s.kind, s.path, _size(s)] for s in sources]
    return hashlib.sha256(json.dumps([items, count]).encode()).hexdigest()[:16]


def _row_group_starts(path: str) -> list[int]:
    """Byte offset in the file where each row group's first column chunk starts."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    starts = []
    for k in range(meta.num_row_groups):
        rg = meta.row_group(k)
        chunks = [rg.column(j) for j in range(rg.num_columns)]
        starts.append(min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
                          for c in chunks))
    return starts


def task_sources(sources: list[Source], index: int, count: int) -> list[Source]:
    """The inputs (whole or a part) that task `index` of `count` reads, in input order."""
    if count == 1:
        return list(sources)
    sizes = [_size(s) for s in sources]
    total = sum(sizes)
    bounds = [t * total // count for t in range(count + 1)]
    lo, hi = bounds[index], bounds[index + 1]
    owner = lambda pos: min(bisect.bisect_right(bounds, pos) - 1, count - 1)  # noqa: E731
    mine: list[Source] = []
    base = 0
    for src, size in zip(sources, sizes, strict=True):
        start, end = max(lo, base) - base, min(hi, base + size) - base  # my range inside this file
        if not _splittable(src) or size == 0:
            if owner(base) == index:
                mine.append(src)
        elif start < end and src.kind == "jsonl":
            mine.append(src if (start, end) == (0, size) else dataclasses.replace(src, part=(start, end)))
        elif start < end:
            starts = _row_group_starts(src.path)
            groups = [k for k, off in enumerate(starts) if start <= off < end]
            if groups and len(groups) == len(starts):
                mine.append(src)
            elif groups:
                mine.append(dataclasses.replace(src, part=(groups[0], groups[-1] + 1)))
        base += size
    return mine
