"""The DeepSpeed trainer: ZeRO-2/3, expert parallelism, activation checkpointing, bf16.

    trainer = Trainer(load_run_config("run.yaml", ["train.steps=100"]))
    trainer.fit()

Order of set-up matters and is kept in `__init__`: distributed init -> expert-parallel groups ->
model (same seed on every rank, so each rank's expert slice is a slice of the same full model) ->
expert parallelism and activation checkpointing applied from outside -> DeepSpeed engine ->
resume -> data iterators at the resumed sample position.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pipeline.config_utils import to_dict
from pipeline.data import MicroBatchIterator, build_dataset, check_vocab_compatible, load_manifest
from pipeline.errors import ConfigError
from pipeline.evaluation.downstream import DownstreamEvaluator
from pipeline.flops import flops_per_token
from pipeline.model import GPTOSSConfig, MoE, get_preset
from pipeline.model.flex_attention import resolve_attention_backend
from pipeline.train import health
from pipeline.train.checkpoint import CheckpointManager, read_latest
from pipeline.train.config import RunConfig, TrainConfig, run_config_to_dict
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine, init_distributed
from pipeline.train.expert_parallel import check_expert_parallel_size
from pipeline.train.metrics import MetricsLogger, detect_peak_tflops, expert_load_stats, memory_stats
from pipeline.train.optim import compute_loss, lr_at
from pipeline.train.weights import WeightsFolder, load_initial_weights


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, `scancel`, `--signal=USR1@120`) -> stop after the current
    step with a checkpoint. Ranks receive the signal at different moments, so `agreed()` all-reduces
    the flag (MAX) once per step: every rank stops after the same step and the save cannot deadlock."""

    def __init__(self, device: torch.device):
        self.received: str | None = None
        self.device = device
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1 if self.received else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def data_sources(sources: list) -> list[str]:
    """Directories named by `data.train` / `data.valid` in either form ([dir] or [[w, dir]])."""
    return [str(s[1]) if isinstance(s, (list, tuple)) else str(s) for s in sources]


def resolve_model_config(cfg: RunConfig) -> GPTOSSConfig:
    """The preset plus overrides; vocabulary and EOS come from the data's tokenizer unless set."""
    overrides = dict(cfg.model_overrides)
    manifest = load_manifest(data_sources(cfg.data.train)[0])
    overrides.setdefault("vocab_size", manifest.vocab_size)
    overrides.setdefault("eos_token_id", manifest.eos_id)
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


