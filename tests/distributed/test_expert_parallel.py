"""Expert parallelism under ZeRO-3 equals a single-process run, and experts are partitioned over
the expert-data-parallel group (DESIGN.md §4: every wrong variant trains without an error)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.ranks import torchrun
from tests.runs import losses, write_run_config
from tests.train.reference import reference_run

TRAIN_SCRIPTS = Path(__file__).parents[1] / "train" / "scripts"

STEPS = 10


def run_inspected(tmp_path, data, nproc: int, **sections):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", data, run_dir, **sections)
    torchrun(nproc, [str(TRAIN_SCRIPTS / "train_inspect.py"), "--config", str(cfg)])
    reports = [json.loads((run_dir / f"inspect_rank{r}.json").read_text()) for r in range(nproc)]
    return cfg, run_dir, reports


def assert_matches_reference(cfg, run_dir, world: int, tol: float = 1e-5):
    ref, _ = reference_run(cfg, world)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert math.isclose(got[step], ref[step]["total"], rel_tol=0, abs_tol=tol), (
            f"step {step}: expert-parallel loss {got[step]:.8f} vs single-process {ref[step]['total']:.8f}"
        )
    # The run must actually learn, or equality would be weak evidence.
    assert got[STEPS] < got[1] - 0.3


def assert_expert_partitioning(reports, world: int, ep: int):
    edp = world // ep
    for report in reports:
        rank = report["rank"]
        expected_edp_ranks = list(range(rank % ep, world, ep))  # DeepSpeed's EDP groups stride by ep
        experts = {n: p for n, p in report["params"].items() if p["expert"]}
        assert experts, "no parameter is tagged as an expert parameter"
        assert all(".experts.local." in n for n in experts)
        for name, p in report["params"].items():
            if p["expert"]:
                assert p["group_ranks"] == expected_edp_ranks, f"rank {rank} {name}: {p['group_ranks']}"
                assert p["partition_numel"] == math.ceil(p["full_numel"] / edp), name
            else:
                assert p["group_ranks"] == list(range(world)), f"rank {rank} {name}: {p['group_ranks']}"


def test_ep2_on_2_ranks_equals_single_process(prepared_data, tmp_path):
    cfg, run_dir, reports = run_inspected(tmp_path, prepared_data, 2, train={"steps": STEPS})
    assert_expert_partitioning(reports, world=2, ep=2)
    assert_matches_reference(cfg, run_dir, world=2)


@pytest.mark.slow
def test_ep2_on_4_ranks_with_expert_data_parallel_equals_single_process(prepared_data, tmp_path):
    cfg, run_dir, reports = run_inspected(tmp_path, prepared_data, 4, train={"steps": STEPS, "grad_accum_steps": 2})
    assert_expert_partitioning(reports, world=4, ep=2)
    assert_matches_reference(cfg, run_dir, world=4)


def test_activation_checkpointing_recomputes_and_matches(prepared_data, tmp_path):
    steps = 4
    plain_cfg, plain_dir, plain = run_inspected(tmp_path / "off", prepared_data, 2, train={"steps": steps})
    ckpt_cfg, ckpt_dir, ckpt = run_inspected(
        tmp_path / "on", prepared_data, 2, train={"steps": steps}, parallel={"activation_checkpointing": True}
    )
    assert losses(ckpt_dir) == losses(plain_dir)  # fp32: bit-identical
    # Each training forward runs every block once; checkpointing runs it again in backward.
    n_layer = 4
    eval_forwards = plain[0]["block_forward"] - steps * n_layer
    assert ckpt[0]["block_forward"] - eval_forwards == 2 * steps * n_layer
