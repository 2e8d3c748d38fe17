"""Prepare across tasks: N concurrent `--num-tasks N` processes (as N nodes of a SLURM array would run,
here on one machine's cores) vs one single-task prepare of the same corpus -- ratios in one run.

Corpus: ONE JSONL file of standard-library source (bench_data.py's generator), so the tasks share it
by byte range. Prints wall seconds and tokens/s of: a single-task prepare with 1 worker, the same
with --workers N, and N tasks started together plus the merge; then checks that the merged dir holds
the single-task prepare's document and token counts. On a machine with fewer cores than tasks the
ratio is bounded by the cores (each task is one process).

    python benchmarks/bench_prepare_tasks.py                  # 3 tasks, 30 MB
    python benchmarks/bench_prepare_tasks.py --tasks 8 --corpus-mb 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import REPO, documents_until, make_corpus, prepare_cmd, stdlib_sources  # noqa: E402


def run_all(cmds: list[list[str]]) -> tuple[float, float]:
    """Start every command at once, wait for all; returns (wall s, CPU s of them and their children).
    CPU seconds do not depend on what else the machine runs: their ratio is the tasks' overhead."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    for c, p in zip(cmds, procs, strict=True):
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(c)}\n{out}\n{err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.time() - t0, cpu


def counts(data_dir: Path) -> tuple[int, int]:
    m = json.loads((data_dir / "manifest.json").read_text())
    return (sum(s["documents"] for s in m["splits"].values()), sum(s["tokens"] for s in m["splits"].values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--corpus-mb", type=float, default=30.0)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_prepare_tasks_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    size = make_corpus(corpus, documents_until(stdlib_sources(), args.corpus_mb))

    from pipeline.data.readers import ReaderOptions, SkipReport, Source, iter_documents
    from pipeline.data.tokenizer import train_sentencepiece

    docs = (t for t, _, _ in iter_documents([Source("jsonl", str(corpus))], ReaderOptions(), SkipReport()))
    tok = work / "bpe.model"
    train_sentencepiece(docs, "bpe", args.vocab_size, tok, max_bytes=4 << 20)

    n = args.tasks
    single = run_all([prepare_cmd(corpus, work / "single", tok, 1)])
    workers = run_all([prepare_cmd(corpus, work / "workers", tok, n)])
    out = work / "tasks"
    tasks = run_all([[*prepare_cmd(corpus, out, tok, 1), "--num-tasks", str(n), "--task-index", str(i)]
                     for i in range(n)])
    merge = run_all([[sys.executable, "-m", "pipeline.prepare", "--merge", str(out)]])
    docs_1, tokens = counts(work / "single")
    assert counts(out) == (docs_1, tokens), (counts(out), (docs_1, tokens))

    print(f"corpus: one {size / 1e6:.0f} MB JSONL, {docs_1:,} documents, {tokens:,} tokens; "
          f"{os.cpu_count()} cores; {work}")
    load = os.getloadavg()[0]
    print(f"{'':34s}{'wall s':>9s}{'tokens/s':>12s}{'speed-up':>10s}{'CPU s':>8s}{'CPU vs 1 task':>15s}")
    rows = [("1 task, --workers 1", single), (f"1 task, --workers {n}", workers),
            (f"{n} tasks (concurrent) + merge", (tasks[0] + merge[0], tasks[1] + merge[1]))]
    for name, (wall, cpu) in rows:
        print(f"{name:34s}{wall:9.1f}{tokens / wall:12,.0f}{single[0] / wall:9.2f}x{cpu:8.1f}{cpu / single[1]:14.2f}x")
    print(f"(the merge alone: {merge[0]:.2f}s wall; merged counts equal the single task's; load average "
          f"{load:.1f} on {os.cpu_count()} cores: wall ratios need idle cores, CPU ratios do not)")


if __name__ == "__main__":
    main()
