"""The run config: one YAML file plus `key=value` overrides, resolved and validated at start.

    model:     {preset: debug, <any GPTOSSConfig field>: value}
    data:      {train: [[0.7, data/a], [0.3, data/b]], seq_len: 128}
    optim:     {lr: 3e-4, min_lr: 3e-5, warmup_steps: 100, ...}
    train:     {steps: 1000, micro_batch_size: 4, grad_accum_steps: 1, ...}
    parallel:  {expert_parallel_size: 2, activation_checkpointing: true, sequence_parallel_size: 1}
    precision: bf16
    deepspeed_config: ds_configs/zero3.json
    wandb:     {project: my-project, entity: null, name: null, mode: online}   # optional; off when absent
    eval:      {tasks: [hellaswag], downstream_interval: 1000, limit: 500}      # lm-eval tasks; off when empty

The run config owns batch sizes, precision, optimizer, clipping and the schedule; the DeepSpeed JSON
owns ZeRO, offload and communication settings. Where a DeepSpeed JSON also sets one of ours to a
different value, start-up fails naming both places (see `pipeline/train/ds_config.py`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config_utils import apply_overrides, convert_fields, from_dict, load_config_file, resolve_path, to_dict
from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvalConfig
from pipeline.model.config import GPTOSSConfig


@dataclass(kw_only=True)
class DataConfig:
    train: list = field(default_factory=list)
    """Prepared data dirs or Megatron .bin/.idx prefixes (preprocess_data.py's output, without extension):
    `[path, ...]` or weighted `[[weight, path], ...]` for blending."""
    valid: list | None = None
    """Validation sources (same forms); default: the `valid` split of `train` (a Megatron prefix has no
    split: all of it)."""
    tokenizer: str | None = None
    """The tokenizer Megatron prefixes were made with (a Hugging Face tokenizer dir or a SentencePiece
    .model file): vocabulary size and EOS when data.train[0] is a prefix; ids are checked against it.
    A prepared dir's manifest wins over it."""
    seq_len: int = 128
    """Tokens per training sample (each sample reads seq_len + 1 for the shifted targets)."""
    seed: int = 1234
    """Shuffle seed for the sample order (independent of the model init seed)."""
    verify_checksums: bool = False
    """Check the sha256 of every data file against its manifest before training (the files are
    dealt over the ranks; it reads all the data once). Off: sizes, index structure, the recorded
    token-id ranges and every id as it is read are still checked."""
    verify_rate_mb_s: float = 8.0
    """While training, each rank checks the sha256 of its share of the data files (dealt over the ranks)
    in a background thread, reading at most this many MB/s (1e6 bytes), once per run start; a file
    that fails stops the run after the current step, with a checkpoint, naming it (exit 2). 0: off.
    The default keeps ~0.5% of one core busy per rank, within step-time noise (benchmarks/bench_verify.py),
    and checks 1 TB in ~35 h on one rank, ~17 min on 128. Off with `verify_checksums`, which did it all."""
    max_open_files: int = 256
    """Data files each rank keeps open at once (an open shard holds 2: its .idx and .bin maps); the
    least recently read shard is closed beyond it, so a corpus of thousands of shards trains under
    the default `ulimit -n` of 1024."""

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train is empty: give prepared dirs (python -m pipeline.prepare --output DIR)")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len ({self.seq_len}) must be >= 1")
        if not self.verify_rate_mb_s >= 0:  # NaN too
            raise ConfigError(f"data.verify_rate_mb_s ({self.verify_rate_mb_s}) must be >= 0 (MB/s per rank; 0: off)")
        if self.max_open_files < 2:
            raise ConfigError(f"data.max_open_files ({self.max_open_files}) must be >= 2 (one shard holds its "
                              ".idx and .bin open)")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 3e-5
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    decay_steps: int | None = None
    """Steps from the end of warmup to min_lr; default: train.steps - warmup_steps."""
    weight_decay: float = 0.1
    """Applied to matrices only; norms, biases, sinks and embeddings are not decayed (Megatron)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    implementation: str = "auto"
    """auto | torch | fused: auto = torch.optim.AdamW (fused=True on GPU: no JIT build), torch =
    torch.optim.AdamW unfused, fused = DeepSpeed's JIT-built FusedAdam (GPU only; its build is
    checked at start). CPU offload always uses DeepSpeedCPUAdam."""

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr ({self.lr}) must be > 0 and optim.min_lr ({self.min_lr}) in [0, lr]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps ({self.warmup_steps}) must be >= 0")
        if self.implementation not in ("auto", "torch", "fused"):
            raise ConfigError(f"optim.implementation ({self.implementation!r}) must be auto, torch or fused")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to run (the run stops at this step, also when resumed)."""
    micro_batch_size: int = 4
    """Samples per rank per forward/backward."""
    grad_accum_steps: int = 1
    log_interval: int = 10
    eval_interval: int = 100
    """Steps between evaluations (0 = only at the end)."""
    eval_iters: int = 10
    """Micro-batches per rank per evaluation."""
    save_interval: int = 500
    """Steps between checkpoints (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    async_save: bool | None = None
    """Write checkpoints in the background: a save stalls training only for the copy of each rank's
    state into host buffers (its share of fp32 weights + Adam moments, reused by every save; the
    planner states their size). Unset: on when the host has that memory, else synchronous with a
    note; true: required (start-up stops with one line if the host lacks it); false: synchronous."""
    seed: int = 1234
    """Model init and RNG seed."""
    allow_batch_change: bool = False
    """Allow resuming with another global batch (micro_batch_size x grad_accum_steps x ranks) than
    the checkpoint was trained with; off, such a resume is refused with the batch that keeps it."""
    allow_data_change: bool = False
    """Allow resuming on other data than the checkpoint was trained on (another tokenizer, other
    shards or shard contents, another blend, another data.seq_len or data.seed); off, such a resume
    is refused naming what changed.
    On, the change is logged."""
    peak_tflops: float | None = None
    """Per-GPU dense bf16 peak for the MFU metric; default: looked up from the GPU name
    (H100/H200 989, A100 312). Without it (e.g. on CPU) achieved TFLOP/s is logged, MFU is not."""
    spike_sigma: float = 0.0
    """Skip a step whose loss is this many standard deviations above the mean of the last
    `spike_window` accepted steps (e.g. 6); 0 = off. Steps with a non-finite loss or gradient
    norm are always skipped."""
    spike_window: int = 128
    """Accepted-step losses the spike detector's mean and deviation are taken over."""
    max_bad_steps: int = 20
    """Consecutive skipped steps after which the run stops (exit code 3), naming the last good checkpoint."""
    collapse_warn_ratio: float = 3.0
    """Warn when a MoE layer's max/mean expert load stays above this for `collapse_warn_intervals`
    log intervals in a row (routing collapse); 0 = off. The ratio cannot exceed n_experts / top_k."""
    collapse_warn_intervals: int = 3
    """Consecutive log intervals a layer must stay above `collapse_warn_ratio` before the warning."""
    hang_timeout_s: float = 600.0
    """Seconds a rank may go without progress inside a training step before the run is ended as hung
    (exit code 4), naming the rank(s) that stopped it, with every live rank's Python stacks in RUN/hang/
    (pipeline/distributed/hang_watchdog.py); 0 = no watchdog."""
    hang_slow_timeout_s: float | None = None
    """The same for start-up, the first step of a process, evaluation and checkpoint saves, which are
    legitimately long; null = 3 x hang_timeout_s."""

    def __post_init__(self):
        if self.spike_sigma < 0:
            raise ConfigError(f"train.spike_sigma ({self.spike_sigma}) must be >= 0 (0 = off; e.g. 6)")
        if self.collapse_warn_ratio < 0:
            raise ConfigError(f"train.collapse_warn_ratio ({self.collapse_warn_ratio}) must be >= 0 (0 = off)")
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "log_interval", "keep_last",
                     "spike_window", "max_bad_steps", "collapse_warn_intervals"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be >= 1")
        if self.hang_timeout_s < 0:
            raise ConfigError(f"train.hang_timeout_s ({self.hang_timeout_s}) must be >= 0 (0 = no hang watchdog)")
        if self.hang_slow_timeout_s is not None and self.hang_slow_timeout_s < self.hang_timeout_s:
            raise ConfigError(f"train.hang_slow_timeout_s ({self.hang_slow_timeout_s}) must be >= "
                              f"train.hang_timeout_s ({self.hang_timeout_s}), or null for 3 x hang_timeout_s")
        for name in ("eval_interval", "save_interval", "eval_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} ({getattr(self, name)}) must be >= 0")


