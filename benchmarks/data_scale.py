"""Per-rank cost of the training-data loader at pretraining scale: old order vs new, side by side.

Writes a synthetic corpus of real MMIDIDX .idx files and sparse .bin files (their holes read as
token 0 and use no disk), then, in a fresh process per loader (one rank's view), measures:
start-up seconds (build_dataset over every shard), private memory added (RssAnon of
/proc/self/status), open file descriptors, and microseconds per sample at random global indices
over two epochs, wall-clock and CPU time (the old loader also rebuilds its epoch arrays once per
new epoch: included). Start-up is build_dataset's work for one rank; every rank does the same alone
(no rank-0 build, no barrier, nothing cached on disk).

    python benchmarks/data_scale.py --tokens 1e12 --shards 8000 --docs 2e6
    python benchmarks/data_scale.py --tokens 15e12 --shards 8000 --docs 2e8 --order new
    python benchmarks/data_scale.py --tokens 1e9 --shards 100 --docs 2e6     # the old loader fits here

The old loader (pipeline/data/legacy_order.py: only runs started with it still use it) keeps
~32 B per document and 8 B per window per rank; it is skipped, with its estimated size printed,
where that exceeds --old-max-gb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.data.indexed import encode_index  # noqa: E402


def write_corpus(root: Path, tokens: int, shards: int, docs: int) -> None:
    """`shards` int32 shards holding `docs` documents of equal length (+-1) and `tokens` tokens."""
    marker = root / "corpus.json"
    spec = {"tokens": tokens, "shards": shards, "docs": docs}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    root.mkdir(parents=True, exist_ok=True)
    for f in root.glob("s*.*"):
        f.unlink()
    docs_per_shard = np.full(shards, docs // shards, dtype=np.int64)
    docs_per_shard[: docs % shards] += 1
    tokens_per_shard = np.full(shards, tokens // shards, dtype=np.int64)
    tokens_per_shard[: tokens % shards] += 1
    for k in range(shards):
        n, t = int(docs_per_shard[k]), int(tokens_per_shard[k])
        sizes = np.full(n, t // n, dtype=np.int64)
        sizes[: t % n] += 1
        if sizes.max() >= 2**31:
            raise SystemExit(f"documents of {sizes.max()} tokens do not fit the int32 sizes of .idx: use more --docs")
        prefix = root / f"s{k:05d}"
        (root / f"s{k:05d}.idx").write_bytes(encode_index(np.int32, sizes))
        with open(f"{prefix}.bin", "wb") as f:
            f.truncate(t * 4)  # sparse: no blocks written
    marker.write_text(json.dumps(spec))


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (kB there)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(order: str, root: Path, seq_len: int, samples: int) -> dict:
    """One rank's view, in this process (run in a fresh child by main)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # let the old loader open what it needs
    prefixes = sorted(str(p)[:-4] for p in root.glob("s*.idx"))
    rss0 = _status("RssAnon")
    t0 = time.perf_counter()
    if order == "new":
        from pipeline.data.dataset import GPTDataset
        from pipeline.data.indexed import read_index_header

        ds = GPTDataset([read_index_header(p) for p in prefixes], seq_len, seed=1)
    else:
        from pipeline.data.indexed import MMapIndexedDataset
        from pipeline.data.legacy_order import LegacyGPTDataset

        ds = LegacyGPTDataset([MMapIndexedDataset(p) for p in prefixes], seq_len, seed=1)
    startup = time.perf_counter() - t0
    rss_start = _status("RssAnon")
    rng = np.random.default_rng(0)
    n = ds.samples_per_epoch
    idx = np.concatenate([rng.integers(0, n, samples // 2), rng.integers(n, 2 * n, samples - samples // 2)])
    t0, c0 = time.perf_counter(), time.process_time()
    for i in idx:
        ds[int(i)]
    per_sample = (time.perf_counter() - t0) / len(idx)
    cpu_per_sample = (time.process_time() - c0) / len(idx)  # robust to a shared, busy machine
    return {"order": order, "startup_s": startup, "rss_anon_start_mb": (rss_start - rss0) / 2**20,
            "rss_anon_mb": (_status("RssAnon") - rss0) / 2**20, "fds": len(os.listdir("/proc/self/fd")),
            "us_per_sample": per_sample * 1e6, "cpu_us_per_sample": cpu_per_sample * 1e6, "samples_per_epoch": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=1e12)
    ap.add_argument("--shards", type=int, default=8000)
    ap.add_argument("--docs", type=float, default=2e6, help="documents in the corpus (their length follows)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2000, help="random samples read over two epochs")
    ap.add_argument("--order", choices=["both", "old", "new"], default="both")
    ap.add_argument("--old-max-gb", type=float, default=4.0, help="skip the old loader above this estimate")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/data_scale"))
    ap.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    tokens, docs = int(a.tokens), int(a.docs)
    root = a.dir / f"t{tokens}_s{a.shards}_d{docs}"
    if a.child:
        print(json.dumps(measure(a.child, root, a.seq_len, a.samples)))
        return
    t0 = time.perf_counter()
    write_corpus(root, tokens, a.shards, docs)
    idx_gb = sum(p.stat().st_size for p in root.glob("*.idx")) / 1e9
    print(f"corpus: {tokens:.3g} tokens, {a.shards} shards, {docs:.3g} documents of ~{tokens // docs:,} tokens, "
          f"seq_len {a.seq_len}; .idx {idx_gb:.2f} GB on disk, .bin sparse ({time.perf_counter() - t0:.0f} s to write)")
    windows = (tokens - 1) // a.seq_len
    old_gb = (32 * docs + 8 * windows) / 1e9
    print(f"{'order':<5} {'start-up s':>10} {'RssAnon MB (start)':>18} {'RssAnon MB (end)':>16} {'fds':>6} "
          f"{'us/sample':>10} {'CPU us/sample':>13}")
    for order in (["old", "new"] if a.order == "both" else [a.order]):
        if order == "old" and old_gb > a.old_max_gb:
            print(f"{'old':<5} not run: its per-document and per-window arrays need ~{old_gb:.1f} GB per rank "
                  f"(> --old-max-gb {a.old_max_gb})")
            continue
        proc = subprocess.run([sys.executable, __file__, "--child", order, "--tokens", str(a.tokens), "--shards",
                               str(a.shards), "--docs", str(a.docs), "--seq-len", str(a.seq_len), "--samples",
                               str(a.samples), "--dir", str(a.dir)], capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"{order:<5} failed: {why}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{order:<5} {r['startup_s']:>10.2f} {r['rss_anon_start_mb']:>18.1f} {r['rss_anon_mb']:>16.1f} "
              f"{r['fds']:>6} {r['us_per_sample']:>10.0f} {r['cpu_us_per_sample']:>13.0f}")


if __name__ == "__main__":
    main()
