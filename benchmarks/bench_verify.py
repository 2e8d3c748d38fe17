"""Cost of the background data check (data.verify_rate_mb_s): trainer step time with it off and on, side by side.

    python benchmarks/bench_verify.py [--rates 8,64] [--repeats 2] [--steps 40] [--nproc 2] [--no-trainer]

The same 2-rank ZeRO-3 + EP run as benchmarks/bench_train.py (debug preset widened to n_embd 256, fp32)
trains with data.verify_rate_mb_s=0 (off) and at each rate of --rates (MB/s per rank; 8 is the
default). The tokenised corpus is small, so the data dir also holds ballast: files listed in its
manifest with their sha256 that no split reads, sized so that each rank's share takes longer to
check than the run lasts at the highest rate -- the check runs during every measured step. They
are sparse (holes read as zeros): what is measured is the check's CPU and memory-bandwidth cost, the
part that competes with training for these cores; the disk or network reads are the filesystem's.
Rates are the median tokens/s over log intervals after the first (warm-up); --repeats R alternates
the runs R times and keeps the best of each. On a machine shared with other work, separate runs
differ by more than the check costs, so it first compares in one process, paired: a plain PyTorch
step of the same model, the check started and stopped every few steps, the median step time of the
windows with it against those without (--no-trainer: only this). Also prints what a busy machine
does not change: the check's CPU seconds per GB (unthrottled, in this process), and from it the
share of one core each rate keeps busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    add_trainer_run_args,
    median,
    prepare_corpus,
    run_trainer,
    summarize_trainer,
    write_config,
)

from pipeline.data import MicroBatchIterator, build_dataset  # noqa: E402
from pipeline.data.background_verify import BackgroundVerifier, manifest_checksums  # noqa: E402
from pipeline.io_utils import sha256_file  # noqa: E402
from pipeline.train.config import load_run_config, resolve_model_config  # noqa: E402
from pipeline.train.engine import build_model  # noqa: E402
from pipeline.train.optim import make_torch_adamw  # noqa: E402
from pipeline.train.single_process import plain_train_step  # noqa: E402

BALLAST_FILES = 8


def add_ballast(data: Path, total_bytes: int) -> None:
    """BALLAST_FILES sparse files of `total_bytes` in all, recorded in manifest.json's sha256 list."""
    manifest, digest = json.loads((data / "manifest.json").read_text()), None
    for k in range(BALLAST_FILES):
        path = data / f"ballast_{k:02d}.dat"
        with open(path, "wb") as f:
            f.truncate(total_bytes // BALLAST_FILES)
        digest = digest or sha256_file(path)  # all the same zeros: hashed once
        manifest["files"][path.name] = digest
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))


def check_cpu_s_per_gb(data: Path) -> float:
    """CPU seconds the check spends per GB (reads, sha256, fadvise), unthrottled, in this process: the
    figure a busy machine does not change. At R MB/s it keeps R / 1000 * this of one core busy."""
    files, _ = manifest_checksums([data])
    start = time.process_time()  # this process's CPU: the check's thread (the main thread only waits)
    verifier = BackgroundVerifier([max(files, key=lambda f: f.size)], 1e9, start=0).start()  # no sleeps
    verifier.finished.wait()
    assert verifier.problem is None, verifier.problem
    return (time.process_time() - start) / (verifier.checked_bytes / 1e9)


