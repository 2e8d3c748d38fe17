"""Step health: skip non-finite and spiking steps on every rank, stop after too many in a row.

What OLMo-core and Megatron do, on DeepSpeed ZeRO: after the last micro-batch's forward and before
its backward, one SUM all-reduce of [loss, one non-finite flag per rank] tells every rank the
global loss and which ranks saw a non-finite loss. If any did, or the loss is a spike, every rank
poisons that last backward (loss * NaN). The accumulated gradient is then non-finite on every rank
and DeepSpeed takes its own overflow path: no optimizer step (weights, Adam moments and Adam's step
count unchanged), gradients cleared, `engine.skipped_steps` + 1, micro-step counters in sync. A
gradient that turns non-finite with a finite loss takes the same path by itself. Skipped steps still
consume their data and advance the LR schedule (Megatron counts a skipped iteration too).

DeepSpeed behaviour this relies on (deepspeed 0.19.8) lives in the marked section below. It is
guarded by tests/train/test_health.py (weights and optimizer state bit-identical across a skip, fp32
and bf16) and at run time: `Trainer.train_step` raises if DeepSpeed ever applies a poisoned step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch

from pipeline.distributed.collectives import all_reduce_sum_, new_world_group

FAULT_ENV = "PIPELINE_INJECT_NAN"
SLOW_S = 0.5  # a `slow` fault's sleep per micro-batch: well above the noise of busy CPU test machines


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped steps; the message names the step and the last good checkpoint."""


class SpikeDetector:
    """Loss more than `sigma` standard deviations above the mean of the last `window` accepted losses.

    Skipped steps never enter the window, so one spike cannot raise the bar for the next. Needs
    `min(window, 8)` losses before it judges anything (early losses fall fast and are not spikes).
    """

    def __init__(self, sigma: float, window: int):
        self.sigma = sigma
        self.losses: deque[float] = deque(maxlen=window)
        self.min_history = min(window, 8)

    def is_spike(self, loss: float) -> bool:
        if self.sigma <= 0 or len(self.losses) < self.min_history:
            return False
        n = len(self.losses)
        mean = sum(self.losses) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / max(n - 1, 1))
        return loss > mean + self.sigma * std

    def accept(self, loss: float) -> None:
        self.losses.append(loss)


@dataclass
class Verdict:
    """What every rank agreed about one step before its last backward."""

    loss: float
    """Mean over ranks of the step's loss (NaN if any rank's is)."""
    bad_ranks: list[int]
    """Ranks whose loss was not finite."""
    spike: bool

    @property
    def skip(self) -> bool:
        return bool(self.bad_ranks) or self.spike

    @property
    def reason(self) -> str | None:
        if self.bad_ranks:
            return f"non-finite loss on rank(s) {', '.join(map(str, self.bad_ranks))}"
        return "loss spike" if self.spike else None


def agree(local_loss: torch.Tensor, detector: SpikeDetector, rank: int, world: int) -> Verdict:
    """One SUM all-reduce of [loss, one-hot non-finite flag]; the same Verdict on every rank.

    This is the step's one host sync: the decision must be known before the last backward.
    """
    vec = torch.zeros(1 + world, dtype=torch.float64, device=local_loss.device)
    finite = torch.isfinite(local_loss)
    vec[0] = torch.where(finite, local_loss.double(), torch.zeros((), dtype=torch.float64, device=vec.device))
    vec[1 + rank] = (~finite).double()
    all_reduce_sum_(vec)
    values = vec.tolist()
    bad = [r for r, flag in enumerate(values[1:]) if flag > 0]
    loss = float("nan") if bad else values[0] / world
    return Verdict(loss, bad, spike=not bad and detector.is_spike(loss))


def poison(loss: torch.Tensor) -> torch.Tensor:
    """The loss whose backward makes every gradient NaN (keeps the graph, so the backward runs and
    DeepSpeed's gradient hooks and reductions happen exactly as on a normal step)."""
    return loss * float("nan")


