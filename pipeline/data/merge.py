"""`--merge DIR`: the N task dirs of a multi-task prepare (pipeline/data/tasks.py) -> DIR/manifest.json.

The merged manifest lists every task's shards in task order under their task-dir path
(`tasks/task_00001_of_00004/train_00000`): shards are not copied or renamed, so each task dir
stays a complete, resumable prepared dir of its own, and a merge writes only DIR/manifest.json and
DIR/tokenizer/ (a copy of the tasks' common tokenizer, which trainer and generator read). Readers
take shard names as paths relative to DIR, so the format is unchanged (format_version 1).

Refused, with one line naming the task and what to do: no tasks, task dirs of two task counts, a
missing task, a task that did not finish, a task dir holding another task's output (a copy or a
duplicate), or a task made with another tokenizer, dtype, split or reader settings, or dealt from
another input list. Merging again gives the same manifest (idempotent), so the automatic merge of
the last task to finish and a dependent `--merge` job may both run; the DIR lock serialises them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.data.manifest import MANIFEST, STATE, write_json_atomic
from pipeline.data.tasks import TASKS_DIR, parse_task_dir, task_dir
from pipeline.errors import DataError
from pipeline.io_utils import sha256_file
from pipeline.run_lock import DirLock

# What every task must share with task 0, and how a mismatch is named. The tokenizer is compared by
# identity (file sha256, vocab size, EOS/BOS ids), not by --tokenizer path: nodes may hold local copies.
_SHARED = (
    (lambda m: {k: v for k, v in m["tokenizer"].items() if k != "dir"}, "tokenizer"),
    (lambda m: m["dtype"], "token dtype"),
    (lambda m: {k: v for k, v in m["fingerprint"]["options"].items() if k in ("valid_fraction", "seed")},
     "split settings (--valid-fraction / --seed)"),
    (lambda m: m["fingerprint"]["options"], "reader / shard options"),
    (lambda m: m["task"]["plan"], "input list (--input)"),
)


def task_counts(out: Path) -> dict[int, list[Path]]:
    """Task count -> the task dirs found under DIR/tasks/ for that count."""
    found: dict[int, list[Path]] = {}
    root = Path(out) / TASKS_DIR
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if (parsed := parse_task_dir(p.name)) is not None:
            found.setdefault(parsed[1], []).append(p)
    return found


def _load_task(out: Path, index: int, count: int) -> dict:
    d = task_dir(out, index, count)
    rerun = f"run it: python -m pipeline.prepare ... --output {out} --num-tasks {count} --task-index {index}"
    if not d.is_dir():
        raise DataError(f"task {index} of {count} is missing (no {d}); {rerun}")
    if not (d / MANIFEST).is_file():
        raise DataError(f"task {index} of {count} did not finish ({d} has no {MANIFEST}); rerun the same command "
                        f"with --task-index {index} to resume it")
    try:
        m = json.loads((d / MANIFEST).read_text())
    except json.JSONDecodeError:
        raise DataError(f"task {index} of {count}: {d / MANIFEST} is not valid JSON; {rerun} --overwrite") from None
    task = m.get("task") or {}
    if (task.get("index"), task.get("count")) != (index, count):
        raise DataError(f"task dir {d} holds the output of task {task.get('index')} of {task.get('count')}, not "
                        f"task {index} of {count} (a duplicate or copied task dir); remove it and {rerun}")
    for rec in (r for s in m["splits"].values() for r in s["shards"]):
        for ext in (".bin", ".idx"):
            if not (d / f"{rec['name']}{ext}").is_file():
                raise DataError(f"task {index} of {count}: {d / rec['name']}{ext} is missing; rerun it with "
                                f"--task-index {index} to rebuild it")
    return m


def _check_compatible(first: dict, m: dict, index: int, count: int, out: Path) -> None:
    for key, what in _SHARED:
        if key(m) != key(first):
            raise DataError(
                f"task {index} of {count} was prepared with another {what} than task 0 ({key(m)} vs {key(first)}); "
                f"rerun task {index} with task 0's settings: python -m pipeline.prepare ... --output {out} "
                f"--num-tasks {count} --task-index {index} --overwrite"
            )


def _merge_skipped(reports: list[dict]) -> dict:
    merged: dict[str, dict] = {}
    for rep in reports:
        for reason, r in rep.items():
            m = merged.setdefault(reason, {"count": 0, "examples": []})
            m["count"] += r["count"]
            m["examples"] = (m["examples"] + r["examples"])[:5]
    return dict(sorted(merged.items()))


def _copy_tokenizer(src: Path, out: Path, owned: bool) -> dict[str, str]:
    """DIR/tokenizer/ = the tasks' tokenizer (write-then-rename per file); returns rel path -> sha256."""
    dst = out / "tokenizer"
    want = {p.name: sha256_file(p) for p in sorted(src.iterdir())}
    if dst.exists() and not owned:
        have = {p.name: sha256_file(p) for p in sorted(dst.iterdir())}
        if have != want:
            raise DataError(f"{dst} holds another tokenizer and {out} has no merged {MANIFEST}: not ours to "
                            "replace; choose another --output for the tasks")
    dst.mkdir(exist_ok=True)
    for name, digest in want.items():
        if not (dst / name).is_file() or sha256_file(dst / name) != digest:
            tmp = dst / f"{name}.tmp"
            shutil.copyfile(src / name, tmp)
            tmp.replace(dst / name)
    return {f"tokenizer/{name}": digest for name, digest in want.items()}