@dataclass(kw_only=True)
class ParallelConfig:
    expert_parallel_size: int = 1
    """Ranks an MoE layer's experts are split over; must divide the world size and n_experts."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of storing its activations."""
    sequence_parallel_size: int = 1
    """Ranks each sample's sequence is split over (Ulysses, pipeline/distributed/sequence_parallel.py); must
    divide the world size, n_head and seq_len, and divide n_kv_head or be a multiple of it. The global
    batch is micro_batch_size x grad_accum_steps x world / sequence_parallel_size."""
    collective_timeout_s: float | None = None
    """Seconds a rank waits in a collective for its peers before the run fails. null: the hang
    watchdog's longest allowance plus 60 s (train.hang_slow_timeout_s + 60), so that the watchdog,
    which names the stuck rank, fires first; DeepSpeed's default (600) when the watchdog is off
    (train.hang_timeout_s=0). Set it only to override that backstop."""

    def __post_init__(self):
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"parallel.sequence_parallel_size ({self.sequence_parallel_size}) must be >= 1")
        if self.collective_timeout_s is not None and self.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s ({self.collective_timeout_s}) must be > 0, "
                              "or null for DeepSpeed's default")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging from rank 0, next to TensorBoard (pip install -e .[wandb])."""

    project: str | None = None
    """W&B project the run is logged to (required)."""
    entity: str | None = None
    """Team or user; null = your default entity."""
    name: str | None = None
    """Display name; null = the run_dir's folder name."""
    mode: str = "online"
    """online | offline (write RUN/wandb/ for `wandb sync` later) | disabled (wandb is not imported)."""

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError(f"wandb.project ({self.project!r}) must name a W&B project, e.g. wandb.project=my-runs")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"wandb.mode ({self.mode!r}) must be one of {', '.join(WANDB_MODES)}")

    def check_installed(self) -> None:
        """For runs about to start (not for reading a finished run's config, e.g. to export it);
        find_spec does not import wandb."""
        if self.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "the run config has a `wandb` section but wandb is not installed: "
                "pip install -e .[wandb] (or remove the section, or set wandb.mode=disabled)"
            )


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str = "runs/debug"
    """Output dir: checkpoints/, tensorboard/, config.yaml, ds_config.json."""
    model: dict = field(default_factory=lambda: {"preset": "debug"})
    """`preset` plus any GPTOSSConfig field to override, and optionally `init_from: PATH` (weights to
    start from, see pipeline/checkpoint/init_from.py). vocab_size defaults to the data's tokenizer."""
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    """fp32 | bf16 (bf16 weights/activations with fp32 master weights in the optimizer)."""
    deepspeed_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON (ZeRO stage, offload, comm); relative paths resolve against the repo root."""
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    """Weights & Biases logging (see WandbConfig); off when absent. TensorBoard stays on either way."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Downstream (lm-evaluation-harness) evaluation in the loop (see EvalConfig); off without tasks."""

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision ({self.precision!r}) must be fp32 or bf16")
        if "preset" not in self.model:
            raise ConfigError("model.preset is missing (e.g. model.preset=debug); see pipeline.model.list_presets()")
        # Typed like every other section: `model.n_experts=three` fails here, naming the key. Keys that
        # are not GPTOSSConfig fields (preset, ...) pass through to their own checks.
        self.model = convert_fields(GPTOSSConfig, self.model, "model")

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k not in ("preset", "init_from")}

    @property
    def init_from(self) -> str | None:
        """`model.init_from`: a weights folder to start from (ignored when the run dir has a checkpoint)."""
        return self.model.get("init_from")


