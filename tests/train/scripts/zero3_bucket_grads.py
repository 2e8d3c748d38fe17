"""Rank script for tests/train/test_zero3_buckets.py: our ZeRO-3 changes (one gradient bucket per
partition group, pipeline/train/zero3_buckets.py; one all-gather of the persistent parameters after
each step, pipeline/train/zero3_persistent_gather.py) against DeepSpeed's own code, every parameter's
gradient; and under ZeRO-3 the same with parameter hooks per block, not per submodule (train/engine.py
`hook_blocks_not_submodules`).

    torchrun --standalone --nproc_per_node 4 tests/train/scripts/zero3_bucket_grads.py OUT.json

Per case (expert-parallel size, ZeRO stage, sequence-parallel size) every rank builds the real
engine twice from the same seed (three times under ZeRO-3), once without the patches, once with them
(and once with them and hooks per block), and runs the same two steps on the same micro-batches
(the second reads the parameters re-gathered after the first). It records each step's loss, each
parameter's gradient after each backward (ZeRO-3: this rank's partition; ZeRO-2: the full
gradient), the number of reduce-scatters of each backward (calls of stage 3's bucket
reduce-scatter), the number of all-gathers of each optimizer step, whether the patches touched the
optimizer, and how many modules carry ZeRO-3's hooks. Rank 0 gathers every rank's largest
differences and writes OUT.json.
"""

import json
import sys

import torch
import torch.distributed as dist

from pipeline.config_utils import from_dict
from pipeline.model import get_preset
from pipeline.train.config import RunConfig
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine, release_engine
from pipeline.train.objective import compute_loss
from pipeline.train.zero3_buckets import BucketsPerPartitionGroup

CASES = [(1, 2, 1), (1, 2, 2), (1, 3, 1), (1, 3, 2), (2, 3, 1), (2, 3, 2)]  # (ep, zero stage, sp)
STEPS = 2
SEQ = 32
# The stage-3 methods that issue a bucket's reduce-scatter (called only for a non-empty bucket).
SCATTERS = ("_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads",
            "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads")
PATCHED = ("reduce_independent_p_g_buckets_and_remove_grads", "independent_gradient_partition_epilogue")


def run_config(ep: int, stage: int, sp: int) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"preset": "debug"}, "data": {"train": ["unused"], "seq_len": SEQ},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 0},
        "train": {"steps": STEPS, "micro_batch_size": 2, "seed": 5},
        "parallel": {"expert_parallel_size": ep, "sequence_parallel_size": sp},
        "deepspeed_config": f"ds_configs/zero{stage}.json", "precision": "fp32",
    })


def count_scatters(optimizer, counter: list[int]) -> None:
    for name in SCATTERS:
        if hasattr(optimizer, name):
            original = getattr(optimizer, name)

            def counted(*args, _original=original, **kwargs):
                counter[0] += 1
                return _original(*args, **kwargs)

            setattr(optimizer, name, counted)


def count_gathers(counter: list[int]):
    """Count DeepSpeed's all-gathers (every ZeRO path reaches the backend's all_gather_into_tensor);
    returns the function that undoes it."""
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    original = backend.all_gather_into_tensor

    def counted(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    backend.all_gather_into_tensor = counted
    return lambda: vars(backend).pop("all_gather_into_tensor", None)


def gradients(engine, stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    get = safe_get_local_grad if stage == 3 else safe_get_full_grad
    return {n: get(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def run(ep: int, stage: int, sp: int, patched: bool, rank: int, world: int, per_block: bool = False) -> dict:
    cfg = run_config(ep, stage, sp)
    model_cfg = get_preset("debug", block_size=128)
    engine = build_engine(cfg, model_cfg, build_ds_config(cfg, world), world, bucket_per_partition_group=patched,
                          persistent_gather_in_one=patched, hooks_per_block=per_block)
    hooked = sum(1 for m in engine.module.modules() if m._forward_pre_hooks)  # modules ZeRO-3 hooks
    optimizer = engine.optimizer
    touched = isinstance(getattr(optimizer, "ipg_buckets", None), BucketsPerPartitionGroup) or any(
        name in vars(optimizer) for name in PATCHED)
    counter, gathers = [0], [0]
    count_scatters(optimizer, counter)
    uncount_gathers = count_gathers(gathers)
    gen = torch.Generator().manual_seed(rank // sp)  # an SP group reads the same samples
    out = {"loss": [], "grads": [], "scatters": [], "gathers": [], "touched": touched, "hooked": hooked}
    try:
        for _ in range(STEPS):
            batch = torch.randint(0, model_cfg.vocab_size, (2, SEQ + 1), generator=gen)
            loss = compute_loss(engine, batch).total
            counter[0] = 0
            engine.backward(loss)
            out["scatters"].append(counter[0])
            out["grads"].append(gradients(engine, stage))
            out["loss"].append(loss.item())
            gathers[0] = 0
            engine.step()
            out["gathers"].append(gathers[0])
    finally:
        uncount_gathers()
        release_engine(engine)
    return out


def compare_gradients(a: dict, b: dict) -> tuple[float, str, bool]:
    """(largest absolute difference, where it is, whether every gradient is bit-identical) of two runs."""
    max_diff, worst, bit_identical = 0.0, "", True
    for step in range(STEPS):
        assert a["grads"][step].keys() == b["grads"][step].keys()
        for name, g in a["grads"][step].items():
            h = b["grads"][step][name]
            bit_identical &= torch.equal(g, h)
            diff = (g - h).abs().max().item() if g.numel() else 0.0
            if diff > max_diff:
                max_diff, worst = diff, f"step {step + 1} {name}"
    return max_diff, worst, bit_identical


def main() -> None:
    from pipeline.distributed.process_group import init_distributed

    view = init_distributed()
    rank, world = view.rank, view.world
    report = []
    for ep, stage, sp in CASES:
        base = run(ep, stage, sp, False, rank, world)
        new = run(ep, stage, sp, True, rank, world)
        # Hooks per block change the order in which gradients enter the bucket, so the reduce-scatter
        # sums each element in another rank order: compared with a tolerance, not bit for bit.
        per_block = run(ep, stage, sp, True, rank, world, per_block=True) if stage == 3 else new
        block_diff, block_worst, _ = compare_gradients(new, per_block)
        max_diff, worst, bit_identical = compare_gradients(base, new)
        mine = {"rank": rank, "max_grad_diff": max_diff, "worst": worst, "bit_identical": bit_identical,
                "loss_base": base["loss"], "loss_patched": new["loss"],
                "scatters_base": base["scatters"], "scatters_patched": new["scatters"],
                "gathers_base": base["gathers"], "gathers_patched": new["gathers"],
                "touched_base": base["touched"], "touched_patched": new["touched"],
                "hooked_base": base["hooked"], "hooked_patched": new["hooked"],
                "hooked_per_block": per_block["hooked"], "max_grad_diff_per_block": block_diff,
                "worst_per_block": block_worst, "loss_per_block": per_block["loss"],
                "scatters_per_block": per_block["scatters"], "gathers_per_block": per_block["gathers"],
                "n_grads": len(base["grads"][0]),
                "grad_norm": sum(float(g.float().norm()) for g in base["grads"][0].values())}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        report.append({"ep": ep, "zero": stage, "sp": sp, "ranks": gathered})
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
