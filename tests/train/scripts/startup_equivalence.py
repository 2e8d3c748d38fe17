"""Rank script for tests/train/test_engine_startup.py: build a model with the trainer's partitioned
start-up, gather every parameter back and compare it with the same model built whole.

    torchrun --nproc_per_node 2 tests/train/scripts/startup_equivalence.py CASES_JSON OUT

CASES_JSON: {name: [preset, model overrides, precision]}; OUT gets {name: result}.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from pipeline.distributed.process_group import init_distributed
from pipeline.model import GPTOSS, get_preset
from pipeline.train.config import load_run_config
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_model


def check(preset: str, overrides: dict, precision: str, world: int) -> dict:
    run = load_run_config(None, [f"model.preset={preset}", "data.train=[unused]", f"precision={precision}",
                                 "deepspeed_config=ds_configs/zero3.json", "parallel.expert_parallel_size=1",
                                 "train.seed=11"])
    cfg = get_preset(preset, **overrides)
    ds = build_ds_config(run, world_size=world, use_cuda=False)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    model = build_model(run, cfg, world, ds)

    torch.manual_seed(run.train.seed)  # what build_model seeds: the same init_seed
    whole = GPTOSS(cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    expected = dict(whole.named_parameters())
    params = dict(model.named_parameters())
    mismatched = []
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p]):
            if p.dtype != dtype or not torch.equal(p.data, expected[name].data.to(dtype)):
                mismatched.append(name)
    return {
        "params": len(params),
        "zero_params": sum(hasattr(p, "ds_tensor") for p in params.values()),
        "mismatched": mismatched,
        "tied": model.lm_head.weight is model.embed_tokens.weight,
        "dtype": str(next(iter(params.values())).dtype),
    }


def main() -> None:
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    view = init_distributed()
    rank, world = view.rank, view.world
    results = {name: check(*case, world) for name, case in cases.items()}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