def resolve_model_config(cfg: RunConfig, from_data: bool = True) -> GPTOSSConfig:
    """The model a run builds: the preset plus overrides; vocabulary and EOS come from the data's
    tokenizer unless set (`from_data`; the planner runs without the data, on the preset's)."""
    from pipeline.data.megatron_sources import run_vocabulary
    from pipeline.model.presets import get_preset

    overrides = dict(cfg.model_overrides)
    if from_data:
        vocab_size, eos_id = run_vocabulary(cfg.data.train, cfg.data.tokenizer)
        overrides.setdefault("vocab_size", vocab_size)
        overrides.setdefault("eos_token_id", eos_id)
    try:
        model_cfg = get_preset(cfg.model["preset"], **overrides)
    except TypeError as e:  # an unknown field name
        raise ConfigError(f"model section: {e}; see GPTOSSConfig for valid fields") from e
    if cfg.data.seq_len > model_cfg.block_size:
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.block_size ({model_cfg.block_size}); "
            f"lower data.seq_len or set model.block_size={cfg.data.seq_len}"
        )
    return model_cfg


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    tree = load_config_file(resolve_path(path)) if path else {}
    tree = apply_overrides(tree, list(overrides))
    if "data" not in tree:
        raise ConfigError("the run config has no `data` section: set data.train to prepared dirs")
    cfg = from_dict(RunConfig, tree)
    if cfg.wandb is not None:  # on every rank, before any engine is built
        cfg.wandb.check_installed()
    cfg.eval.check_installed()
    return cfg


def run_config_to_dict(cfg: RunConfig) -> dict:
    return to_dict(cfg)


def resolved_model(cfg: RunConfig, model_cfg: GPTOSSConfig) -> dict:
    """The model section as saved with every checkpoint: preset, every field, init_from."""
    model = {"preset": cfg.model["preset"], **to_dict(model_cfg)}
    if cfg.init_from:
        model["init_from"] = cfg.init_from
    return model


def resolved_config(cfg: RunConfig, model_cfg: GPTOSSConfig) -> dict:
    """The run config as saved in RUN/config.yaml and with every checkpoint."""
    return {**run_config_to_dict(cfg), "model": resolved_model(cfg, model_cfg)}
