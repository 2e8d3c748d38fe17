"""The DeepSpeed trainer: ZeRO-2/3, expert parallelism, activation checkpointing, bf16.

    trainer = Trainer(load_run_config("run.yaml", ["train.steps=100"]))
    trainer.fit()

The loop and its wiring; each concern lives with its component (README "Layout"). Order of set-up
matters and is kept in `__init__`: distributed init -> checks (data, parallel layout, attention
backend, run-dir lock, downstream tasks, resume) -> model (same seed on every rank, so each rank's
expert slice is a slice of the same full model) with expert parallelism and activation
checkpointing applied from outside -> DeepSpeed engine -> resume -> data iterators at the resumed
sample position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from pipeline.checkpoint.init_from import WeightsFolder, load_initial_weights
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.run_state import RunState
from pipeline.data.identity import resume_order
from pipeline.data.megatron_sources import tokenizer_source
from pipeline.distributed.collectives import sum_over_ranks
from pipeline.distributed.hang_policy import HangPolicy
from pipeline.distributed.hang_watchdog import HangWatchdog
from pipeline.distributed.parallel_dims import ParallelDims
from pipeline.distributed.process_group import init_distributed, multi_rank_gloo
from pipeline.errors import CheckpointError
from pipeline.evaluation.downstream import DownstreamEvaluator
from pipeline.hardware import detect_peak_tflops
from pipeline.model.activation_memory import math_kernel_notice
from pipeline.model.flex_attention import resolve_attention_backend
from pipeline.model.flops import flops_per_token
from pipeline.process_exit import end_at_interpreter_exit
from pipeline.run_lock import hold_run_dir
from pipeline.train import health
from pipeline.train.config import RunConfig, resolve_model_config, resolved_config, resolved_model
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine
from pipeline.train.metrics import IntervalReporter, MetricsLogger, StepAccumulator, StepResult
from pipeline.train.objective import ExpertBiasBalancer, compute_loss
from pipeline.train.optim import lr_at
from pipeline.train.policy import LoopPolicy
from pipeline.train.run_data import RunData, check_data, damaged_data_error, start_background_verify
from pipeline.train.stop_signal import StopSignal


class Trainer:
    def __init__(self, cfg: RunConfig, stop: StopSignal | None = None):
        """`stop`: the CLI installs it before its imports, so that Ctrl-C is answered from the start."""
        self.cfg, t = cfg, cfg.train
        self.stop = stop or StopSignal()  # a stop request during set-up ends it (StoppedDuringStartup)
        self.stop.stage("connecting the ranks")
        hang = HangPolicy.of(t.hang_timeout_s, t.hang_slow_timeout_s)
        self.ranks = init_distributed(cfg.parallel.collective_timeout_s or hang.collective_timeout_s())
        self.hang = HangWatchdog(hang, self.ranks, Path(cfg.run_dir))  # heartbeats from here on
        self.rank, self.world = self.ranks.rank, self.ranks.world
        self.run_dir = Path(cfg.run_dir)
        self.stop.stage("checking the data and the run dir")
        self.model_cfg = resolve_model_config(cfg)
        self.data_identity, notes = check_data(cfg.data, self.model_cfg.vocab_size, self.rank, self.world,
                                                self.run_dir)
        self.verifier, verify_notes = start_background_verify(cfg.data, self.rank, self.world)  # during the build too
        notes += verify_notes
        self.dims = ParallelDims(self.world, cfg.parallel.expert_parallel_size,
                                 cfg.parallel.sequence_parallel_size).check(self.model_cfg, cfg.data.seq_len)
        self.dp_world = self.dims.dp_world
        # At start, not at the first forward: e.g. `flex` cannot train on CPU (no backward there).
        resolve_attention_backend(self.model_cfg.attention_backend, torch.device("cuda" if torch.cuda.is_available()
                                  else "cpu"), training=True, dropout=self.model_cfg.dropout)
        self.ds_config = build_ds_config(cfg, self.world)
        self.lock = hold_run_dir(self.run_dir, self.rank)  # released at exit, also on errors
        # Tasks are checked now (one line, exit 2), before the engine is built or a step is trained.
        self.downstream = DownstreamEvaluator.for_data(cfg.eval, tokenizer_source(cfg.data.train, cfg.data.tokenizer),
                                                       self.model_cfg.block_size, self.ranks)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", t.keep_last, async_save=t.async_save is not False)
        # A resume keeps the sample order its run started with (runs before the O(shards) loader: legacy).
        latest = self.ckpt.latest()
        self.data_identity["order"], order_notes = resume_order(
            RunState.read(latest).data if latest is not None else None, latest)
        notes += order_notes
        notes += self.ckpt.check_resume(resolved_model(cfg, self.model_cfg), t, self.run_dir,
                                        self.dims.sp, self.data_identity)
        init_folder = None
        if cfg.init_from and self.ckpt.latest() is None:
            init_folder = WeightsFolder(cfg.init_from)
            init_folder.check_matches(self.model_cfg)  # before the (slow) engine build

        self.stop.stage("building the model and the DeepSpeed engine")
        self.engine = build_engine(cfg, self.model_cfg, self.ds_config, self.world, self.dims)
        notes += [n for n in [self.ckpt.prepare_async(self.engine, required=t.async_save is True)] if n]
        self.balancer = ExpertBiasBalancer(self.engine.module, self.model_cfg.load_balance_bias_rate)
        self.moe_layers = self.balancer.layers
        torch.manual_seed(t.seed + 1000 + self.rank)  # dropout differs per rank
        self.stop.stage("loading the checkpoint")
        resumed = self.ckpt.load_latest(self.engine, self.dims.ep, t.grad_accum_steps, t.seed)
        if init_folder is not None:
            n = load_initial_weights(self.engine, init_folder)
        state = resumed.state if resumed is not None else RunState(step=0)
        self.step, self.eval_history = state.step, list(state.eval_history)
        self.skipped_total = state.skipped_steps  # TensorBoard's running count
        self.stop.stage("building the data loader")
        self.data = RunData.build(cfg.data, t.micro_batch_size, self.dims.dp_rank(self.rank), self.dp_world,
                                  state.consumed_samples, self.data_identity["order"], t.grad_accum_steps + 1)

        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_world * cfg.data.seq_len
        self.log = MetricsLogger(self.run_dir, self.rank == 0, cfg.tensorboard, t.steps, wandb=cfg.wandb,
                                 run_config=resolved_config(cfg, self.model_cfg))
        if self.engine.device.type == "cuda" and (notice := math_kernel_notice(
                self.model_cfg, t.micro_batch_size, cfg.data.seq_len, 2 if cfg.precision == "bf16" else 4)):
            self.log.message(notice)  # once, at start: every step pays it
        self.stop.start_training(self.engine.device, self._abort)
        self.fault = health.FaultInjection.from_env(self.rank)
        self.spikes = health.SpikeDetector(t.spike_sigma, t.spike_window)
        self.policy = LoopPolicy(t, cfg.eval.downstream_interval if self.downstream is not None else None)
        self.reporter = IntervalReporter(
            self.log, self.engine.device, self.tokens_per_step, flops_per_token(self.model_cfg, cfg.data.seq_len)
            ["total"], self.world, t.peak_tflops or detect_peak_tflops(),
            health.CollapseMonitor(t.collapse_warn_ratio, t.collapse_warn_intervals, len(self.moe_layers)))
        self._write_run_files()
        for note in ([self.lock.note] if self.lock and self.lock.note else []) + notes:
            self.log.message(note)
        if init_folder is not None:
            self.log.message(f"initialised {n} tensors from {init_folder.path} (model.init_from)")
        if resumed is not None:
            self.log.message(f"resumed from {resumed.path} at step {self.step}"
                             + ("" if resumed.same_shape else
                                f" (written by {state.world_size} ranks, ep "
                                f"{state.expert_parallel_size or '?'}; resharded, RNG reseeded)"))
            if cfg.init_from:
                self.log.message(f"model.init_from={cfg.init_from} ignored: the run dir has a checkpoint")

    # --- set-up helpers -----------------------------------------------------------------------
    def run_files(self) -> dict[str, str]:
        """RUN/config.yaml and RUN/ds_config.json, also saved with every checkpoint."""
        return {
            "config.yaml": yaml.safe_dump(resolved_config(self.cfg, self.model_cfg), sort_keys=False),
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
        device = self.engine.device
        gas, step = self.cfg.train.grad_accum_steps, self.step + 1
        acc = StepAccumulator(len(self.moe_layers), self.model_cfg.n_experts, device)
        skipped_before = health.skipped_steps(self.engine)
        verdict = None
        self.hang.beat("step", step)
        self.fault.stall(step)
        self.hang.beat("forward", step)  # ranks past this point wait in the step's collectives
        for micro in range(gas):
            parts = self.fault.inject(step, compute_loss(self.engine, self.data.train_iter.next().to(device)))
            loss = parts.total
            acc.add_losses(parts)
            if micro == gas - 1:
                verdict = acc.timed_sync(health.agree, acc.sums[0] / gas, self.spikes, self.rank, self.world)
                if verdict.skip or self.fault.active(step, "grad"):
                    loss = health.poison(loss)
            self.engine.backward(loss)
            self.engine.step()
            acc.add_router_stats(parts)
        skipped = verdict.reason
        if health.skipped_steps(self.engine) == skipped_before:
            if skipped:  # the guard on DeepSpeed's overflow path: a poisoned step must never apply
                raise RuntimeError(f"step {step}: DeepSpeed applied an update with NaN gradients ({skipped}); "
                                   "its overflow handling changed (see pipeline/train/health.py)")
        elif not skipped:
            skipped = "non-finite gradient norm"
        return acc.result(gas, lr, self.engine.get_global_grad_norm(), verdict.loss, skipped)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if len(self.data.valid) == 0 or self.cfg.train.eval_iters == 0:
            return None
        self.hang.beat("eval", self.step)
        self.engine.eval()
        it = self.data.valid_batches()  # the same samples every time: evaluations compare across steps
        total = torch.zeros(1, dtype=torch.float64, device=self.engine.device)
        for _ in range(self.cfg.train.eval_iters):
            total += compute_loss(self.engine, it.next().to(self.engine.device)).lm.detach().double()
        self.engine.train()
        loss = float(sum_over_ranks(total / self.cfg.train.eval_iters, self.engine.device, mean=True))
        ppl = float(torch.tensor(loss).exp())
        result = {"step": self.step, "eval/loss": loss, "eval/perplexity": ppl}
        self.eval_history.append(result)
        self.log.scalars(self.step, {"eval/loss": loss, "eval/perplexity": ppl})
        self.log.message(f"eval   step {self.step:>6} | loss {loss:.4f} | ppl {ppl:.2f}")
        self.log.record(result)
        return result

    def run_state(self) -> RunState:
        return RunState(
            step=self.step, consumed_samples=self.data.train_iter.consumed_samples, world_size=self.world,
            expert_parallel_size=self.dims.ep, sequence_parallel_size=self.dims.sp,
            global_batch_size=self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * self.dp_world,
            eval_history=self.eval_history, skipped_steps=self.skipped_total, data=self.data_identity,
        )

    def save_if_finite(self) -> bool:
        """A checkpoint is only ever written from finite weights (CheckpointManager.save_if_finite)."""
        self.hang.beat("save", self.step)
        path = self.ckpt.save_if_finite(self.engine, self.run_state(), self.run_files())
        done = "saving checkpoint {} in the background" if self.ckpt.saver is not None else "saved checkpoint {}"
        self.log.message(done.format(path) if path is not None else
                         f"not saving at step {self.step}: the weights are not finite")
        return path is not None

    def fit(self) -> None:
        t = self.cfg.train
        if self.step >= t.steps:
            self.log.message(f"run already at step {self.step} >= train.steps={t.steps}; nothing to do")
            return
        self.log.message(
            f"training {self.model_cfg.n_layer}-layer model, world {self.world}, "
            f"ep {self.dims.ep}, sp {self.dims.sp}, "
            f"{self.tokens_per_step:,} tokens/step, "
            f"steps {self.step} -> {t.steps}; tensorboard --logdir {self.log.tb_dir}"
        )
        self.log.start(self.step)
        self.reporter.start()
        while self.step < t.steps:
            out = self.train_step()
            self.step += 1
            self.reporter.add(out)
            todo = self.policy.after_step(self.step, out.healthy)
            if out.healthy:
                self.spikes.accept(out.loss)
                self.balancer.update(out.tokens_per_expert_LE)
            else:
                self._record_skip(out)
            if todo.log:
                self.reporter.report(self.step, self.data.train_iter.consumed_samples, self.skipped_total,
                                     self.balancer.biases(), self.data.train_iter.take_wait_seconds())
            if todo.evaluate:
                self.evaluate()
                self.policy.done(evaluated=True)
            if todo.downstream:
                self.hang.beat("downstream", self.step)
                self.downstream.run(self.step, self.engine, self.log, self.log.record, self.run_dir)
            if todo.save:
                self.policy.done(saved=self.save_if_finite())
            elif line := self.ckpt.committed():  # a background save finished (checked without waiting)
                self.log.message(line)
            if self.stop.agreed(self.verifier is not None and self.verifier.problem is not None):
                saved = self.policy.save_on_stop() and self.save_if_finite()
                self._wait_for_save()  # a stop ends with the save in flight complete
                if damaged := damaged_data_error(self.verifier, self.step, saved or self.policy.saved):
                    self.log.flush()
                    raise damaged
                self.log.message(f"stopped at step {self.step} on {self.stop.received or 'a request of another rank'}; "
                                 "run the same command again to resume")
                self.log.flush()
                return
        end = self.policy.at_end()
        if end.evaluate:
            self.evaluate()
        if end.save:
            self.save_if_finite()
        elif not self.policy.saved:
            self._wait_for_save()  # so that the last good checkpoint named is complete
            self.log.message(f"no checkpoint at the last step {self.step}: it was skipped; "
                             f"{self.ckpt.last_good_message(verified=True)}")
        self._wait_for_save()  # the final save is complete when fit returns
        self.log.flush()

    def _wait_for_save(self) -> None:
        if line := self.ckpt.wait():
            self.log.message(line)

    def _record_skip(self, out: StepResult) -> None:
        """Console line, TensorBoard train/skipped_steps and a metrics.jsonl record per skipped step;
        raises TrainingDiverged after train.max_bad_steps in a row."""
        bad = self.policy.bad_steps
        self.skipped_total += 1
        self.log.message(f"skipped step {self.step}: {out.skipped} (loss {out.loss:.4g}, grad norm "
                         f"{out.grad_norm:.4g}); weights and optimizer state unchanged, {bad} in a row")
        self.log.scalars(self.step, {"train/skipped_steps": self.skipped_total})
        self.log.record({"step": self.step, "skipped": out.skipped, **out.finite_or_none(),
                         "consecutive_skips": bad, "train/skipped_steps": self.skipped_total})
        if self.policy.diverged:
            good = self.ckpt.last_good_message(verified=True)  # collective: every rank is here
            self.log.flush()
            raise health.TrainingDiverged(
                f"training stopped at step {self.step}: {bad} consecutive steps skipped "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}; last: {out.skipped}); {good}. "
                "Lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint"
            )

    def _abort(self, what: str) -> str:
        """A second stop request (`what`): the process exits right after this (see stop_signal.StopSignal)."""
        if self.lock is not None:
            self.lock.release()
        return (f"stopped at once at step {self.step} by {what}, without a checkpoint; "
                f"{self.ckpt.last_good_message()}")

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Logs closed, run dir released; ranks of a multi-rank gloo job will end at interpreter exit
        without teardown, so that no gloo worker thread can abort them then (pipeline/process_exit.py).
        Not a single process (pytest, a notebook): a `raise SystemExit(n)` there would exit 0.
        On an error a checkpoint still being written is finished first (its own failure is logged)."""
        try:
            self.hang.beat("save", self.step)  # a save's allowance while the one in flight finishes
            self._wait_for_save()
        except CheckpointError as e:
            self.log.message(str(e))
        self.hang.stop()
        self.data.train_iter.close()
        if self.verifier is not None:
            self.verifier.stop()
        self.log.close()
        if self.lock is not None:
            self.lock.release()
        if multi_rank_gloo():
            end_at_interpreter_exit()
