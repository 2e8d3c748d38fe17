"""Our engine's tokens/s against Hugging Face Trainer + DeepSpeed ZeRO-3 on the same model and ranks.

    python benchmarks/bench_hf_trainer.py [--nproc 2] [--steps 20] [--warmup 3] [--repeats 2]
    python benchmarks/bench_hf_trainer.py --repeats 3 --micro-batch 2 --set model.n_embd=256 model.intermediate_size=512

Both sides train the debug preset (with any --set model.KEY=VALUE applied: the second command gives
it experts that ZeRO-3 partitions, as in a real MoE) in fp32 under DeepSpeed ZeRO-3 on the same ranks with the same
ZeRO section, the same DeepSpeed AdamW (torch_adam), micro-batches of the same shape (--micro-batch
x --seq tokens per rank, random tokens) and one micro-batch per step:
  - ours: the trainer's engine (train/engine.py build_engine) with expert_parallel_size 1 and --nproc,
    each with DeepSpeed's own ZeRO-3 code and with our patches of it (what the trainer uses: one
    gradient bucket per partition group, train/zero3_buckets.py; one all-gather per partition group
    for the persistent parameters after each step, train/zero3_persistent_gather.py; parameter hooks
    per transformer block, train/engine.py hook_blocks_not_submodules), timed as
    benchmarks/bench_ep.py times it (`measure`: a barrier, then forward + backward + step);
  - Hugging Face: `transformers.GptOssForCausalLM` from the same config (pipeline/model/hf.py
    `config_to_hf`; every rank computes every expert: transformers has no expert parallelism),
    `transformers.Trainer` with `TrainingArguments(deepspeed=...)`, timed from `on_step_begin` to
    `on_step_end` (the same forward + backward + step).
Each side runs in its own torchrun (HF's Accelerate owns its process state); the sides alternate
--repeats times and each keeps its best median step time, so a burst of load from other processes
moves the ratio little. Prints tokens/s per side, ours / HF, and the load average after each run
(on a shared machine the figures are noisy). Run with plain python: it launches the ranks itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def parse_args(argv=None):
    from bench_ep import add_step_loop_args

    parser = add_step_loop_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)  # set for the rank processes
    return parser.parse_args(argv)


def bench_ep_args(args):
    """bench_ep.py's arguments for the same work (its `measure` is the one way we time our step)."""
    from bench_ep import parse_args as ep_args

    return ep_args(["--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch),
                    "--seq", str(args.seq), "--set", *args.set])


def ours(args, rank: int, world: int) -> dict:
    from bench_ep import measure

    # With our ZeRO-3 patches (what the trainer uses) and without them (DeepSpeed's own code, as HF runs it).
    return {f"ours_ep{ep}{'' if patched else '_ds'}": measure(bench_ep_args(args), ep, world, rank, patched)[0]
            for ep in (1, world) for patched in (False, True)}


def hf(args, rank: int, world: int) -> dict:
    from bench_ep import run_config
    from transformers import GptOssForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from pipeline.model.hf import config_to_hf
    from pipeline.train.config import resolve_model_config
    from pipeline.train.ds_config import build_ds_config

    run = run_config(bench_ep_args(args), 1)
    model_cfg = resolve_model_config(run, from_data=False)  # the model bench_ep's runs build
    ours_ds = build_ds_config(run, world)
    # Our ZeRO section and optimizer type; every value HF's integration fills from TrainingArguments "auto".
    ds = {"zero_optimization": ours_ds["zero_optimization"], "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto", "torch_adam": True}},
          "steps_per_print": 10**9}
    torch.manual_seed(0)
    model = GptOssForCausalLM(config_to_hf(model_cfg))
    gen = torch.Generator().manual_seed(0)
    n = (args.warmup + args.steps) * args.micro_batch * world
    tokens = torch.randint(0, model_cfg.vocab_size, (n, args.seq), generator=gen)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=args.warmup + args.steps,
            learning_rate=run.optim.lr, weight_decay=run.optim.weight_decay, adam_beta1=run.optim.beta1,
            adam_beta2=run.optim.beta2, adam_epsilon=run.optim.eps, max_grad_norm=run.optim.grad_clip,
            lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", report_to=[],
            deepspeed=ds, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
        )
        trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[StepTimer()])
        trainer.train()
    return {"hf": statistics.median(times[args.warmup:])}


def rank_main(args) -> None:
    import torch.distributed as dist

    if args.side == "ours":
        from pipeline.distributed.process_group import init_distributed

        view = init_distributed()
        result = ours(args, view.rank, view.world)
    else:
        result = hf(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    args = parse_args()
    if args.side is not None:
        rank_main(args)
        return
    from bench_ep import check_settings

    from pipeline.cli import fail
    from pipeline.errors import ConfigError

    try:
        check_settings(bench_ep_args(args), args.nproc)
    except ConfigError as e:
        raise SystemExit(fail(e)) from None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    best: dict[str, float] = {}
    loads: list[str] = []
    for _ in range(args.repeats):
        for side in ("ours", "hf"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   __file__, *sys.argv[1:], "--side", side]
            proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
            lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                raise SystemExit(f"{side} run failed ({proc.returncode}):\n{tail}")
            for key, seconds in json.loads(lines[-1]).items():
                best[key] = min(best.get(key, float("inf")), seconds)
            loads.append(f"{side} {os.getloadavg()[0]:.1f}")
    tokens = args.micro_batch * args.seq * args.nproc
    print(f"debug model, fp32, ZeRO-3, {args.nproc} ranks, micro-batch {args.micro_batch} x {args.seq} tokens "
          f"per rank, {' '.join(args.set) or 'no overrides'}; best of {args.repeats} medians over {args.steps} steps; "
          f"load average after each run: {', '.join(loads)}")
    names = {"hf": "HF Trainer + DeepSpeed ZeRO-3"}
    for ep in (1, args.nproc):
        names[f"ours_ep{ep}_ds"] = f"ours, EP {ep}, DeepSpeed's ZeRO-3 code"
        names[f"ours_ep{ep}"] = f"ours, EP {ep}, our ZeRO-3 patches"
    for key, name in names.items():
        print(f"  {name:<40}{1e3 * best[key]:7.1f} ms/step  {tokens / best[key]:9,.0f} tokens/s")
    for key, name in names.items():
        if key != "hf":
            print(f"  {name} / HF tokens/s: {best['hf'] / best[key]:.2f}x")


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
