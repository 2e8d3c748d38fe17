"""Trainer runs for tests: a small run config of the debug preset, `python -m pipeline.train` on real
ranks, and what a run wrote to metrics.jsonl. (The prepared corpus they train on is the
`prepared_data` fixture of tests/conftest.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.ranks import torchrun


def write_run_config(path: Path, data: Path, run_dir: Path, **sections) -> Path:
    """A small fp32 run of the debug preset; `sections` override whole keys, e.g. train={...}."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"preset": "debug"},
        "data": {"train": [str(data)], "seq_len": 32},
        "optim": {"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 2},
        "train": {"steps": 10, "micro_batch_size": 2, "log_interval": 1, "eval_interval": 0, "eval_iters": 2,
                  "save_interval": 0, "seed": 7},
        "parallel": {"expert_parallel_size": 2, "activation_checkpointing": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(nproc: int, config: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return torchrun(nproc, ["-m", "pipeline.train", "--config", str(config), *overrides], **kw)


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-log-interval training records (full precision) written by rank 0."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss/total" in r]


def losses(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir)}
