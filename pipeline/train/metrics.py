"""What a user watches: one console line per log interval, TensorBoard and W&B (rank 0), and the
aggregation that feeds them: a step's typed result, its means over ranks and steps, throughput and MFU.

DeepSpeed's own "tensorboard" config section logs only the learning rate, never the loss, so the
trainer computes and writes everything here. Scalars are grouped by tag prefix so TensorBoard
and W&B show them as sections: loss/, optim/, perf/, moe/, eval/, memory/. W&B (run config
section `wandb`, see WandbConfig) receives the same scalars and expert-load histograms.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from pipeline.distributed.collectives import sum_over_ranks
from pipeline.distributed.ranks import current
from pipeline.errors import ConfigError
from pipeline.io_utils import atomic_write_text
from pipeline.model.flops import achieved_flops, model_flops_utilization
from pipeline.train.config import WandbConfig
from pipeline.train.health import CollapseMonitor

LOSS_KEYS = ("loss/total", "loss/lm", "loss/aux", "moe/load_balance_loss", "moe/z_loss")


@dataclass
class StepResult:
    """One optimizer step, as `Trainer.train_step` returns it. Tensors stay on the device and are
    read once per log interval (an .item() per micro-batch would stall the GPU)."""

    losses: torch.Tensor
    """[len(LOSS_KEYS)] float64: this rank's means over the step's micro-batches."""
    tokens_per_expert_LE: torch.Tensor
    """[MoE layers, experts] float64: routed slots summed over the step's micro-batches."""
    lr: float
    grad_norm: float
    loss: float
    """The loss every rank agreed on (mean over ranks) for the health checks."""
    skipped: str | None
    """Why the update was skipped, or None if it was applied."""
    sync_wait_s: float = 0.0
    """Seconds this rank waited in the step's one host sync (health.agree) for the other ranks."""

    @property
    def healthy(self) -> bool:
        return self.skipped is None

    def finite_or_none(self) -> dict[str, float | None]:
        """loss and grad_norm for metrics.jsonl, where JSON has no NaN."""
        return {k: v if math.isfinite(v) else None for k, v in (("loss", self.loss), ("grad_norm", self.grad_norm))}


class StepAccumulator:
    """One optimizer step's sums over its micro-batches, kept on the device (an .item() per loss and
    per MoE layer would stall the GPU pipeline dozens of times per micro-batch)."""

    def __init__(self, n_moe_layers: int, n_experts: int, device: torch.device):
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
        self.tokens_LE = torch.zeros(n_moe_layers, n_experts, dtype=torch.float64, device=device)
        self.sync_wait_s = 0.0

    def timed_sync(self, agree: Callable, *args):
        """`agree(*args)`, the step's host sync, timed: a rank that arrives early waits there for the
        slowest (the straggler statistics). On a GPU the wait for this rank's own kernels is left out:
        they are synchronised first, which the sync would have waited for anyway."""
        if self.sums.device.type == "cuda":
            torch.cuda.synchronize(self.sums.device)
        start = time.perf_counter()
        try:
            return agree(*args)
        finally:
            self.sync_wait_s += time.perf_counter() - start

    def add_losses(self, parts) -> None:
        """A micro-batch's total, LM and router loss (objective.LossParts), before its backward."""
        self.sums[:3] += torch.stack([parts.total, parts.lm, parts.router]).detach().double()

    def add_router_stats(self, parts) -> None:
        """A micro-batch's router statistics (none for a dense model), after its backward."""
        if parts.router_stats is not None:
            self.sums[3] += parts.router_stats.load_balance_loss_L.double().mean()
            self.sums[4] += parts.router_stats.z_loss_L.double().mean()
            self.tokens_LE += parts.router_stats.tokens_per_expert_LE.double()

    def result(self, micro_batches: int, lr: float, grad_norm, loss: float, skipped: str | None) -> StepResult:
        self.sums /= micro_batches
        return StepResult(losses=self.sums, tokens_per_expert_LE=self.tokens_LE, lr=lr,
                          grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          loss=loss, skipped=skipped, sync_wait_s=self.sync_wait_s)


@dataclass
class Interval:
    """A log interval's aggregate over its applied steps and all ranks."""

    losses: dict[str, float]
    tokens_per_expert_LE: torch.Tensor  # [L, E] summed over steps and ranks
    lr: float
    grad_norm: float


