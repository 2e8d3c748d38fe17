"""Long runs stay healthy: a NaN on one rank skips the step on every rank with weights and optimizer
state bit-identical, a persistent NaN or a diverging learning rate stops the run naming the last good
checkpoint, and no checkpoint is ever written from non-finite weights (real ranks, real DeepSpeed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.checkpoint.format import StateReader
from pipeline.checkpoint.manager import checkpoint_steps, read_latest
from pipeline.errors import ConfigError
from pipeline.train.config import load_run_config
from pipeline.train.ds_config import build_ds_config
from pipeline.train.health import SLOW_S, CollapseMonitor, FaultInjection, SpikeDetector
from tests.ranks import torchrun
from tests.runs import losses, train, write_run_config

SCRIPTS = Path(__file__).parent / "scripts"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def all_finite(obj) -> bool:
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def assert_checkpoint_finite(tag_dir: Path) -> None:
    """Every tensor of the checkpoint (fp32 weights, Adam moments, buffers) and every rank's RNG
    file is finite."""
    reader = StateReader(tag_dir)
    assert any(k.startswith("exp_avg_sq/") for k in reader.tensors), sorted(reader.tensors)[:10]
    for key in reader.tensors:
        assert all_finite(reader.get(key)), f"{tag_dir}: {key} holds non-finite values"
    for f in tag_dir.glob("*.pt"):
        assert all_finite(torch.load(f, map_location="cpu", weights_only=False)), f"{f} holds non-finite values"


def test_nan_on_one_rank_skips_the_step_everywhere_and_training_goes_on(prepared_data, tmp_path, monkeypatch):
    # Step 3: rank 1's loss is NaN (our all-reduced check). Step 5: rank 0's gradient is NaN with a
    # finite loss (DeepSpeed's gradient-norm check). Step 9: rank 1's loss is 1000x (the spike
    # detector, judging from 4 accepted steps). Each must leave every rank's state untouched. Steps 6-7:
    # rank 1 is a straggler (SLOW_S per micro-batch), which the straggler statistics name.
    monkeypatch.setenv("PIPELINE_INJECT_NAN", "loss:1:3,grad:0:5,spike:1:9,slow:1:6:7")
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir,
                           train={"steps": 10, "grad_accum_steps": 2, "spike_sigma": 6, "spike_window": 4})
    torchrun(2, [str(SCRIPTS / "train_health.py"), "--config", str(cfg)])
    bad = {3, 5, 9}
    for rank in range(2):
        report = json.loads((run_dir / f"health_rank{rank}.json").read_text())
        changed = {int(k): v for k, v in report["changed"].items()}
        assert changed == {s: s not in bad for s in range(1, 11)}, (rank, changed)
        adam = {int(k): v for k, v in report["adam_steps"].items()}
        applied = [sum(1 for t in range(1, s + 1) if t not in bad) for s in range(1, 11)]
        assert [adam[s] for s in range(1, 11)] == applied, (rank, adam)  # a skip counts no Adam step
    skips = {r["step"]: r for r in records(run_dir) if "skipped" in r}
    assert sorted(skips) == sorted(bad)
    assert skips[3]["skipped"] == "non-finite loss on rank(s) 1" and skips[3]["loss"] is None
    assert skips[5]["skipped"] == "non-finite gradient norm" and math.isfinite(skips[5]["loss"])
    assert skips[9]["skipped"] == "loss spike" and skips[9]["loss"] > 1000
    assert skips[9]["train/skipped_steps"] == 3
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 4, 6, 7, 8, 10] and all(math.isfinite(v) for v in got.values())
    assert got[10] < got[1]  # it kept learning
    stragglers = {r["step"]: r for r in records(run_dir) if "straggler/slowest_rank" in r}
    assert sorted(stragglers) == sorted(got)  # every log interval (here every applied step)
    for step in (6, 7):
        r = stragglers[step]
        assert r["straggler/slowest_rank"] == 1, r
        # Not the whole 2 x SLOW_S: the faster rank waits out part of it inside ZeRO-3's collectives.
        assert r["straggler/step_time_max"] - r["straggler/step_time_min"] > SLOW_S / 5, r
        assert 0 <= r["straggler/data_wait_min"] <= r["straggler/data_wait_max"] < SLOW_S, r
    assert read_latest(run_dir / "checkpoints") == "step_10"
    state = json.loads((run_dir / "checkpoints" / "step_10" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 3  # a resumed run continues the count
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    counted = {e.step: e.value for e in events.Scalars("train/skipped_steps")}
    assert counted[3] == 1 and counted[5] == 2 and counted[9] == 3 and counted[10] == 3
    assert {e.step: e.value for e in events.Scalars("straggler/slowest_rank")}[6] == 1


def test_persistent_nan_stops_with_the_last_good_checkpoint(prepared_data, tmp_path, monkeypatch):
    """In bf16, where DeepSpeed's own overflow check does not look at the loss."""
    monkeypatch.setenv("PIPELINE_INJECT_NAN", "loss:0:5:99")
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, precision="bf16",
                           train={"steps": 12, "save_interval": 2, "keep_last": 2, "max_bad_steps": 3})
    proc = train(2, cfg, check=False)
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*:\s*3", proc.stderr), proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: training stopped at step 7: 3 consecutive steps skipped (train.max_bad_steps=3; last: non-finite "
        f"loss on rank(s) 0); last good checkpoint: {ckpt / 'step_4'}. Lower optim.lr or raise "
        "optim.warmup_steps, then resume from that checkpoint"
    ]
    assert "Traceback" not in "\n".join(l for l in proc.stderr.splitlines() if l.startswith("[rank"))
    # The save due at step 6 fell on a skipped step: deferred, never written.
    assert read_latest(ckpt) == "step_4" and checkpoint_steps(ckpt) == [2, 4]
    for step in (2, 4):
        assert_checkpoint_finite(ckpt / f"step_{step}")


