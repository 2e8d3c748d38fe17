"""Rank script for tests/train/test_health.py: train with the real Trainer and record, for every
step, whether this rank's share of the weights and of the optimizer state changed bit for bit.

Writes RUN/health_rank{R}.json: {"changed": {step: bool}, "adam_steps": {step: int}}.

    torchrun --nproc_per_node N tests/train/scripts/train_health.py --config RUN.yaml [key=value ...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train.__main__ import parse_args
from pipeline.train.config import load_run_config
from pipeline.train.trainer import Trainer


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    """This rank's ZeRO-3 parameter partitions, fp32 master partitions and Adam moments."""
    opt = trainer.engine.optimizer
    tensors = [p.ds_tensor for p in trainer.engine.module.parameters()]
    tensors += list(opt.fp32_partitioned_groups_flat)
    for state in opt.optimizer.state.values():
        tensors += [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return [t.detach().clone() for t in tensors]


def adam_step(trainer: Trainer) -> int:
    steps = [int(s["step"]) for s in trainer.engine.optimizer.optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def main() -> None:
    args = parse_args(sys.argv[1:])
    trainer = Trainer(load_run_config(args.config, args.overrides))
    changed, adam_steps = {}, {}
    train_step = trainer.train_step

    def recorded_step():
        before = snapshot(trainer)
        out = train_step()
        after = snapshot(trainer)
        changed[trainer.step + 1] = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        adam_steps[trainer.step + 1] = adam_step(trainer)
        return out

    trainer.train_step = recorded_step
    trainer.fit()
    trainer.close()
    report = {"changed": changed, "adam_steps": adam_steps}
    Path(trainer.run_dir, f"health_rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