def paired_step_times(config: Path, data: Path, rate: float, windows: int, window_steps: int) -> tuple[float, float]:
    """Median step time (s) off and on, in one process: a plain PyTorch step of the same model on the
    same cores, the check started and stopped every `window_steps` steps (off, on, off, on, ...). Load
    from other processes hits both sides alike, which the separate trainer runs cannot promise."""
    cfg = load_run_config(config, ["parallel.expert_parallel_size=1"])
    model = build_model(cfg, resolve_model_config(cfg), world=1)
    optimizer = make_torch_adamw(model, cfg.optim)
    it = MicroBatchIterator(build_dataset(cfg.data.train, "train", cfg.data.seq_len, cfg.data.seed),
                            cfg.train.micro_batch_size, 0, 1, 0)
    files, _ = manifest_checksums([data])
    times: dict[bool, list[float]] = {False: [], True: []}
    for w in range(2 * windows + 1):  # a first window off as warm-up, not counted
        on = w % 2 == 1
        verifier = BackgroundVerifier(files, rate).start() if on else None
        for _ in range(window_steps):
            start = time.perf_counter()
            plain_train_step(model, optimizer, [it.next()], 1e-4, 1.0)
            if w:
                times[on].append(time.perf_counter() - start)
        if verifier is not None:
            assert verifier.problem is None and not verifier.finished.is_set(), "the pass ended: more ballast"
            verifier.stop()
    return median(times[False]), median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="8,64", help="MB/s per rank to compare with off (comma-separated)")
    add_trainer_run_args(parser, steps=40, repeats=2)
    parser.add_argument("--run-seconds", type=float, default=300.0,
                        help="longest expected run (start-up included): the ballast outlasts it at every rate")
    parser.add_argument("--windows", type=int, default=10, help="paired comparison: off/on window pairs per rate")
    parser.add_argument("--window-steps", type=int, default=5)
    parser.add_argument("--no-trainer", action="store_true", help="only the paired in-process comparison")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        tmp = Path(tmp)
        data = prepare_corpus(tmp / "data")
        ballast = int(max(rates) * 1e6 * args.nproc * args.run_seconds)
        add_ballast(data, ballast)
        results: dict[float, dict] = {}
        walls: dict[float, float] = {}
        for repeat in range(0 if args.no_trainer else args.repeats):
            order = [0.0, *rates] if repeat % 2 == 0 else [*rates, 0.0]  # alternate who runs first
            for rate in order:
                config = write_config(tmp / f"r{repeat}_{rate:g}" / "run.yaml", data, args, checkpointing=False)
                cfg = yaml.safe_load(config.read_text())
                cfg["data"]["verify_rate_mb_s"] = rate
                config.write_text(yaml.safe_dump(cfg, sort_keys=False))
                start = time.perf_counter()
                r = summarize_trainer(run_trainer(config, args), args.skip_intervals)
                walls[rate] = max(walls.get(rate, 0.0), time.perf_counter() - start)
                if rate not in results or r["tokens_per_s"] > results[rate]["tokens_per_s"]:
                    results[rate] = r

        cpu_s_per_gb = check_cpu_s_per_gb(data)
        torch.set_num_threads(args.threads)
        config = write_config(tmp / "paired" / "run.yaml", data, args, checkpointing=False)
        paired = {rate: paired_step_times(config, data, rate, args.windows, args.window_steps) for rate in rates}
    tokens_per_step = args.nproc * args.micro_batch * args.seq_len
    print(f"paired, one process x {args.threads} threads, plain PyTorch step of the same model (micro-batch "
          f"{args.micro_batch} x {args.seq_len}), {args.windows} off/on window pairs of {args.window_steps} steps; "
          f"the check costs {cpu_s_per_gb:.2f} CPU s per GB here; load average {os.getloadavg()[0]:.1f}\n")
    header = f"{'data.verify_rate_mb_s':<24}{'off ms/step':>12}{'on ms/step':>12}{'on / off':>10}{'CPU of 1 core':>15}"
    print(header)
    print("-" * len(header))
    for rate, (off, on) in paired.items():
        print(f"{rate:<24g}{1000 * off:>12.1f}{1000 * on:>12.1f}{on / off:>10.3f}{rate / 1000 * cpu_s_per_gb:>15.2%}")
    if args.no_trainer:
        return
    print(f"\ntrainer runs, CPU, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; {args.nproc} ranks "
          f"ZeRO-3 + EP{args.ep}, {tokens_per_step:,} tokens/step, {args.steps} steps; best of {args.repeats} of the "
          f"median {args.log_interval}-step interval; ballast {ballast / 1e9:.1f} GB (sparse)\n")
    header = f"{'data.verify_rate_mb_s':<24}{'tokens/s':>10}{'ms/step':>10}{'vs off':>8}{'CPU of 1 core/rank':>20}"
    print(header)
    print("-" * len(header))
    base = results[0.0]["tokens_per_s"]
    for rate in [0.0, *rates]:
        tps = results[rate]["tokens_per_s"]
        cpu = f"{rate / 1000 * cpu_s_per_gb:.2%}" if rate else "-"
        print(f"{'0 (off)' if rate == 0 else f'{rate:g}':<24}{tps:>10,.0f}{1000 * tokens_per_step / tps:>10.1f}"
              f"{tps / base:>8.3f}{cpu:>20}")
        if rate and ballast / args.nproc / (rate * 1e6) < walls[rate]:
            print(f"  (the pass at {rate:g} MB/s ended before the run did: raise --run-seconds)")


if __name__ == "__main__":
    main()