def test_diverging_learning_rate_stops_and_keeps_the_finite_checkpoint(prepared_data, tmp_path):
    """The issue's report (optim.lr=1e30): the first update blows the weights up to ~1e30, every later
    loss is NaN. Before, the run trained on and saved NaN checkpoints over the good ones. Here on
    ZeRO-2 in bf16, whose overflow check DeepSpeed runs only with bf16.check_grad_overflow."""
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, precision="bf16",
                           deepspeed_config="ds_configs/zero2.json", parallel={"expert_parallel_size": 1},
                           train={"steps": 5, "save_interval": 1, "keep_last": 1, "max_bad_steps": 2})
    proc = train(2, cfg, "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0", check=False)
    assert proc.returncode != 0
    assert "skipped step 2: non-finite loss on rank(s) 0, 1" in proc.stdout
    ckpt = run_dir / "checkpoints"
    assert (f"error: training stopped at step 3: 2 consecutive steps skipped (train.max_bad_steps=2; last: "
            f"non-finite loss on rank(s) 0, 1); last good checkpoint: {ckpt / 'step_1'}") in proc.stderr
    assert checkpoint_steps(ckpt) == [1] and read_latest(ckpt) == "step_1"
    assert_checkpoint_finite(ckpt / "step_1")


def test_deepspeed_json_that_would_apply_nan_steps_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}}))
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "data", tmp_path / "run", precision="bf16",
                           deepspeed_config=str(ds), parallel={"expert_parallel_size": 1})
    with pytest.raises(ConfigError, match="bf16.check_grad_overflow = False: non-finite steps could not be skipped"):
        build_ds_config(load_run_config(cfg), world_size=2, use_cuda=False)
    assert build_ds_config(load_run_config(cfg, ["deepspeed_config=ds_configs/zero2.json"]), world_size=2,
                           use_cuda=False)["bf16"]["check_grad_overflow"] is True


def test_spike_detector():
    detector = SpikeDetector(sigma=6.0, window=16)
    for i in range(7):
        detector.accept(3.0 + 0.01 * (i % 3))
    assert not detector.is_spike(100.0)  # too little history to judge
    detector.accept(3.0)
    assert not detector.is_spike(3.05)  # 5 sigma
    assert detector.is_spike(3.1)  # ~12 sigma above the mean
    for _ in range(16):
        detector.accept(5.0)  # the window slides: the new level is the norm
    assert not detector.is_spike(5.0)
    assert not SpikeDetector(sigma=0.0, window=4).is_spike(1e9)  # off


def test_collapse_warning_after_patience_and_again_after_recovery():
    monitor = CollapseMonitor(ratio=3.0, patience=2, n_layers=2)
    collapsed = torch.tensor([[100.0, 0, 0, 0], [25, 25, 25, 25]])  # layer 0: max/mean 4
    assert monitor.update(collapsed) == []
    [warning] = monitor.update(collapsed)
    assert warning.startswith("warning: MoE layer 0 routing is collapsing: max/mean expert load 4.00 > "
                              "train.collapse_warn_ratio=3.0 for 2 log intervals")
    assert monitor.update(collapsed) == []  # once per episode
    monitor.update(torch.full((2, 4), 25.0))
    assert monitor.update(collapsed) == [] and len(monitor.update(collapsed)) == 1
    assert CollapseMonitor(ratio=0.0, patience=1, n_layers=2).update(collapsed) == []


def test_fault_injection_switch_parses_and_rejects():
    fault = FaultInjection("loss:1:3,grad:1:5:6,loss:0:2,spike:1:7,slow:1:4:5", rank=1)
    assert [s for s in range(1, 8) if fault.active(s, "slow")] == [4, 5]
    assert [s for s in range(1, 8) if fault.active(s, "loss")] == [3]
    assert [s for s in range(1, 8) if fault.active(s, "spike")] == [7]
    assert [s for s in range(1, 8) if fault.active(s, "grad")] == [5, 6]
    assert not FaultInjection(None, rank=0).active(1, "loss")
    with pytest.raises(ValueError, match="PIPELINE_INJECT_NAN='nan:1'"):
        FaultInjection("nan:1", rank=0)
