"""Build the DeepSpeed JSON actually used from a ds_configs/ file plus the run config.

Keys the run config owns (batch sizes, precision, optimizer, clipping) are filled in from it.
A DeepSpeed JSON may leave them out or set them to "auto"; if it sets one to a *different* value,
start-up fails naming both places, because silently preferring either would train something the
user did not ask for. Combinations the trainer cannot run correctly are refused here, before any
rank allocates memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config_utils import resolve_path
from pipeline.errors import ConfigError
from pipeline.train.config import RunConfig

SUPPORTED_ZERO_STAGES = (2, 3)


def load_ds_json(path: str | Path) -> dict:
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise ConfigError(f"deepspeed_config: {path} does not exist (shipped configs are in ds_configs/)")
    try:
        return json.loads(resolved.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {resolved} is not valid JSON: {e}") from e


def _fill(ds: dict, key: str, value, where: str, run_key: str) -> None:
    current = ds.get(key, "auto")
    if current != "auto" and current != value:
        raise ConfigError(
            f"{where}: {key} = {current!r} but the run config gives {value!r} ({run_key}); "
            f'remove {key} from the DeepSpeed JSON or set it to "auto"'
        )
    ds[key] = value


def build_ds_config(run: RunConfig, world_size: int, use_cuda: bool | None = None) -> dict:
    """The DeepSpeed JSON for `run` on `world_size` ranks: its deepspeed_config file with the keys
    the run config owns filled in, each section by its own piece below (in this order: the first
    refusal wins)."""
    where = str(run.deepspeed_config)
    ds = load_ds_json(run.deepspeed_config)
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    _batch_sizes(ds, run, world_size, where)
    _precision(ds, run, where)
    _no_owned_sections(ds, where)
    offload_opt = _zero(ds, run, where)
    _optimizer(ds, run, use_cuda, offload_opt)
    _logging(ds)
    return ds


def _batch_sizes(ds: dict, run: RunConfig, world_size: int, where: str) -> None:
    """Micro-batch, accumulation, global batch and clipping come from the run config."""
    t, o = run.train, run.optim
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, where, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum_steps, where, "train.grad_accum_steps")
    _fill(
        ds,
        "train_batch_size",
        t.micro_batch_size * t.grad_accum_steps * world_size,
        where,
        "train.micro_batch_size x train.grad_accum_steps x world size",
    )
    _fill(ds, "gradient_clipping", float(o.grad_clip), where, "optim.grad_clip")


def _precision(ds: dict, run: RunConfig, where: str) -> None:
    """bf16 from `precision`; fp16 refused; bf16 overflow checks kept on."""
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError(
            f"{where}: fp16 is not supported (loss-scaled fp16 diverges for MoE routers); "
            "remove the fp16 section and use precision=bf16"
        )
    bf16 = ds.setdefault("bf16", {})
    want_bf16 = run.precision == "bf16"
    if bf16.get("enabled", "auto") not in ("auto", want_bf16):
        raise ConfigError(
            f"{where}: bf16.enabled = {bf16['enabled']} but the run config says "
            f'precision={run.precision}; make them agree or set bf16.enabled to "auto"'
        )
    bf16["enabled"] = want_bf16
    # ZeRO-1/2 skip a bf16 step with a non-finite gradient only with this on (pipeline/train/health.py).
    if bf16.setdefault("check_grad_overflow", True) is not True:
        raise ConfigError(
            f"{where}: bf16.check_grad_overflow = {bf16['check_grad_overflow']}: non-finite steps could not be "
            "skipped and NaN gradients would be applied; remove the key"
        )


def _no_owned_sections(ds: dict, where: str) -> None:
    """The run config's `optim` section owns the optimizer and the schedule."""
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(
                f"{where}: remove the `{owned}` section; the run config's `optim` section sets "
                "the optimizer and learning-rate schedule (warmup + cosine)"
            )


def _zero(ds: dict, run: RunConfig, where: str) -> bool:
    """The ZeRO stages and offloads the trainer supports; returns whether the optimizer is offloaded."""
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"{where}: zero_optimization.stage = {stage}; supported: {SUPPORTED_ZERO_STAGES}")
    ep = run.parallel.expert_parallel_size
    if ep > 1 and stage != 3:
        raise ConfigError(
            f"{where}: expert parallelism (parallel.expert_parallel_size={ep}) needs ZeRO stage 3 "
            f"(this file has stage {stage}); use ds_configs/zero3.json or set expert_parallel_size=1"
        )
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None):
        raise ConfigError(
            f"{where}: zero_optimization.offload_param is not supported by this trainer "
            "(untested with expert parallelism); use offload_optimizer only"
        )
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def _optimizer(ds: dict, run: RunConfig, use_cuda: bool, offload_opt: bool) -> None:
    """AdamW from the `optim` section, torch's or DeepSpeed's (optim.implementation)."""
    o = run.optim
    impl = o.implementation
    if impl == "fused" and not use_cuda:
        raise ConfigError("optim.implementation=fused needs a CUDA GPU; use auto or torch on CPU")
    # auto = torch.optim.AdamW, fused on CUDA: the same updates as DeepSpeed's FusedAdam to fp32
    # rounding (tests/train/test_optimizer_choice.py) without FusedAdam's JIT build at the first step
    # (75 s, and failing on CUDA 13 toolkits laid out as the pip wheels lay them out).
    torch_adam = not offload_opt and impl in ("torch", "auto")
    params = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
              "torch_adam": torch_adam}
    if torch_adam and impl == "auto" and use_cuda:
        params["fused"] = True  # DeepSpeed passes it on to torch.optim.AdamW
    ds["optimizer"] = {"type": "AdamW", "params": params}
    if offload_opt or not torch_adam:
        # DeepSpeed's own Adam kernels are JIT-built on first use; torch AdamW needs no build.
        ds["zero_allow_untested_optimizer"] = True


def _logging(ds: dict) -> None:
    """The trainer logs; DeepSpeed's per-step prints would interleave with ours."""
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's tensorboard section logs only lr, never the loss: our MetricsLogger writes events.
    ds.pop("tensorboard", None)
