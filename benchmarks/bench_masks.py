"""Cost of the document-masking BlockMasks per micro-batch: the block-corner build the model uses
(`document_block_mask`) against torch's `create_block_mask` over all T x T pairs (the previous way).

    python benchmarks/bench_masks.py [--seq 4096] [--batch 1 4] [--reps 5]

Runs on CUDA when there is a GPU (synchronised timings), else on the CPU. A micro-batch builds two
masks (sliding window and full); both are timed together, median of --reps after one warm-up, and
the two builds are checked to give the same BlockMask.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

from pipeline.model.masks import _mask_mod, document_block_mask, document_ids

CUDA = torch.cuda.is_available()


def timed_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--docs", type=int, default=16, help="document ends (EOS) per sample")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    print(f"document BlockMasks (window {args.window} + full) per micro-batch, T={args.seq}, "
          f"{args.docs} documents per sample; {where}; median of {args.reps}")
    gen = torch.Generator().manual_seed(0)
    windows = (args.window, None)
    for B in args.batch:
        ids = torch.randint(4, 1000, (B, args.seq), generator=gen)
        ids[:, torch.randperm(args.seq, generator=gen)[: args.docs]] = 3
        doc = document_ids(ids.to(device), 3)

        def old(doc=doc, B=B):
            return [create_block_mask(_mask_mod(w, doc), B, None, args.seq, args.seq, device=device) for w in windows]

        def new(doc=doc):
            return [document_block_mask(w, doc) for w in windows]

        for a, b in zip(old(), new(), strict=True):  # the same masks, or the timing means nothing
            assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.full_kv_indices, b.full_kv_indices)
        t_old, t_new = timed_ms(old, args.reps), timed_ms(new, args.reps)
        print(f"  B={B}: create_block_mask {t_old:9.2f} ms   block corners {t_new:7.2f} ms   "
              f"({t_old / t_new:,.0f}x less)")


if __name__ == "__main__":
    main()
