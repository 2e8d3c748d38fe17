"""A checkpoint written before the O(shards) loader (its data identity records no sample order) is
not resumed in the new order silently: one line naming train.allow_data_change, which lets it go on.
Also: time/data_wait is logged per step (metrics.jsonl) by the read-ahead iterator."""

from __future__ import annotations

import json

from pipeline.data.dataset import ORDER_SCHEME
from tests.train.conftest import read_metrics, write_run_config
from tests.train.test_run_safety import errors, run_single


def test_resume_of_a_checkpoint_from_the_old_order_is_refused_unless_allowed(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 1, "log_interval": 1})
    first = run_single(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    [record] = [r for r in read_metrics(run_dir) if "loss/lm" in r]
    assert record["time/data_wait"] >= 0  # seconds this step waited for its micro-batches

    state_file = run_dir / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["order"] == ORDER_SCHEME
    del state["data"]["order"]  # exactly what the loader before issue 24 wrote
    state_file.write_text(json.dumps(state, indent=2))

    proc = run_single(cfg, "train.steps=2")
    assert proc.returncode == 2
    [line] = errors(proc)
    assert line == (f"error: {run_dir / 'checkpoints' / 'step_1'} was trained on other data: its samples were drawn "
                    "in another order (per-document permutation arrays (before the O(shards) loader); now "
                    f"{ORDER_SCHEME}): the same data would be read in a different sequence from here on; resume with "
                    "the data it was trained on, or set train.allow_data_change=true to continue on this data")

    proc = run_single(cfg, "train.steps=2", "train.allow_data_change=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.allow_data_change=true: continuing" in proc.stdout and "another order" in proc.stdout
