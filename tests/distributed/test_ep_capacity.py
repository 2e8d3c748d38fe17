"""Expert parallelism with a capacity factor: dropped slots stay as padding rows on the sending rank
(static shapes, no host sync in the MoE layer) and the losses still equal a single-process run."""

from __future__ import annotations

from tests.distributed.test_expert_parallel import STEPS, assert_matches_reference, run_inspected


def test_ep2_with_capacity_drop_equals_single_process(prepared_data, tmp_path):
    # capacity 0.5 x (tokens x top_k / experts): about half the slots are dropped every step.
    cfg, run_dir, reports = run_inspected(
        tmp_path, prepared_data, 2, train={"steps": STEPS}, model={"preset": "debug", "capacity_factor": 0.5}
    )
    assert_matches_reference(cfg, run_dir, world=2)
