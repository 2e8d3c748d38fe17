"""Rank script for tests/train/test_bf16_and_metrics.py, test_load_balancing.py and
tests/distributed/test_expert_parallel.py: build the real Trainer, record what tests must check,
then train.

Writes RUN/inspect_rank{R}.json with, for every parameter, its ZeRO partition group (ranks) and
sizes, and the number of block forward calls during training (recomputation under activation
checkpointing makes it 2x).

    torchrun --nproc_per_node N tests/train/scripts/train_inspect.py --config RUN.yaml [key=value ...]
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.distributed.expert_parallel import is_expert_parameter
from pipeline.train.__main__ import parse_args
from pipeline.train.config import load_run_config
from pipeline.train.trainer import Trainer


def main() -> None:
    args = parse_args(sys.argv[1:])
    trainer = Trainer(load_run_config(args.config, args.overrides))
    params = {}
    for name, p in trainer.engine.module.named_parameters():
        group = getattr(p, "ds_process_group", None)
        params[name] = {
            "expert": is_expert_parameter(p),
            "group_ranks": dist.get_process_group_ranks(group) if group is not None else None,
            "full_numel": int(getattr(p, "ds_numel", p.numel())),
            "partition_numel": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else None,
            "dtype": str(p.dtype),
        }
    fp32_groups = getattr(trainer.engine.optimizer, "fp32_partitioned_groups_flat", [])
    master_dtypes = sorted({str(t.dtype) for t in fp32_groups})
    calls = {"block_forward": 0}

    def count(*_):
        calls["block_forward"] += 1

    for block in trainer.engine.module.blocks:
        block.register_forward_pre_hook(count)
    trainer.fit()
    trainer.close()
    report = {"rank": dist.get_rank(), "world": dist.get_world_size(), "params": params, **calls,
              "steps_run": trainer.cfg.train.steps, "master_dtypes": master_dtypes,
              "expert_bias": [m.router.expert_bias.tolist() for m in trainer.moe_layers
                              if m.router.expert_bias is not None]}
    Path(trainer.run_dir, f"inspect_rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