def check_global_batch(saved_train: dict, saved_world: int, train: TrainConfig, world: int, where: Path) -> None:
    """A resume must keep samples per optimizer step (the LR schedule and the data position are in
    steps and samples) unless train.allow_batch_change says otherwise."""
    old = int(saved_train["micro_batch_size"]) * int(saved_train["grad_accum_steps"]) * saved_world
    new = train.micro_batch_size * train.grad_accum_steps * world
    if old == new or train.allow_batch_change:
        return
    per_accum = train.micro_batch_size * world
    if old % per_accum == 0:
        fix = f"train.grad_accum_steps={old // per_accum}"
    elif old % world == 0:
        fix = f"train.micro_batch_size x train.grad_accum_steps = {old // world}"
    else:
        fix = f"a number of ranks that divides {old}"
    raise ConfigError(
        f"{where} was trained with a global batch of {old} samples (micro_batch_size x grad_accum_steps x ranks = "
        f"{saved_train['micro_batch_size']} x {saved_train['grad_accum_steps']} x {saved_world}) but this run has "
        f"{new} ({train.micro_batch_size} x {train.grad_accum_steps} x {world}); "
        f"keep it with {fix}, or set train.allow_batch_change=true"
    )


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = resolve_model_config(cfg)
        check_vocab_compatible(
            data_sources(cfg.data.train + (cfg.data.valid or [])), self.model_cfg.vocab_size
        )
        check_expert_parallel_size(cfg.parallel.expert_parallel_size, self.world, self.model_cfg.n_experts)
        # At start, not at the first forward: e.g. `flex` cannot train on CPU (no backward there).
        resolve_attention_backend(self.model_cfg.attention_backend, torch.device("cuda" if torch.cuda.is_available()
                                  else "cpu"), training=True, dropout=self.model_cfg.dropout)
        self.ds_config = build_ds_config(cfg, self.world)
        # Tasks are checked now (one line, exit 2), before the engine is built or a step is trained.
        self.downstream = DownstreamEvaluator.for_data(cfg.eval, data_sources(cfg.data.train)[0],
                                                       self.model_cfg.block_size, self.rank, self.world)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last)
        self._check_resume_compatible()
        init_folder = None
        if cfg.init_from and read_latest(self.ckpt.dir) is None:
            init_folder = WeightsFolder(cfg.init_from)
            init_folder.check_matches(self.model_cfg)  # before the (slow) engine build

        self.engine = build_engine(cfg, self.model_cfg, self.ds_config, self.world)
        self.moe_layers = [m for m in self.engine.module.modules() if isinstance(m, MoE)]
        for m in self.moe_layers:  # bf16 DeepSpeed cast buffers; +-rate steps need fp32 (before resume loads them)
            if m.router.expert_bias is not None:
                m.router.expert_bias = m.router.expert_bias.float()
        torch.manual_seed(cfg.train.seed + 1000 + self.rank)  # dropout differs per rank

        self.step, consumed, self.eval_history = 0, 0, []
        state = self.ckpt.load_latest(self.engine, cfg.parallel.expert_parallel_size,
                                      cfg.train.grad_accum_steps, cfg.train.seed)
        if init_folder is not None:
            n = load_initial_weights(self.engine, init_folder)
        if state is not None:
            self.step, consumed = state["step"], state["consumed_samples"]
            self.eval_history = state.get("eval_history", [])
        t, seed, seq_len = cfg.train, cfg.data.seed, cfg.data.seq_len
        self.train_data = build_dataset(cfg.data.train, "train", seq_len, seed)
        self.train_iter = MicroBatchIterator(
            self.train_data, t.micro_batch_size, self.rank, self.world, consumed
        )
        self.valid_data = build_dataset(cfg.data.valid or cfg.data.train, "valid", seq_len, seed)

        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.world * seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, seq_len)["total"]
        self.peak_tflops = t.peak_tflops or detect_peak_tflops()
        self.log = MetricsLogger(self.run_dir, self.rank == 0, cfg.tensorboard, t.steps, wandb=cfg.wandb,
                                 run_config=yaml.safe_load(self.run_files()["config.yaml"]))
        self.stop = StopSignal(self.engine.device)
        self.fault = health.FaultInjection.from_env(self.rank)
        self.spikes = health.SpikeDetector(t.spike_sigma, t.spike_window)
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_total = state.get("skipped_steps", 0) if state else 0  # TensorBoard's running count
        self.collapse = health.CollapseMonitor(t.collapse_warn_ratio, t.collapse_warn_intervals, len(self.moe_layers))
        self.bias_rate = self.model_cfg.load_balance_bias_rate
        self._write_run_files()
        if init_folder is not None:
            self.log.message(f"initialised {n} tensors from {init_folder.path} (model.init_from)")
        if state is not None:
            where = self.ckpt.dir / read_latest(self.ckpt.dir)
            self.log.message(f"resumed from {where} at step {self.step}"
                             + ("" if state["same_shape"] else
                                f" (written by {state.get('world_size')} ranks, ep "
                                f"{state.get('expert_parallel_size', '?')}; resharded, RNG reseeded)"))
            if cfg.init_from:
                self.log.message(f"model.init_from={cfg.init_from} ignored: the run dir has a checkpoint")

    # --- set-up helpers -----------------------------------------------------------------------
    def run_files(self) -> dict[str, str]:
        resolved = run_config_to_dict(self.cfg)
        resolved["model"] = {"preset": self.cfg.model["preset"], **to_dict(self.model_cfg)}
        if self.cfg.init_from:
            resolved["model"]["init_from"] = self.cfg.init_from
        return {
            "config.yaml": yaml.safe_dump(resolved, sort_keys=False),
            "ds_config.json": json.dumps(self.ds_config, indent=2),
        }

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.run_files().items():
            (self.run_dir / name).write_text(text)

    def _check_resume_compatible(self) -> None:
        """A run dir with checkpoints of a different model must not be resumed into."""
        tag = read_latest(self.ckpt.dir)
        if tag is None:
            return
        saved_cfg = yaml.safe_load((self.ckpt.dir / tag / "config.yaml").read_text())
        saved = {k: v for k, v in saved_cfg["model"].items() if k != "init_from"}
        current = {"preset": self.cfg.model["preset"], **to_dict(self.model_cfg)}
        # A field added to GPTOSSConfig after the checkpoint was written reads as its default there.
        defaults = to_dict(GPTOSSConfig())
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k))
        if diff:
            raise ConfigError(
                f"{self.run_dir} holds checkpoints of a different model (fields differ: {', '.join(diff)}); "
                "use a new run_dir, or the same model settings to resume"
            )
        written_by = json.loads((self.ckpt.dir / tag / "trainer_state.json").read_text())["world_size"]
        check_global_batch(saved_cfg["train"], written_by, self.cfg.train, self.world, self.ckpt.dir / tag)

    # --- training -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns detached sums.

        Before the last backward every rank agrees (`health.agree`) whether the step is healthy; if
        not, that backward is poisoned and DeepSpeed skips the update on every rank (health.py).
        """
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        # Accumulated on the device and read once per log interval: an .item() per loss and per MoE
        # layer here would stall the GPU pipeline dozens of times per micro-batch.
        device = self.engine.device
        gas, step = self.cfg.train.grad_accum_steps, self.step + 1
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, lm, router, load-balance, z
        tokens_LE = torch.zeros(len(self.moe_layers), self.model_cfg.n_experts, dtype=torch.float64, device=device)
        skipped_before = health.skipped_steps(self.engine)
        verdict = None
        for micro in range(gas):
            batch = self.train_iter.next().to(device)
            parts = self.fault.inject(step, compute_loss(self.engine, batch))
            loss = parts.total
            sums[:3] += torch.stack([parts.total, parts.lm, parts.router]).detach().double()
            if micro == gas - 1:
                verdict = health.agree(sums[0] / gas, self.spikes, self.rank, self.world)
                if verdict.skip or self.fault.active(step, "grad"):
                    loss = health.poison(loss)
            self.engine.backward(loss)
            self.engine.step()
            if self.moe_layers:
                stats = [m.last_stats for m in self.moe_layers]
                sums[3] += torch.stack([st.load_balance_loss for st in stats]).double().mean()
                sums[4] += torch.stack([st.z_loss for st in stats]).double().mean()
                tokens_LE += torch.stack([st.tokens_per_expert for st in stats]).double()
        sums /= gas
        skipped = verdict.reason
        if health.skipped_steps(self.engine) == skipped_before:
            if skipped:  # the guard on DeepSpeed's overflow path: a poisoned step must never apply
                raise RuntimeError(f"step {step}: DeepSpeed applied an update with NaN gradients ({skipped}); "
                                   "its overflow handling changed (see pipeline/train/health.py)")
        elif not skipped:
            skipped = "non-finite gradient norm"
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "sums": sums,
            "tokens_per_expert": tokens_LE,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss": verdict.loss,
            "skipped": skipped,
        }

    def _all_reduce(self, t: torch.Tensor, mean: bool) -> torch.Tensor:
        """Sum (or mean) over ranks of a small tensor, returned on the CPU; reduced on the engine's
        device because NCCL only reduces GPU tensors."""
        t = t.to(self.engine.device, copy=True)  # never reduce into the caller's tensor
        dist.all_reduce(t)
        t = t.cpu()
        return t / self.world if mean else t

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if len(self.valid_data) == 0 or self.cfg.train.eval_iters == 0:
            return None
        self.engine.eval()
        # The same validation samples every time, so evaluations are comparable across steps.
        it = MicroBatchIterator(self.valid_data, self.cfg.train.micro_batch_size, self.rank, self.world, 0)
        total = torch.zeros(1, dtype=torch.float64, device=self.engine.device)
        for _ in range(self.cfg.train.eval_iters):
            total += compute_loss(self.engine, it.next().to(self.engine.device)).lm.detach().double()
        self.engine.train()
        loss = float(self._all_reduce(total / self.cfg.train.eval_iters, mean=True))
        ppl = float(torch.tensor(loss).exp())
        result = {"step": self.step, "eval/loss": loss, "eval/perplexity": ppl}
        self.eval_history.append(result)
        self.log.scalars(self.step, {"eval/loss": loss, "eval/perplexity": ppl})
        self.log.message(f"eval   step {self.step:>6} | loss {loss:.4f} | ppl {ppl:.2f}")
        self._append_metrics(result)
        return result

    def save(self) -> Path:
        state = {
            "step": self.step,
            "consumed_samples": self.train_iter.consumed_samples,
            "world_size": self.world,
            "expert_parallel_size": self.cfg.parallel.expert_parallel_size,
            "global_batch_size": self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * self.world,
            "eval_history": self.eval_history,
            "skipped_steps": self.skipped_total,
        }
        path = self.ckpt.save(self.engine, self.step, state, self.run_files())
        self.log.message(f"saved checkpoint {path}")
        return path

    def _append_metrics(self, record: dict) -> None:
        """Full-precision metrics, one JSON object per line (for scripts and tests)."""
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_interval(self, window: list[dict], elapsed: float, steps: int) -> None:
        sums = self._all_reduce(torch.stack([w["sums"] for w in window]).mean(0), mean=True)
        total, lm, router, lb, z = sums.tolist()
        tokens_LE = torch.stack([w["tokens_per_expert"] for w in window]).sum(0)
        if tokens_LE.numel():
            tokens_LE = self._all_reduce(tokens_LE, mean=False)
        last = window[-1]
        tokens_per_s = self.tokens_per_step * steps / max(elapsed, 1e-9)  # skipped steps read data too
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12
        values = {
            "loss/total": total,
            "loss/lm": lm,
            "loss/aux": router,
            "moe/load_balance_loss": lb,
            "moe/z_loss": z,
            "optim/lr": last["lr"],
            "optim/grad_norm": last["grad_norm"],
            "perf/tokens_per_s": tokens_per_s,
            "perf/model_tflops_per_rank": tflops,
            "perf/consumed_samples": self.train_iter.consumed_samples,
            **memory_stats(),
        }
        extra = ""
        if self.peak_tflops:
            values["perf/mfu"] = tflops / self.peak_tflops
            extra = f" | mfu {values['perf/mfu']:.1%}"
        if tokens_LE.numel():
            values.update(expert_load_stats(tokens_LE))
            self.log.expert_counts(self.step, tokens_LE)
            for warning in self.collapse.update(tokens_LE):
                self.log.message(warning)
        biases = [m.router.expert_bias for m in self.moe_layers if m.router.expert_bias is not None]
        for layer, bias in enumerate(biases):
            values[f"moe/expert_bias_absmax/layer_{layer}"] = float(bias.abs().max())
        values["train/skipped_steps"] = self.skipped_total
        self.log.scalars(self.step, values)
        self.log.console(self.step, lm, last["lr"], tokens_per_s, extra)
        record = {"step": self.step, **values}
        if tokens_LE.numel():
            record["moe/tokens_per_expert"] = tokens_LE.long().tolist()  # [layer][expert]
        if biases:
            record["moe/expert_bias"] = [b.tolist() for b in biases]  # [layer][expert], equal on every rank
        self._append_metrics(record)

    def fit(self) -> None:
        t = self.cfg.train
        if self.step >= t.steps:
            self.log.message(f"run already at step {self.step} >= train.steps={t.steps}; nothing to do")
            return
        self.log.message(
            f"training {self.model_cfg.n_layer}-layer model, world {self.world}, "
            f"ep {self.cfg.parallel.expert_parallel_size}, {self.tokens_per_step:,} tokens/step, "
            f"steps {self.step} -> {t.steps}; tensorboard --logdir {self.log.tb_dir}"
        )
        self.log.start(self.step)
        window, window_steps, tick = [], 0, time.perf_counter()
        evaluated = saved = False
        save_due = False
        while self.step < t.steps:
            out = self.train_step()
            self.step += 1
            window_steps += 1
            evaluated = saved = False
            healthy = out["skipped"] is None
            if healthy:
                self.bad_steps = 0
                self.spikes.accept(out["loss"])
                self._update_router_bias(out["tokens_per_expert"])
                window.append(out)
            else:
                self._record_skip(out)
            if (self.step % t.log_interval == 0 or self.step == t.steps) and window:
                self._log_interval(window, time.perf_counter() - tick, window_steps)
                window, window_steps, tick = [], 0, time.perf_counter()
            if t.eval_interval and self.step % t.eval_interval == 0:
                self.evaluate()
                evaluated = True
            if self.downstream is not None:
                self.downstream.maybe_run(self.step, t.steps, self.engine, self.log, self._append_metrics, self.run_dir)
            save_due = save_due or bool(t.save_interval and self.step % t.save_interval == 0)
            if save_due and healthy:
                saved = self.save_if_finite()
                save_due = False
            if self.stop.agreed():
                if not saved and healthy:
                    self.save_if_finite()
                self.log.message(f"stopped at step {self.step} on {self.stop.received or 'a signal to another rank'}; "
                                 "run the same command again to resume")
                self.log.flush()
                return
        if not evaluated:
            self.evaluate()
        if not saved and self.bad_steps == 0:
            self.save_if_finite()
        elif not saved:
            self.log.message(f"no checkpoint at the last step {self.step}: it was skipped; "
                             f"the newest good one is {read_latest(self.ckpt.dir)}")
        self.log.flush()

    # --- step health ----------------------------------------------------------------------------
    def _record_skip(self, out: dict) -> None:
        """Console line, TensorBoard train/skipped_steps and a metrics.jsonl record per skipped step;
        raises TrainingDiverged after train.max_bad_steps in a row."""
        self.bad_steps += 1
        self.skipped_total += 1
        self.log.message(f"skipped step {self.step}: {out['skipped']} (loss {out['loss']:.4g}, grad norm "
                         f"{out['grad_norm']:.4g}); weights and optimizer state unchanged, "
                         f"{self.bad_steps} in a row")
        self.log.scalars(self.step, {"train/skipped_steps": self.skipped_total})
        finite_or_none = {k: v if math.isfinite(v) else None for k, v in (("loss", out["loss"]),
                                                                             ("grad_norm", out["grad_norm"]))}
        self._append_metrics({"step": self.step, "skipped": out["skipped"], **finite_or_none,
                              "consecutive_skips": self.bad_steps,
                              "train/skipped_steps": self.skipped_total})
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            last = read_latest(self.ckpt.dir)
            good = f"last good checkpoint: {self.ckpt.dir / last}" if last else "no checkpoint was written yet"
            self.log.flush()
            raise health.TrainingDiverged(
                f"training stopped at step {self.step}: {self.bad_steps} consecutive steps skipped "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}; last: {out['skipped']}); {good}. "
                "Lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint"
            )

    def save_if_finite(self) -> bool:
        """A checkpoint is only ever written from finite weights (checked on every rank's shard)."""
        if not health.local_params_finite(self.engine):
            self.log.message(f"not saving at step {self.step}: the weights are not finite")
            return False
        self.save()
        return True

    def _update_router_bias(self, tokens_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing after every applied step, from the step's expert loads summed over
        all micro-batches and all ranks: one all-reduce for all layers, the same update everywhere.
        Routing is local to each rank (also under expert parallelism), so this sum is the global load."""
        if self.bias_rate <= 0 or not self.moe_layers:
            return
        tokens_LE = tokens_LE.clone()  # stays on the device: no host sync for this
        dist.all_reduce(tokens_LE)
        for m, tokens_E in zip(self.moe_layers, tokens_LE, strict=True):
            m.router.update_expert_bias(tokens_E, self.bias_rate)

    def close(self) -> None:
        self.log.close()