def merge_tasks(out: str | Path, num_tasks: int | None = None, command: str = "") -> dict:
    """Write DIR/manifest.json from the task manifests; returns it. Raises DataError (one line)."""
    out = Path(out)
    counts = task_counts(out)
    if not counts:
        raise DataError(f"{out} holds no task outputs ({out / TASKS_DIR}/task_*_of_*); run the tasks first: "
                        f"python -m pipeline.prepare ... --output {out} --num-tasks N --task-index I")
    if num_tasks is None and len(counts) > 1:
        a, b = sorted(counts)[:2]
        raise DataError(f"{out / TASKS_DIR} holds tasks of two runs ({a} and {b} tasks, e.g. {counts[b][0].name}); "
                        f"remove the dirs of the abandoned run or pass --num-tasks")
    count = num_tasks if num_tasks is not None else next(iter(counts))
    if stray := [d for c, ds in counts.items() if c != count for d in ds]:
        raise DataError(f"task dir {stray[0]} belongs to a run with another task count than {count}; remove it "
                        f"(it would not be merged) or merge with --num-tasks {parse_task_dir(stray[0].name)[1]}")
    with DirLock(out, "prepare merge"):
        return _merge_locked(out, count, command)


def _merge_locked(out: Path, count: int, command: str) -> dict:
    if (out / STATE).is_file():
        raise DataError(f"{out} holds an unfinished single-task prepare ({STATE}); choose another --output for "
                        "the tasks")
    old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if old is not None and "tasks" not in old:
        raise DataError(f"{out} already holds a single-task prepared dataset ({MANIFEST}); choose another "
                        "--output for the tasks")
    tasks = [_load_task(out, i, count) for i in range(count)]
    for i, m in enumerate(tasks[1:], 1):
        _check_compatible(tasks[0], m, i, count, out)
    files = _copy_tokenizer(task_dir(out, 0, count) / "tokenizer", out, owned=old is not None)
    splits: dict[str, dict] = {}
    for i, m in enumerate(tasks):
        rel = task_dir(out, i, count).relative_to(out).as_posix()
        for name, rec in m["files"].items():
            if not name.startswith("tokenizer/"):
                files[f"{rel}/{name}"] = rec
        for split, info in m["splits"].items():
            s = splits.setdefault(split, {"documents": 0, "tokens": 0, "shards": []})
            s["documents"] += info["documents"]
            s["tokens"] += info["tokens"]
            s["shards"] += [{**rec, "name": f"{rel}/{rec['name']}", "task": i} for rec in info["shards"]]
    if not any(s["documents"] for s in splits.values()):
        raise DataError(f"the {count} tasks of {out} hold no documents: nothing to merge; check --input")
    first = tasks[0]
    manifest = {
        **{k: first[k] for k in ("format", "format_version", "tokenizer", "dtype", "bos", "document_end")},
        "splits": splits,
        "documents_read": sum(m["documents_read"] for m in tasks),
        "skipped": _merge_skipped([m["skipped"] for m in tasks]),
        "files": files,
        "inputs": [entry for m in tasks for entry in m["inputs"]],
        "command": command,
        "fingerprint": {
            "inputs": [entry for m in tasks for entry in m["fingerprint"]["inputs"]],
            "tokenizer": first["fingerprint"]["tokenizer"],
            "options": first["fingerprint"]["options"],
            "tasks": count,
        },
        "tasks": {"count": count, "dir": TASKS_DIR, "plan": first["task"]["plan"],
                  "commands": [m["command"] for m in tasks]},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