def aggregate(window: list[StepResult], all_reduce: Callable[[torch.Tensor, bool], torch.Tensor]) -> Interval:
    """Means of the losses over the window's steps and over ranks, expert loads summed;
    `all_reduce(t, mean)` reduces over ranks and returns a CPU tensor."""
    means = all_reduce(torch.stack([w.losses for w in window]).mean(0), True)
    tokens_LE = torch.stack([w.tokens_per_expert_LE for w in window]).sum(0)
    if tokens_LE.numel():
        tokens_LE = all_reduce(tokens_LE, False)
    return Interval(dict(zip(LOSS_KEYS, means.tolist(), strict=True)), tokens_LE, window[-1].lr, window[-1].grad_norm)


def throughput(tokens: int, elapsed: float, flops_per_token: float, world: int,
               peak_tflops: float | None) -> dict[str, float]:
    """perf/ scalars of `tokens` processed by `world` ranks in `elapsed` seconds; MFU if the per-rank
    peak is known."""
    tokens_per_s = tokens / max(elapsed, 1e-9)
    values = {"perf/tokens_per_s": tokens_per_s,
              "perf/model_tflops_per_rank": achieved_flops(tokens_per_s, flops_per_token) / world / 1e12}
    if peak_tflops:
        values["perf/mfu"] = model_flops_utilization(tokens_per_s, flops_per_token, world * peak_tflops * 1e12)
    return values


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


def straggler_stats(step_s: float, data_wait_s: float, device: torch.device) -> dict[str, float]:
    """Slowest and fastest rank of a log interval: `step_s` is this rank's busy time per step (wall time
    less the wait for other ranks in the step's sync, so the rank the others wait for has the
    largest), `data_wait_s` its wait for micro-batches per step. One SUM all-reduce of [ranks, 2]
    floats per log interval (each rank fills its row)."""
    view = current()
    rows = torch.zeros(view.world, 2, dtype=torch.float64)
    rows[view.rank] = torch.tensor([step_s, data_wait_s], dtype=torch.float64)
    rows = sum_over_ranks(rows, device)
    step_R, wait_R = rows[:, 0], rows[:, 1]
    return {
        "straggler/step_time_max": float(step_R.max()),
        "straggler/step_time_min": float(step_R.min()),
        "straggler/slowest_rank": int(step_R.argmax()),
        "straggler/data_wait_max": float(wait_R.max()),
        "straggler/data_wait_min": float(wait_R.min()),
    }


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


WANDB_ID_FILE = "wandb_run_id"
"""File in the run dir holding the W&B run id: one run dir is one W&B run, resumed with it."""
WANDB_STEP = "trainer/step"
"""W&B x-axis of every metric. W&B's own `_step` only grows, so a run resumed from a checkpoint
behind the last logged step would have its re-done steps dropped; a step metric keeps them all."""


