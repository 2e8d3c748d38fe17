"""The planner's communication and start-up figures against a real run: 4 gloo ranks, EP 2 with an
expert-data-parallel group of 2, sequence parallelism 2 on the same rank pairs, bf16, activation
checkpointing, 2 micro-batches per step. Every
collective of one steady-state optimizer step is counted by wrapping torch.distributed
(tests/planning/scripts/comm_counts.py), and the start-up peak RSS of `build_model` is read from the kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.planning import ZeroSettings, model_config, model_param_tensors, rank_elements
from pipeline.planning.comm import Links, checkpoint_snapshot_bytes, communication, startup_memory
from pipeline.train.config import load_run_config
from pipeline.train.ds_config import build_ds_config
from tests.ranks import torchrun

REPO = Path(__file__).resolve().parents[2]
WORLD = 4
# Modules are gathered when they run and released after (no prefetch, reuse distance 0): the
# behaviour of a model much larger than the prefetch bucket, which the planner assumes.
DS_JSON = {
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 1_000_000,
        "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 1000,
        "stage3_max_reuse_distance": 0,
    },
    "data_types": {"grad_accum_dtype": "fp32"},
    "bf16": {"enabled": "auto"},
}
# Experts dominate (8 x 8 layers of 512 x 1024 SwiGLU), so a rank's whole share (~200 MB fp32) stands
# well above the partitioned start-up peak the planner predicts.
OVERRIDES = ["model.preset=debug", "model.n_embd=512", "model.intermediate_size=1024", "model.n_experts=8",
             "model.n_layer=8",
             "data.train=[plan-only]", "data.seq_len=32", "precision=bf16", "train.micro_batch_size=2",
             "train.grad_accum_steps=2", "parallel.expert_parallel_size=2", "parallel.activation_checkpointing=true",
             "parallel.sequence_parallel_size=2"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    ds_path = out / "ds.json"
    ds_path.write_text(json.dumps(DS_JSON))
    overrides = [*OVERRIDES, f"deepspeed_config={ds_path}"]
    # glibc's dynamic mmap threshold keeps freed module-sized blocks in a fragmented heap (up to ~2
    # modules more, varying by rank); a fixed threshold returns them, so the peak is the live memory.
    proc = torchrun(WORLD, [str(REPO / "tests/planning/scripts/comm_counts.py"), json.dumps(overrides), str(out)],
                    timeout=400, check=False, env={"MALLOC_MMAP_THRESHOLD_": str(2**20)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    run = load_run_config(None, overrides)
    return run, results


def _planned(run):
    cfg = model_config(run)
    params = model_param_tensors(cfg)
    zero = ZeroSettings.from_ds_config(build_ds_config(run, world_size=WORLD, use_cuda=False))
    ep, t = run.parallel.expert_parallel_size, run.train
    comm = communication(cfg, params, zero, world=WORLD, ep=ep, gpus_per_node=WORLD, micro_batch=t.micro_batch_size,
                         seq_len=run.data.seq_len, grad_accum=t.grad_accum_steps, checkpointing=True, links=Links(),
                         sp=run.parallel.sequence_parallel_size)
    partition = rank_elements(params, zero, WORLD, ep).partition
    return comm, startup_memory(params, zero, partition, ep, cfg.n_experts)


def _total(counts: dict, op: str, field: str) -> int:
    return sum(c[field] for key, c in counts.items() if key.split("/")[0] == op)


def test_zero3_and_all_to_all_bytes_equal_the_run(measured):
    run, results = measured
    comm, _ = _planned(run)
    for r in results:
        c = r["counts"]
        # ZeRO-3 all-gathers: the gathered (output) bytes, non-expert params over 4 ranks + experts over 2.
        assert _total(c, "all_gather_into_tensor", "out_bytes") == comm.bytes_of("all_gather") > 0
        assert _total(c, "reduce_scatter_tensor", "in_bytes") == comm.bytes_of("reduce_scatter") > 0
        assert {k.split("/")[1] for k in c if k.startswith("all_gather")} == {"2", str(WORLD)}
    # Routing is uneven, so one rank's all-to-all input varies; summed over the ranks every token
    # slot is sent exactly once each way, which is what the planner's balanced figure adds up to.
    # The sequence-parallel q/k/v/output exchanges are the same on every rank.
    moved = sum(_total(r["counts"], "all_to_all_single", "in_bytes") for r in results)
    assert comm.bytes_of("all_to_all", "sp") > 0 and comm.bytes_of("all_to_all", "ep") > 0
    assert moved == WORLD * comm.bytes_of("all_to_all")


def test_startup_peak_rss_is_within_the_plan(measured):
    run, results = measured
    _, startup = _planned(run)
    for r in results:
        assert r["partitioned_before_initialize"]
        peak = r["startup_peak_bytes"]
        assert 0 < peak <= startup.host_cpu_only, (peak, startup)
    # The bound is meaningful: building the whole share first would need far more than was measured.
    assert startup.whole_share_fp32 > 2 * max(r["startup_peak_bytes"] for r in results)


def test_async_checkpoint_host_buffers_are_the_planned_share(measured):
    """What each rank's asynchronous checkpoint copies (format.owned_bytes, its snapshot buffers) adds
    up to the planner's per-rank figure over the ranks; rank 0 also holds the model's buffers."""
    run, results = measured
    planned = checkpoint_snapshot_bytes(model_param_tensors(model_config(run)), WORLD)
    state = sum(r["snapshot_bytes"] - r["buffer_bytes"] for r in results)
    assert 0 <= planned * WORLD - state < WORLD
    for r in results:  # non-expert tensors are dealt whole: a rank's share is near, not at, the mean
        assert 0.75 * planned < r["snapshot_bytes"] - r["buffer_bytes"] < 1.25 * planned, (r["rank"], planned)
