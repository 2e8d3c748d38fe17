"""A checkpoint written before the O(shards) loader (its data identity records no sample order) is
not silently re-ordered: the run goes on in the legacy order and records it in its next checkpoint
(tests/checkpoint/test_pre_refactor_resume.py checks that such a resume is exact). A resume with
another data.seq_len (the sample map the saved position counts in) is refused in one line; a
checkpoint that records none is not. Also:
time/data_wait is logged per step (metrics.jsonl) by the read-ahead iterator."""

from __future__ import annotations

import json

from pipeline.data.dataset import ORDER_SCHEME
from pipeline.data.legacy_order import LEGACY_ORDER
from tests.runs import read_metrics, write_run_config
from tests.train.test_run_safety import errors, run_single


def test_a_checkpoint_from_the_old_loader_resumes_in_its_order(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 1, "log_interval": 1})
    first = run_single(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    [record] = read_metrics(run_dir)
    assert record["time/data_wait"] >= 0  # seconds this step waited for its micro-batches

    state_file = run_dir / "checkpoints" / "step_1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["order"] == ORDER_SCHEME
    assert (state["data"]["seq_len"], state["data"]["seed"]) == (32, 1234)
    for key in ("order", "seq_len", "seed"):  # exactly what the loader before the O(shards) one wrote
        del state["data"][key]
    state_file.write_text(json.dumps(state, indent=2))

    proc = run_single(cfg, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"{run_dir / 'checkpoints' / 'step_1'} was started in the sample order {LEGACY_ORDER}: resuming in it"
            in proc.stdout)
    saved = json.loads((run_dir / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert saved["data"]["order"] == LEGACY_ORDER  # and so on at every later resume

    # The saved position counts samples of seq_len 32: another seq_len is refused, naming the setting.
    proc = run_single(cfg, "train.steps=3", "data.seq_len=16")
    assert proc.returncode == 2
    assert errors(proc) == [
        f"error: {run_dir / 'checkpoints' / 'step_2'} was trained on other data: data.seq_len was 32, now 16 (the "
        "saved sample position counts samples of the map built with data.seq_len=32: in another map, samples "
        "would repeat or be skipped); resume with the data it was trained on, or set train.allow_data_change=true "
        "to continue on this data"]
