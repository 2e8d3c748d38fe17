"""Rank script for tests/planning/test_plan.py: build the trainer's ZeRO-3 (+ expert-parallel) engine
on CPU/gloo (with the trainer's bucket per partition group and hooks per block), run one step, and print what DeepSpeed
actually holds on this rank as one JSON line.

    torchrun --standalone --nproc_per_node 2 tests/planning/scripts/zero3_state.py '{"ep": 2, ...}'

Each case in the JSON list argument is built the way the trainer builds its engine: expert groups
before the model, seed, model, expert parallelism, `deepspeed.initialize`.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import z3_leaf_module

from pipeline.distributed.expert_parallel import apply_expert_parallel, create_expert_groups, is_expert_parameter
from pipeline.model import GPTOSS, get_preset
from pipeline.train.engine import hook_blocks_not_submodules
from pipeline.train.zero3_buckets import keep_bucket_per_partition_group


def ds_config(case: dict) -> dict:
    """The DeepSpeed JSON of one case; test_plan.py feeds the same dict to the planner."""
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": case["persistence_threshold"],
            "sub_group_size": case.get("sub_group_size", 1_000_000_000),
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "bf16": {"enabled": case["precision"] == "bf16"},
        "steps_per_print": 10**9,
    }
    if case.get("grad_accum_dtype"):
        ds["data_types"] = {"grad_accum_dtype": case["grad_accum_dtype"]}
    return ds


def run_case(case: dict) -> dict:
    cfg = get_preset("debug", **case.get("model", {}))
    groups = create_expert_groups(case["ep"]) if case["ep"] > 1 else None
    torch.manual_seed(0)
    model = GPTOSS(cfg)
    if groups is not None:
        apply_expert_parallel(model, groups)
    hook_blocks_not_submodules(model)  # as train/engine.py's build_engine does
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(case))
    keep_bucket_per_partition_group(engine.optimizer)  # as build_engine does
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    _, loss, aux = engine(x, x)
    engine.backward(loss + aux)
    engine.step()  # creates the Adam moments

    opt = engine.optimizer
    params = list(engine.module.parameters())
    adam = [s for s in opt.optimizer.state.values() if "exp_avg" in s]
    grad_buffer = opt.grad_partitions_flat_buffer
    buckets = {id(b.buffer): b.buffer for b in opt.ipg_buckets.values() if b.buffer is not None}
    # What one ZeRO-3 hook gathers: a leaf module's (a block's) parameters, any other module's own.
    hooked = [m for m in engine.module.modules() if m._forward_pre_hooks]
    per_hook = [sum(p.ds_numel for p in m.parameters(recurse=z3_leaf_module(m))) for m in hooked]
    return {
        "largest_hook_unit": max(per_hook),
        "numel": sum(p.ds_numel for p in params),
        # ZeRO-3 pads each parameter to a multiple of its partition group; the padding sits in the
        # last rank's partition, so count it from sizes, not from this rank's data.
        "padding": sum(p.ds_tensor.numel() * dist.get_world_size(p.ds_process_group) - p.ds_numel for p in params),
        "partition": sum(p.ds_tensor.numel() for p in params),
        "expert_partition": sum(p.ds_tensor.numel() for p in params if is_expert_parameter(p)),
        "expert_group_sizes": sorted({dist.get_world_size(p.ds_process_group) for p in params
                                      if is_expert_parameter(p)}),
        "persistent_count": sum(bool(p.ds_persist) for p in params),
        "persistent_elements": sum(p.ds_numel for p in params if p.ds_persist),
        "param_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        "grad_bytes": grad_buffer.numel() * grad_buffer.element_size(),
        "master_elements": sum(t.numel() for t in opt.fp32_partitioned_groups_flat),
        "master_bytes": sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat),
        "master_is_param_buffer": all(
            t.data_ptr() == f.data_ptr() for t, f in zip(opt.fp32_partitioned_groups_flat,
                                                          opt.fp16_partitioned_groups_flat, strict=True)
        ),
        "adam_elements": sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in adam),
        "adam_bytes": sum(s["exp_avg"].numel() * s["exp_avg"].element_size()
                          + s["exp_avg_sq"].numel() * s["exp_avg_sq"].element_size() for s in adam),
        "sub_groups": [t.numel() for t in opt.fp32_partitioned_groups_flat],
        "gradient_buckets": len(buckets),
        "bucket_bytes": sum(b.numel() * b.element_size() for b in buckets.values()),
    }


def main() -> None:
    cases = json.loads(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    results = [run_case(case) for case in cases]
    for rank in range(dist.get_world_size()):  # one rank at a time: concurrent lines interleave
        if rank == dist.get_rank():
            print("RESULT " + json.dumps({"rank": rank, "results": results}), flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
