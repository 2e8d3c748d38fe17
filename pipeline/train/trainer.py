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
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pipeline.config_utils import to_dict
from pipeline.data import MicroBatchIterator, build_dataset, check_vocab_compatible, source_paths
from pipeline.data.identity import resume_order
from pipeline.data.shard_cache import ShardCache
from pipeline.evaluation.downstream import DownstreamEvaluator
from pipeline.hardware import detect_peak_tflops
from pipeline.model import MoE
from pipeline.model.flex_attention import resolve_attention_backend
from pipeline.model.flops import flops_per_token
from pipeline.planning.activations import math_kernel_notice
from pipeline.train import health
from pipeline.train.checkpoint.init_from import WeightsFolder, load_initial_weights
from pipeline.train.checkpoint.manager import TRAINER_STATE, CheckpointManager
from pipeline.train.config import RunConfig, resolve_model_config, run_config_to_dict
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine, init_distributed
from pipeline.train.expert_parallel import check_expert_parallel_size
from pipeline.train.guards import StopSignal, check_data, hold_run_dir
from pipeline.train.loss import compute_loss
from pipeline.train.metrics import (
    LOSS_KEYS,
    MetricsLogger,
    StepResult,
    aggregate,
    expert_load_stats,
    memory_stats,
    throughput,
)
from pipeline.train.optim import lr_at
from pipeline.train.policy import LoopPolicy
from pipeline.train.sequence_parallel import check_sequence_parallel_size, data_parallel_coords


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world = init_distributed()
        self.run_dir = Path(cfg.run_dir)
        self.model_cfg = resolve_model_config(cfg)
        check_vocab_compatible(
            source_paths(cfg.data.train) + source_paths(cfg.data.valid or []), self.model_cfg.vocab_size
        )
        self.data_identity, notes = check_data(cfg.data.train, cfg.data.valid, self.model_cfg.vocab_size,
                                               cfg.data.verify_checksums, self.rank, self.world)
        check_expert_parallel_size(cfg.parallel.expert_parallel_size, self.world, self.model_cfg.n_experts)
        check_sequence_parallel_size(cfg.parallel.sequence_parallel_size, self.world, self.model_cfg, cfg.data.seq_len)
        self.dp_rank, self.dp_world = data_parallel_coords(self.rank, self.world, cfg.parallel.sequence_parallel_size)
        # At start, not at the first forward: e.g. `flex` cannot train on CPU (no backward there).
        resolve_attention_backend(self.model_cfg.attention_backend, torch.device("cuda" if torch.cuda.is_available()
                                  else "cpu"), training=True, dropout=self.model_cfg.dropout)
        self.ds_config = build_ds_config(cfg, self.world)
        self.lock = hold_run_dir(self.run_dir, self.rank)  # released at exit, also on errors
        # Tasks are checked now (one line, exit 2), before the engine is built or a step is trained.
        self.downstream = DownstreamEvaluator.for_data(cfg.eval, source_paths(cfg.data.train)[0],
                                                       self.model_cfg.block_size, self.rank, self.world)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_last)
        # A resume keeps the sample order its run started with (runs before the O(shards) loader: legacy).
        where = self.ckpt.latest()
        saved = json.loads((where / TRAINER_STATE).read_text()).get("data") if where is not None else None
        self.data_identity["order"], order_notes = resume_order(saved, where)
        notes += order_notes
        notes += self.ckpt.check_resume(self.resolved_model(), cfg.train, self.run_dir,
                                        cfg.parallel.sequence_parallel_size, self.data_identity)
        init_folder = None
        if cfg.init_from and self.ckpt.latest() is None:
            init_folder = WeightsFolder(cfg.init_from)
            init_folder.check_matches(self.model_cfg)  # before the (slow) engine build

        self.engine = build_engine(cfg, self.model_cfg, self.ds_config, self.world)
        self.moe_layers = [m for m in self.engine.module.modules() if isinstance(m, MoE)]
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
        shards = ShardCache(cfg.data.max_open_files)  # one bound on open data files for both splits
        order = self.data_identity["order"]
        self.train_data = build_dataset(cfg.data.train, "train", seq_len, seed, shards, order)
        self.valid_data = build_dataset(cfg.data.valid or cfg.data.train, "valid", seq_len, seed, shards, order)
        # The next micro-batches are read while the step computes (the step's wait is time/data_wait).
        self.train_iter = MicroBatchIterator(
            self.train_data, t.micro_batch_size, self.dp_rank, self.dp_world, consumed, prefetch=t.grad_accum_steps + 1
        )

        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_world * seq_len
        self.flops_per_token = flops_per_token(self.model_cfg, seq_len)["total"]
        self.peak_tflops = t.peak_tflops or detect_peak_tflops()
        self.log = MetricsLogger(self.run_dir, self.rank == 0, cfg.tensorboard, t.steps, wandb=cfg.wandb,
                                 run_config=self.resolved_config())
        if self.engine.device.type == "cuda" and (notice := math_kernel_notice(
                self.model_cfg, t.micro_batch_size, seq_len, 2 if cfg.precision == "bf16" else 4)):
            self.log.message(notice)  # once, at start: every step pays it
        self.stop = StopSignal(self.engine.device, self._abort)
        self.fault = health.FaultInjection.from_env(self.rank)
        self.spikes = health.SpikeDetector(t.spike_sigma, t.spike_window)
        self.policy = LoopPolicy(t, cfg.eval.downstream_interval if self.downstream is not None else None)
        self.skipped_total = state.get("skipped_steps", 0) if state else 0  # TensorBoard's running count
        self.collapse = health.CollapseMonitor(t.collapse_warn_ratio, t.collapse_warn_intervals, len(self.moe_layers))
        self.bias_rate = self.model_cfg.load_balance_bias_rate
        self._write_run_files()
        for note in ([self.lock.note] if self.lock and self.lock.note else []) + notes:
            self.log.message(note)
        if init_folder is not None:
            self.log.message(f"initialised {n} tensors from {init_folder.path} (model.init_from)")
        if state is not None:
            where = self.ckpt.latest()
            self.log.message(f"resumed from {where} at step {self.step}"
                             + ("" if state["same_shape"] else
                                f" (written by {state.get('world_size')} ranks, ep "
                                f"{state.get('expert_parallel_size', '?')}; resharded, RNG reseeded)"))
            if cfg.init_from:
                self.log.message(f"model.init_from={cfg.init_from} ignored: the run dir has a checkpoint")

    # --- set-up helpers -----------------------------------------------------------------------
    def resolved_model(self) -> dict:
        """The model section as saved with every checkpoint: preset, every field, init_from."""
        model = {"preset": self.cfg.model["preset"], **to_dict(self.model_cfg)}
        if self.cfg.init_from:
            model["init_from"] = self.cfg.init_from
        return model

    def resolved_config(self) -> dict:
        """The run config as saved in RUN/config.yaml and with every checkpoint."""
        return {**run_config_to_dict(self.cfg), "model": self.resolved_model()}

    def run_files(self) -> dict[str, str]:
        return {
            "config.yaml": yaml.safe_dump(self.resolved_config(), sort_keys=False),
            "ds_config.json": json.dumps(self.ds_config, indent=2),
        }

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.run_files().items():
            (self.run_dir / name).write_text(text)

    # --- training -----------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum_steps micro-batches.

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
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=device)
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
            if parts.router_stats is not None:
                sums[3] += parts.router_stats.load_balance_loss_L.double().mean()
                sums[4] += parts.router_stats.z_loss_L.double().mean()
                tokens_LE += parts.router_stats.tokens_per_expert_LE.double()
        sums /= gas
        skipped = verdict.reason
        if health.skipped_steps(self.engine) == skipped_before:
            if skipped:  # the guard on DeepSpeed's overflow path: a poisoned step must never apply
                raise RuntimeError(f"step {step}: DeepSpeed applied an update with NaN gradients ({skipped}); "
                                   "its overflow handling changed (see pipeline/train/health.py)")
        elif not skipped:
            skipped = "non-finite gradient norm"
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(losses=sums, tokens_per_expert_LE=tokens_LE, lr=lr,
                          grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                          loss=verdict.loss, skipped=skipped)

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
        it = MicroBatchIterator(self.valid_data, self.cfg.train.micro_batch_size, self.dp_rank, self.dp_world, 0)
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
            "sequence_parallel_size": self.cfg.parallel.sequence_parallel_size,
            "global_batch_size": self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * self.dp_world,
            "eval_history": self.eval_history,
            "skipped_steps": self.skipped_total,
            "data": self.data_identity,
        }
        path = self.ckpt.save(self.engine, self.step, state, self.run_files())
        self.log.message(f"saved checkpoint {path}")
        return path

    def _append_metrics(self, record: dict) -> None:
        """Full-precision metrics, one JSON object per line (for scripts and tests)."""
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_interval(self, window: list[StepResult], elapsed: float, steps: int) -> None:
        interval = aggregate(window, self._all_reduce)
        tokens_LE = interval.tokens_per_expert_LE
        # skipped steps read data too: `steps` counts them
        perf = throughput(self.tokens_per_step * steps, elapsed, self.flops_per_token, self.world, self.peak_tflops)
        values = {
            **interval.losses,
            "optim/lr": interval.lr,
            "optim/grad_norm": interval.grad_norm,
            **perf,
            "perf/consumed_samples": self.train_iter.consumed_samples,
            "time/data_wait": self.train_iter.take_wait_seconds() / steps,  # s per step this rank waited for data
            **memory_stats(),
        }
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
        self.log.console(self.step, values["loss/lm"], interval.lr, perf["perf/tokens_per_s"], perf.get("perf/mfu"))
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
            f"ep {self.cfg.parallel.expert_parallel_size}, sp {self.cfg.parallel.sequence_parallel_size}, "
            f"{self.tokens_per_step:,} tokens/step, "
            f"steps {self.step} -> {t.steps}; tensorboard --logdir {self.log.tb_dir}"
        )
        self.log.start(self.step)
        window, window_steps, tick = [], 0, time.perf_counter()
        while self.step < t.steps:
            out = self.train_step()
            self.step += 1
            window_steps += 1
            todo = self.policy.after_step(self.step, out.healthy)
            if out.healthy:
                self.spikes.accept(out.loss)
                self._update_router_bias(out.tokens_per_expert_LE)
                window.append(out)
            else:
                self._record_skip(out)
            if todo.log and window:
                self._log_interval(window, time.perf_counter() - tick, window_steps)
                window, window_steps, tick = [], 0, time.perf_counter()
            if todo.evaluate:
                self.evaluate()
                self.policy.done(evaluated=True)
            if todo.downstream:
                self.downstream.run(self.step, self.engine, self.log, self._append_metrics, self.run_dir)
            if todo.save:
                self.policy.done(saved=self.save_if_finite())
            if self.stop.agreed():
                if self.policy.save_on_stop():
                    self.save_if_finite()
                self.log.message(f"stopped at step {self.step} on {self.stop.received or 'a signal to another rank'}; "
                                 "run the same command again to resume")
                self.log.flush()
                return
        end = self.policy.at_end()
        if end.evaluate:
            self.evaluate()
        if end.save:
            self.save_if_finite()
        elif not self.policy.saved:
            self.log.message(f"no checkpoint at the last step {self.step}: it was skipped; "
                             f"{self.ckpt.last_good_message(verified=True)}")
        self.log.flush()

    # --- step health ----------------------------------------------------------------------------
    def _record_skip(self, out: StepResult) -> None:
        """Console line, TensorBoard train/skipped_steps and a metrics.jsonl record per skipped step;
        raises TrainingDiverged after train.max_bad_steps in a row."""
        bad = self.policy.bad_steps
        self.skipped_total += 1
        self.log.message(f"skipped step {self.step}: {out.skipped} (loss {out.loss:.4g}, grad norm "
                         f"{out.grad_norm:.4g}); weights and optimizer state unchanged, {bad} in a row")
        self.log.scalars(self.step, {"train/skipped_steps": self.skipped_total})
        self._append_metrics({"step": self.step, "skipped": out.skipped, **out.finite_or_none(),
                              "consecutive_skips": bad, "train/skipped_steps": self.skipped_total})
        if self.policy.diverged:
            good = self.ckpt.last_good_message(verified=True)  # collective: every rank is here
            self.log.flush()
            raise health.TrainingDiverged(
                f"training stopped at step {self.step}: {bad} consecutive steps skipped "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}; last: {out.skipped}); {good}. "
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

    def _abort(self) -> str:
        """A second Ctrl-C: the process exits right after this (see guards.StopSignal)."""
        if self.lock is not None:
            self.lock.release()
        return (f"stopped at once at step {self.step} by a second Ctrl-C, without a checkpoint; "
                f"{self.ckpt.last_good_message()}")

    def close(self) -> None:
        self.train_iter.close()
        self.log.close()
        if self.lock is not None:
            self.lock.release()
