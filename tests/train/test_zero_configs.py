"""The other shipped DeepSpeed configs train the same model as the single-process reference."""

from __future__ import annotations

import math

from tests.runs import losses, train, write_run_config
from tests.train.reference import reference_run


def assert_equal_to_reference(cfg, run_dir, steps: int) -> None:
    ref, _ = reference_run(cfg, world=2)
    got = losses(run_dir)
    for step in range(1, steps + 1):
        assert math.isclose(got[step], ref[step]["total"], abs_tol=1e-5), (step, got[step], ref[step]["total"])


def test_zero2_without_expert_parallelism(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run",
                           deepspeed_config="ds_configs/zero2.json", parallel={"expert_parallel_size": 1},
                           train={"steps": 6})
    train(2, cfg)
    assert_equal_to_reference(cfg, tmp_path / "run", 6)


def test_zero3_cpu_offload_with_expert_parallelism(prepared_data, tmp_path):
    # DeepSpeedCPUAdam is JIT-built on first use (~50 s, once per TORCH_EXTENSIONS_DIR).
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run",
                           deepspeed_config="ds_configs/zero3_offload.json", train={"steps": 6})
    train(2, cfg, timeout=600)
    assert_equal_to_reference(cfg, tmp_path / "run", 6)
