"""Data pipeline benchmark: prepare throughput and memory, loader speed -- ratios in one run.

Corpus: the Python standard library's source files, shuffled into JSONL documents (offline, real
text); the large corpus repeats the small one's documents, reshuffled each time. Prints, side by side:
  1. prepare tokens/s with 1 and N workers vs the tokenizer's own encode_batch rate in one process
     on the same text (ratio per worker; target >= 0.9x);
  2. prepare peak RSS (process tree, children included) on a small and a 10x larger corpus
     (target: within 1.2x -- memory must not grow with the corpus);
  3. loader samples/s vs what training consumes (micro-batch / step time).

    python benchmarks/bench_data.py                       # 200 MB, 20 MB for the memory base
    python benchmarks/bench_data.py --corpus-mb 50 --small-mb 5 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stdlib_sources() -> list[str]:
    texts = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def documents_until(texts: list[str], megabytes: float, seed: int = 0) -> list[str]:
    """A fixed shuffled sample of `texts` (repeated if needed) totalling about `megabytes`."""
    texts, rng, out, size = list(texts), random.Random(seed), [], 0
    while size < megabytes * 1e6:
        rng.shuffle(texts)
        for t in texts:
            out.append(t)
            size += len(t)
            if size >= megabytes * 1e6:
                break
    return out


def make_corpus(path: Path, docs: list[str], repeats: int = 1, seed: int = 0) -> int:
    """JSONL of `docs` repeated `repeats` times, reshuffled per repetition; returns bytes written.

    The 10x memory corpus repeats the 1x corpus's documents, so both hold the same largest
    document: peak RSS then compares corpus size alone (a tokenised document is held in memory
    while it is encoded, so one huge document sets the peak whatever the corpus size)."""
    rng, written = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(repeats):
            order = list(docs)
            rng.shuffle(order)
            for t in order:
                line = json.dumps({"text": t}) + "\n"
                out.write(line)
                written += len(line)
    return written


def run_tree_peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; return (wall s, peak RSS of it and its children in MB, stdout)."""
    import psutil

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t0 = time.time()
    t.start()
    out, _ = proc.communicate()
    wall = time.time() - t0
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return wall, peak / 2**20, out


def prepare_cmd(inp: Path, out: Path, tok: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.prepare",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--tokenizer",
        str(tok),
        "--workers",
        str(workers),
        "--no-progress",
        "--overwrite",
        "--valid-fraction",
        "0.005",
    ]


def tokens_per_s(stdout: str) -> float:
    return float(re.search(r"\(([\d,]+) tokens/s\)", stdout).group(1).replace(",", ""))


