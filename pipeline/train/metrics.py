"""What a user watches: one console line per log interval and TensorBoard scalars (rank 0).

DeepSpeed's own "tensorboard" config section logs only the learning rate, never the loss, so the
trainer computes and writes everything here. Scalars are grouped by tag prefix so TensorBoard
shows them as sections: loss/, optim/, perf/, moe/, eval/, memory/.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import torch

# Dense bf16 peak per GPU, for MFU. Users on other parts set train.peak_tflops.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def detect_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def memory_stats() -> dict[str, float]:
    stats = {"memory/host_rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        stats["memory/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stats["memory/gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return stats


def expert_load_stats(tokens_per_expert_LE: torch.Tensor) -> dict[str, float]:
    """[layers, E] routed-slot counts -> per-layer max/mean imbalance (1.0 = perfectly balanced)."""
    stats = {}
    counts = tokens_per_expert_LE.double()
    mean = counts.mean(dim=1).clamp(min=1e-9)
    imbalance_L = counts.max(dim=1).values / mean
    for layer, value in enumerate(imbalance_L.tolist()):
        stats[f"moe/imbalance_max_over_mean/layer_{layer}"] = value
    stats["moe/imbalance_max_over_mean/worst_layer"] = float(imbalance_L.max())
    return stats


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no rank checks."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.tb_dir = Path(run_dir) / "tensorboard"
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        self._start = time.perf_counter()
        self._start_step = 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def expert_counts(self, step: int, tokens_per_expert_LE: torch.Tensor) -> None:
        """Tokens per expert, one histogram per layer whose buckets are the expert ids.

        One tag per layer, not one series per expert: gpt-oss-120b has 36 x 128 experts, which as
        scalars would be thousands of event files.
        """
        if self.writer is None:
            return
        for layer, row in enumerate(tokens_per_expert_LE.double()):
            ids = torch.arange(len(row), dtype=torch.float64)
            self.writer.add_histogram_raw(
                f"moe/tokens_per_expert/layer_{layer}", min=0.0, max=float(len(row) - 1), num=float(row.sum()),
                sum=float((ids * row).sum()), sum_squares=float((ids * ids * row).sum()),
                bucket_limits=(ids + 0.5).tolist(), bucket_counts=row.tolist(), global_step=step,
            )

    def start(self, step: int) -> None:
        """Mark where this process began training, for the ETA."""
        self._start_step, self._start = step, time.perf_counter()

    def console(self, step: int, loss: float, lr: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self._start_step
        per_step = (time.perf_counter() - self._start) / max(1, done)
        eta = format_eta(per_step * (self.total_steps - step))
        print(
            f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s{extra} | eta {eta}",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