class WandbWriter:
    """Rank 0's W&B run: the resolved run config as W&B config, scalars and expert-load histograms."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_config: dict | None):
        import wandb  # here, not at module level: seconds of imports that runs without W&B never pay

        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:  # W&B's id alphabet; written before init so a crash during init still resumes this id
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.resolve().name,
                                  mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow")
        except wandb.errors.Error as e:
            raise ConfigError(f"wandb.init failed ({e}); run `wandb login` or set WANDB_API_KEY, "
                              "or use wandb.mode=offline and `wandb sync` later") from e
        # A resumed run may change values (e.g. train.steps): update, never refuse.
        self.run.config.update(run_config or {}, allow_val_change=True)
        self.run.define_metric(WANDB_STEP)
        self.run.define_metric("*", step_metric=WANDB_STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({WANDB_STEP: step, **values})

    def histograms(self, step: int, tokens_per_expert_LE: torch.Tensor) -> None:
        """One histogram per layer, bucket i = expert i; joins the row of the step's scalars."""
        edges = [e - 0.5 for e in range(tokens_per_expert_LE.shape[1] + 1)]
        rows = {
            f"moe/tokens_per_expert/layer_{layer}": self.wandb.Histogram(np_histogram=(row.tolist(), edges))
            for layer, row in enumerate(tokens_per_expert_LE.double())
        }
        self.run.log({WANDB_STEP: step, **rows}, commit=False)

    def close(self) -> None:
        # Called from the caller's `finally`: an exception in flight marks the W&B run failed.
        self.run.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no rank checks.

    `wandb` (the run config's section) adds a W&B run next to TensorBoard; `run_config` (the resolved
    config, as saved in RUN/config.yaml) becomes its W&B config.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, total_steps: int,
                 wandb: WandbConfig | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.wandb = None
        self.tb_dir = Path(run_dir) / "tensorboard"
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        if enabled and wandb is not None and wandb.mode != "disabled":
            self.wandb = WandbWriter(wandb, Path(run_dir), run_config)
        self._start = time.perf_counter()
        self._start_step = 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.scalars(step, values)
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def record(self, record: dict) -> None:
        """Full-precision metrics, one JSON object per line of RUN/metrics.jsonl (for scripts and tests)."""
        if self.enabled:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")

    def expert_counts(self, step: int, tokens_per_expert_LE: torch.Tensor) -> None:
        """Tokens per expert, one histogram per layer whose buckets are the expert ids.

        One tag per layer, not one series per expert: gpt-oss-120b has 36 x 128 experts, which as
        scalars would be thousands of event files.
        """
        if self.wandb is not None:
            self.wandb.histograms(step, tokens_per_expert_LE)
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

    def console(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> None:
        """The interval line."""
        if not self.enabled:
            return
        done = step - self._start_step
        per_step = (time.perf_counter() - self._start) / max(1, done)
        eta = format_eta(per_step * (self.total_steps - step))
        extra = "" if mfu is None else f" | mfu {mfu:.1%}"
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
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


class IntervalReporter:
    """The steps of one log interval, reported when the interval ends: losses averaged over its
    applied steps and all ranks, throughput over all its steps (skipped steps read data too), memory,
    expert loads (with the routing-collapse warning) and router biases, to the console, TensorBoard /
    W&B and metrics.jsonl."""

    def __init__(self, log: MetricsLogger, device: torch.device, tokens_per_step: int, flops_per_token: float,
                 world: int, peak_tflops: float | None, collapse: CollapseMonitor):
        self.log, self.device, self.world = log, device, world
        self.tokens_per_step, self.flops_per_token, self.peak_tflops = tokens_per_step, flops_per_token, peak_tflops
        self.collapse = collapse
        self.start()

    def start(self) -> None:
        """Begin an interval (at the start of training, and after each report)."""
        self.window: list[StepResult] = []
        self.steps, self.tick, self.sync_wait_s = 0, time.perf_counter(), 0.0

    def add(self, out: StepResult) -> None:
        self.steps += 1
        self.sync_wait_s += out.sync_wait_s
        if out.healthy:
            self.window.append(out)

    def _all_reduce(self, t: torch.Tensor, mean: bool) -> torch.Tensor:
        return sum_over_ranks(t, self.device, mean)

    def report(self, step: int, consumed_samples: int, skipped_total: int, biases: list[torch.Tensor],
               data_wait_s: float) -> None:
        """Collective (every rank calls it at the same step); nothing without an applied step.
        `data_wait_s`: seconds this rank's steps waited for their micro-batches over the interval."""
        if not self.window:
            return
        interval = aggregate(self.window, self._all_reduce)
        tokens_LE = interval.tokens_per_expert_LE
        elapsed = time.perf_counter() - self.tick
        perf = throughput(self.tokens_per_step * self.steps, elapsed, self.flops_per_token,
                          self.world, self.peak_tflops)
        values = {
            **interval.losses,
            "optim/lr": interval.lr,
            "optim/grad_norm": interval.grad_norm,
            **perf,
            "perf/consumed_samples": consumed_samples,
            "time/data_wait": data_wait_s / self.steps,  # s per step this rank waited for data
            **straggler_stats((elapsed - self.sync_wait_s) / self.steps, data_wait_s / self.steps, self.device),
            **memory_stats(),
        }
        if tokens_LE.numel():
            values.update(expert_load_stats(tokens_LE))
            self.log.expert_counts(step, tokens_LE)
            for warning in self.collapse.update(tokens_LE):
                self.log.message(warning)
        for layer, bias in enumerate(biases):
            values[f"moe/expert_bias_absmax/layer_{layer}"] = float(bias.abs().max())
        values["train/skipped_steps"] = skipped_total
        self.log.scalars(step, values)
        self.log.console(step, values["loss/lm"], interval.lr, perf["perf/tokens_per_s"], perf.get("perf/mfu"))
        record = {"step": step, **values}
        if tokens_LE.numel():
            record["moe/tokens_per_expert"] = tokens_LE.long().tolist()  # [layer][expert]
        if biases:
            record["moe/expert_bias"] = [b.tolist() for b in biases]  # [layer][expert], equal on every rank
        self.log.record(record)
        self.start()