def baseline_encode_rate(corpus: Path, tok_path: Path) -> tuple[float, int]:
    """The tokenizer alone: encode_batch over ~1 MB chunks of the same documents, one process."""
    from pipeline.data import load_tokenizer

    tok = load_tokenizer(tok_path)
    n_tokens, elapsed, batch, chars = 0, 0.0, [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            chars += len(batch[-1])
            if chars >= 1 << 20:
                t0 = time.perf_counter()
                n_tokens += sum(map(len, tok.encode_batch(batch)))
                elapsed += time.perf_counter() - t0
                batch, chars = [], 0
    if batch:
        t0 = time.perf_counter()
        n_tokens += sum(map(len, tok.encode_batch(batch)))
        elapsed += time.perf_counter() - t0
    return n_tokens / elapsed, n_tokens


def loader_rate(data_dir: Path, seq_len: int, mbs: int, seconds: float) -> tuple[float, float]:
    from pipeline.data import MicroBatchIterator, build_dataset

    t0 = time.perf_counter()
    ds = build_dataset([data_dir], "train", seq_len, seed=0)
    build_s = time.perf_counter() - t0
    it = MicroBatchIterator(ds, mbs, dp_rank=0, dp_world=1, consumed_samples=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        it.next()
        n += mbs
    return n / (time.perf_counter() - t0), build_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=float, default=200.0, help="large corpus size (default 200)")
    ap.add_argument("--small-mb", type=float, default=20.0, help="memory baseline corpus (default 20 = 1/10)")
    ap.add_argument("--workers", type=int, default=2, help="parallel run's worker count (default 2)")
    ap.add_argument("--vocab-size", type=int, default=16000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument(
        "--step-seconds",
        type=float,
        default=0.25,
        help="assumed training step time for the consumption rate (default 0.25 s)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / "big.jsonl", work / "small.jsonl"
    t0 = time.time()
    texts = stdlib_sources()
    base = documents_until(texts, args.small_mb)
    small_bytes = make_corpus(small, base)
    big_bytes = make_corpus(big, base, repeats=max(1, round(args.corpus_mb / args.small_mb)), seed=1)
    del texts
    print(
        f"corpus: {big_bytes / 1e6:.0f} MB and {small_bytes / 1e6:.0f} MB of stdlib source as JSONL "
        f"({time.time() - t0:.0f}s to generate) in {work}"
    )

    from pipeline.data.readers import ReaderOptions, SkipReport, Source, iter_documents
    from pipeline.data.tokenizer import train_sentencepiece

    t0 = time.time()
    docs = (t for t, _, _ in iter_documents([Source("jsonl", str(small))], ReaderOptions(), SkipReport()))
    tok_path = work / "bpe.model"
    train_sentencepiece(docs, "bpe", args.vocab_size, tok_path, max_bytes=8 << 20)
    print(
        f"tokenizer: SentencePiece BPE, vocab {args.vocab_size}, trained on 8 MB in {time.time() - t0:.0f}s"
    )

    base_rate, base_tokens = baseline_encode_rate(big, tok_path)
    rows = []
    for w in sorted({1, args.workers}):
        wall, rss, out = run_tree_peak_rss(prepare_cmd(big, work / f"out_w{w}", tok_path, w))
        rate = tokens_per_s(out)
        rows.append((w, rate, wall, rss))
    wall_s, rss_small, _ = run_tree_peak_rss(prepare_cmd(small, work / "out_small", tok_path, 1))

    print(
        f"\n== prepare throughput ({big_bytes / 1e6:.0f} MB, {base_tokens:,} tokens, "
        f"{os.cpu_count()} cores) =="
    )
    print(f"{'':28s}{'tokens/s':>12s}{'vs encode_batch':>17s}{'per worker':>12s}{'wall s':>9s}")
    print(f"{'tokenizer encode_batch, 1 proc':28s}{base_rate:12,.0f}{1.0:16.2f}x{'':12s}{'':9s}")
    for w, rate, wall, _ in rows:
        print(
            f"{f'prepare --workers {w}':28s}{rate:12,.0f}{rate / base_rate:16.2f}x"
            f"{rate / base_rate / w:11.2f}x{wall:9.1f}"
        )

    print("\n== prepare peak RSS (process tree, children included), --workers 1 ==")
    big_rss = next(r for w, _, _, r in rows if w == 1)
    print(f"{small_bytes / 1e6:6.0f} MB corpus: {rss_small:7.0f} MB   ({wall_s:.1f}s)")
    print(
        f"{big_bytes / 1e6:6.0f} MB corpus: {big_rss:7.0f} MB   -> {big_rss / rss_small:.2f}x for "
        f"{big_bytes / small_bytes:.0f}x the data (target <= 1.2x)"
    )
    if args.workers > 1:
        print(f"{big_bytes / 1e6:6.0f} MB corpus, --workers {args.workers}: {rows[-1][3]:.0f} MB")

    rate, build_s = loader_rate(work / "out_w1", args.seq_len, args.micro_batch, seconds=5.0)
    need = args.micro_batch / args.step_seconds
    print(f"\n== loader (seq_len {args.seq_len}, micro-batch {args.micro_batch}) ==")
    print(f"build_dataset on {big_bytes / 1e6:.0f} MB of shards: {build_s * 1e3:.0f} ms")
    print(
        f"loader: {rate:,.0f} samples/s ({rate * args.seq_len:,.0f} tokens/s); a training step of "
        f"{args.step_seconds}s consumes {need:,.0f} samples/s per rank -> {rate / need:,.0f}x headroom"
    )


if __name__ == "__main__":
    main()
