"""W&B logging: an offline run holds what metrics.jsonl and TensorBoard hold, and a resumed training run
continues the same W&B run. Read back from W&B's own offline `.wandb` files (wandb.proto records)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.errors import ConfigError
from pipeline.train.config import WandbConfig, load_run_config
from pipeline.train.metrics import WANDB_ID_FILE, WANDB_STEP, MetricsLogger
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import read_metrics, train, write_run_config

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # pinned in requirements.txt

BLOCK = 32768  # the .wandb file is a LevelDB log: 32 KiB blocks of CRC'd records after a 7-byte header


def wandb_records(path: Path):
    """Every `Record` protobuf of an offline `.wandb` file, in the order the run wrote them."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def history_rows(path: Path) -> list[dict]:
    """Logged rows as {key: value}; histogram keys map to their {"values", "bins", ...} dict."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def offline_run(path: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline run directory."""
    (wandb_file,) = path.glob("run-*.wandb")
    run_id, config = None, {}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        if kind == "run":
            run_id = record.run.run_id
        for u in updates:
            config[u.key] = json.loads(u.value_json)
    return run_id, config, history_rows(wandb_file)


def test_wandb_offline_run_equals_metrics_and_tensorboard_and_resumes(prepared_data, tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data",
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, str(value))
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir,
                           train={"steps": 4, "log_interval": 2, "eval_interval": 4, "save_interval": 4},
                           wandb={"project": "gpt-oss-tests", "mode": "offline"})
    train(2, cfg)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    proc = train(2, cfg, "train.steps=8")  # resumes from step_4 and continues the same W&B run
    assert "resumed from" in proc.stdout
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # one per training process, both with the run dir's id
    ids, configs, rows = zip(*(offline_run(r) for r in runs), strict=True)
    assert ids == (run_id, run_id)
    # The W&B config is the resolved run config (config.yaml), including the updated train.steps.
    assert configs[0]["model"]["n_layer"] == 4 and configs[0]["model"]["preset"] == "debug"
    assert [c["train"]["steps"] for c in configs] == [4, 8]
    assert configs[1]["wandb"] == {"project": "gpt-oss-tests", "entity": None, "name": None, "mode": "offline"}

    # Every training record of metrics.jsonl, value for value, at the same trainer/step.
    logged = {}
    for row in (r for run_rows in rows for r in run_rows):
        logged.setdefault(row[WANDB_STEP], {}).update(row)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for record in records:
        row = logged[record["step"]]
        for key, value in record.items():
            if key == "moe/tokens_per_expert":
                for layer, counts in enumerate(value):
                    hist = row[f"moe/tokens_per_expert/layer_{layer}"]
                    assert hist["values"] == counts and hist["bins"] == [e - 0.5 for e in range(5)]
            elif key != "step":
                assert row[key] == value, (record["step"], key, row[key], value)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert logged[r["step"]]["eval/loss"] == r["eval/loss"]

    # The same scalar tags as TensorBoard, with the same values (TensorBoard stores float32).
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    wandb_scalars = {k for row in logged.values() for k, v in row.items() if isinstance(v, (int, float))}
    assert set(events.Tags()["scalars"]) == wandb_scalars - {WANDB_STEP} - {k for k in wandb_scalars if k[0] == "_"}
    for event in events.Scalars("loss/lm"):
        assert math.isclose(event.value, logged[event.step]["loss/lm"], rel_tol=1e-6)


def test_wandb_config_errors_and_lazy_import(prepared_data, tmp_path):
    """Without wandb importable, a `wandb` section is a one-line ConfigError at start-up (not when a saved
    config is read back); mode=disabled and runs without the section never import wandb (seconds)."""
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", wandb={"project": "p"})
    script = f"""
import sys
import pipeline.train.trainer
assert "wandb" not in sys.modules, "importing the trainer imported wandb"
sys.modules["wandb"] = None  # as if wandb were not installed: `import wandb` fails, find_spec is None
from pipeline.train.__main__ import main
from pipeline.train.config import load_run_config
assert load_run_config({str(cfg)!r}, ["wandb.mode=disabled"]).wandb.mode == "disabled"
# A finished run's saved config still reads (export does this on machines without wandb).
from pipeline.config_utils import from_dict
from pipeline.train.config import RunConfig
assert from_dict(RunConfig, {{"data": {{"train": ["d"]}}, "wandb": {{"project": "p"}}}}).wandb.project == "p"
sys.exit(main(["--config", {str(cfg)!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e .[wandb]" in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_wandb_section_is_validated(tmp_path, monkeypatch):
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "data", tmp_path / "run")
    assert load_run_config(cfg).wandb is None  # off when absent
    resolved = load_run_config(cfg, ["wandb.project=p", "wandb.entity=team"]).wandb
    assert (resolved.project, resolved.entity, resolved.name, resolved.mode) == ("p", "team", None, "online")
    with pytest.raises(ConfigError, match=r"wandb.project \(None\) must name a W&B project"):
        load_run_config(cfg, ["wandb.mode=offline"])
    with pytest.raises(ConfigError, match=r"wandb.mode \('shared'\) must be one of online, offline, disabled"):
        load_run_config(cfg, ["wandb.project=p", "wandb.mode=shared"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) wandb.team"):
        load_run_config(cfg, ["wandb.project=p", "wandb.team=x"])
    # Online without credentials: one ConfigError naming the ways out, not a wandb traceback.
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"HOME": tmp_path, "NETRC": tmp_path / "netrc", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(ConfigError, match=r"wandb.init failed \(.*\); run `wandb login` or set WANDB_API_KEY"):
        MetricsLogger(tmp_path / "online", True, False, 10, wandb=WandbConfig(project="p", mode="online"))