class CollapseMonitor:
    """Warns once when a MoE layer's max/mean expert load stays above `ratio` for `patience` log
    intervals in a row (routing collapse), and again only after it recovered and collapsed anew."""

    def __init__(self, ratio: float, patience: int, n_layers: int):
        self.ratio, self.patience = ratio, patience
        self.streak = [0] * n_layers

    def update(self, tokens_LE: torch.Tensor) -> list[str]:
        """tokens_LE: [layers, experts] loads of one log interval (all ranks); returns warnings."""
        if self.ratio <= 0 or not tokens_LE.numel():
            return []
        imbalance_L = tokens_LE.max(dim=1).values / tokens_LE.double().mean(dim=1).clamp(min=1e-9)
        warnings = []
        for layer, value in enumerate(imbalance_L.tolist()):
            self.streak[layer] = self.streak[layer] + 1 if value > self.ratio else 0
            if self.streak[layer] == self.patience:
                warnings.append(
                    f"warning: MoE layer {layer} routing is collapsing: max/mean expert load {value:.2f} > "
                    f"train.collapse_warn_ratio={self.ratio} for {self.patience} log intervals; consider "
                    "model.load_balance_bias_rate (e.g. 1e-3) or a larger model.aux_loss_weight"
                )
        return warnings


class FaultInjection:
    """Test-only fault-injection switch: `PIPELINE_INJECT_NAN=KIND:RANK:FIRST[:LAST][,...]` makes rank
    RANK see a fault at steps FIRST..LAST (1-based; LAST defaults to FIRST). KIND `loss` replaces that
    rank's loss with NaN (caught by the all-reduced check); `grad` keeps the loss and poisons only its
    backward (caught by DeepSpeed's gradient-norm check); `spike` multiplies the loss by 1000 (caught
    by the spike detector when train.spike_sigma is set); `slow` makes that rank sleep SLOW_S per
    micro-batch (a straggler, named by the straggler statistics); `crash` ends that rank at once with
    exit code 1, in a supervised job's first attempt only (PIPELINE_ATTEMPT unset or 0, see
    pipeline/supervise.py), so that its restart gets past it. Hangs for the hang watchdog, at the start of
    the step: `hang` loops in Python forever (a deadlock, an endless loop); `collective` enters an
    all-reduce its peers never join (on a group of its own, created on every rank when the spec
    names the kind). Unset in normal runs; it exists so tests can prove that a fault on one rank
    leaves every rank's state untouched, and that a stuck rank is found and named."""

    KINDS = ("loss", "grad", "spike", "slow", "crash", "hang", "collective")

    def __init__(self, spec: str | None, rank: int):
        self.faults: list[tuple[str, range]] = []  # (kind, steps) aimed at this rank
        for item in filter(None, (spec or "").split(",")):
            try:
                kind, target, first, *last = item.strip().split(":")
                if kind not in self.KINDS or len(last) > 1:
                    raise ValueError
                if int(target) == rank:
                    self.faults.append((kind, range(int(first), int(last[0] if last else first) + 1)))
            except ValueError:
                raise ValueError(
                    f"{FAULT_ENV}={spec!r}: expected KIND:RANK:FIRST[:LAST][,...] with KIND one of "
                    f"{', '.join(self.KINDS)}"
                ) from None
        self.side_group = new_world_group() if "collective:" in (spec or "") else None

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection:
        return cls(os.environ.get(FAULT_ENV), rank)

    def active(self, step: int, kind: str) -> bool:
        return any(k == kind and step in steps for k, steps in self.faults)

    def stall(self, step: int) -> None:
        """The `hang` and `collective` faults: never returns at a step they are aimed at."""
        if self.active(step, "collective"):
            all_reduce_sum_(torch.zeros(1), self.side_group)  # waits for peers that never come
        while self.active(step, "hang"):
            time.sleep(0.05)

    def inject(self, step: int, parts: tuple) -> tuple:
        """The loss parts (a NamedTuple) this rank reports at `step`: each loss tensor NaN for `loss`,
        x1000 for `spike` (statistics beside them are left alone); `slow` sleeps first."""
        if self.active(step, "slow"):
            time.sleep(SLOW_S)
        if self.active(step, "crash") and os.environ.get("PIPELINE_ATTEMPT", "0") == "0":
            print(f"{FAULT_ENV}: crashing at step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        for kind, change in (("loss", poison), ("spike", lambda t: t * 1000.0)):
            if self.active(step, kind):
                return type(parts)(*(change(t) if isinstance(t, torch.Tensor) else t for t in parts))
        return parts


# --- DeepSpeed-dependent (deepspeed 0.19.8) ------------------------------------------------------
# ZeRO-3's optimizer skips the step when the global gradient norm is not finite, in every dtype
# (stage3.py: `is_invalid_grad_norm` -> overflow -> `_overflow_clean_up`); ZeRO-1/2 does in fp32, and
# in bf16 with `bf16.check_grad_overflow` (which ds_config.py sets). The engine then counts it in
# `engine.skipped_steps`. (The finite-weights check before a save is checkpoint/manager.local_params_finite.)


def skipped_steps(engine) -> int:
    return int(engine.skipped_steps)
