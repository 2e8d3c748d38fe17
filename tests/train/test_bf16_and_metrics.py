"""bf16 training under ZeRO-3 + EP, and what users watch: TensorBoard events and the console."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.ranks import torchrun
from tests.runs import read_metrics, write_run_config

SCRIPTS = Path(__file__).parent / "scripts"

STEPS = 12


@pytest.fixture(scope="module")
def bf16_run(prepared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    cfg = write_run_config(
        tmp / "run.yaml", prepared_data, tmp / "run", precision="bf16",
        train={"steps": STEPS, "log_interval": 2, "eval_interval": 6},
        parallel={"activation_checkpointing": True},
    )
    proc = torchrun(2, [str(SCRIPTS / "train_inspect.py"), "--config", str(cfg)])
    return tmp / "run", proc.stdout


def test_bf16_trains_with_finite_falling_loss_and_fp32_master_weights(bf16_run):
    run_dir, _ = bf16_run
    records = read_metrics(run_dir)
    values = [r["loss/lm"] for r in records]
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.5, values
    report = json.loads((run_dir / "inspect_rank0.json").read_text())
    assert {p["dtype"] for p in report["params"].values()} == {"torch.bfloat16"}
    assert report["master_dtypes"] == ["torch.float32"]
    assert json.loads((run_dir / "ds_config.json").read_text())["bf16"]["enabled"] is True


def test_tensorboard_scalars_match_printed_losses(bf16_run):
    run_dir, stdout = bf16_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss/total", "loss/lm", "loss/aux", "moe/load_balance_loss", "moe/z_loss", "optim/lr",
                "optim/grad_norm", "perf/tokens_per_s", "perf/model_tflops_per_rank", "memory/host_rss_gib",
                "moe/imbalance_max_over_mean/worst_layer", "eval/loss", "eval/perplexity", "time/data_wait"):
        assert tag in tags, f"{tag} missing from TensorBoard (has {sorted(tags)})"
    tb_lm = {e.step: e.value for e in events.Scalars("loss/lm")}
    printed = {int(m[1]): float(m[2]) for m in re.finditer(r"step\s+(\d+)/\d+ \| loss (\S+)", stdout)}
    assert sorted(printed) == list(range(2, STEPS + 1, 2))
    assert sorted(tb_lm) == sorted(printed)
    for step, value in printed.items():
        assert round(tb_lm[step], 4) == value
    # Tokens per expert: one histogram per layer, buckets = experts, counts = every routed slot of
    # the interval on all ranks (2 steps x 2 ranks x 2 x 32 tokens x top-2).
    records = {r["step"]: r for r in read_metrics(run_dir)}
    histograms = events.Tags()["histograms"]
    assert sorted(histograms) == [f"moe/tokens_per_expert/layer_{i}" for i in range(4)]
    for layer in range(4):
        for event in events.Histograms(f"moe/tokens_per_expert/layer_{layer}"):
            counts = records[event.step]["moe/tokens_per_expert"][layer]
            assert list(event.histogram_value.bucket) == counts
            assert sum(counts) == 2 * 2 * 2 * 32 * 2
    printed_eval = re.findall(r"eval\s+step\s+(\d+) \| loss (\S+) \| ppl (\S+)", stdout)
    assert [int(s) for s, _, _ in printed_eval] == [6, 12]
    tb_eval = {e.step: e.value for e in events.Scalars("eval/perplexity")}
    for step, loss, ppl in printed_eval:
        assert math.isclose(tb_eval[int(step)], math.exp(float(loss)), rel_tol=1e-3)
        assert round(tb_eval[int(step)], 2) == float(ppl)
