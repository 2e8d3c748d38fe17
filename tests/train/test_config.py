"""Start-up checks: every inconsistent run config / DeepSpeed JSON is refused with the fix named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.distributed.expert_parallel import check_expert_parallel_size
from pipeline.errors import ConfigError
from pipeline.train.config import load_run_config
from pipeline.train.ds_config import build_ds_config
from pipeline.train.optim import lr_at
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import write_run_config


@pytest.fixture
def run_cfg(tmp_path):
    def make(*overrides, ds: dict | None = None):
        if ds is not None:
            (tmp_path / "ds.json").write_text(json.dumps(ds))
            overrides = (*overrides, f"deepspeed_config={tmp_path / 'ds.json'}")
        path = write_run_config(tmp_path / "run.yaml", tmp_path / "data", tmp_path / "run")
        return load_run_config(path, list(overrides))

    return make


def test_shipped_configs_resolve(run_cfg):
    for name, ep in (("zero3", 2), ("zero3_offload", 2), ("zero2", 1)):
        ds = build_ds_config(run_cfg(f"deepspeed_config=ds_configs/{name}.json",
                                     f"parallel.expert_parallel_size={ep}"), world_size=4, use_cuda=False)
        assert ds["train_batch_size"] == 2 * 1 * 4
        assert ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 8},
     "train_micro_batch_size_per_gpu = 8 but the run config gives 2 (train.micro_batch_size)"),
    ({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4},
     "gradient_accumulation_steps = 4 but the run config gives 1"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
     "bf16.enabled = True but the run config says precision=fp32"),
    ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "remove the `optimizer` section"),
    ({"zero_optimization": {"stage": 2}}, "expert parallelism (parallel.expert_parallel_size=2) needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage = 1; supported: (2, 3)"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param is not supported"),
])
def test_inconsistent_deepspeed_json_is_refused(run_cfg, ds, message):
    with pytest.raises(ConfigError) as err:
        build_ds_config(run_cfg(ds=ds), world_size=2, use_cuda=False)
    assert message in str(err.value)


def test_run_config_errors_name_the_key(run_cfg):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.stpes"):
        run_cfg("train.stpes=3")
    with pytest.raises(ConfigError, match=r"precision \('fp16'\) must be fp32 or bf16"):
        run_cfg("precision=fp16")
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(0\) must be >= 1"):
        run_cfg("train.micro_batch_size=0")
    with pytest.raises(ConfigError, match="optim.implementation=fused needs a CUDA GPU"):
        build_ds_config(run_cfg("optim.implementation=fused"), world_size=2, use_cuda=False)


def test_expert_parallel_size_checks():
    with pytest.raises(ConfigError, match=r"world size \(6\) must be divisible by parallel.expert_parallel_size \(4\)"):
        check_expert_parallel_size(4, 6, 8)
    with pytest.raises(ConfigError, match=r"model.n_experts \(6\) must be divisible by parallel.expert_parallel_size"):
        check_expert_parallel_size(4, 8, 6)


def test_lr_schedule_warmup_then_cosine_to_floor(run_cfg):
    optim = run_cfg("optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1").optim
    assert lr_at(0, optim, 110) == pytest.approx(0.1)
    assert lr_at(9, optim, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, 110) == pytest.approx(0.55)
    assert lr_at(110, optim, 110) == pytest.approx(0.1)
    assert lr_at(500, optim, 110) == pytest.approx(0.1)


def test_cli_reports_config_errors_without_traceback(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg), "parallel.expert_parallel_size=3"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: world size (1) must be divisible by parallel.expert_parallel_size (3)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd[:-1], "model.vocab_size=100"], env=rank_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "vocab" in proc.stderr and "Traceback" not in proc.stderr
