"""Fixtures for trainer tests: a small real prepared corpus, and real multi-rank runs via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

SCRIPTS = Path(__file__).parent / "scripts"


def rank_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """~300k tokens of real Python source (stdlib json/email/asyncio), SentencePiece BPE 512."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    std = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(std / pkg / "*.py") for pkg in ("json", "email", "asyncio")]
    cmd = [sys.executable, "-m", "pipeline.prepare", "--input", *inputs, "--output", str(out),
           "--train-tokenizer", "bpe", "--vocab-size", "512", "--valid-fraction", "0.05", "--no-progress"]
    subprocess.run(cmd, check=True, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True)
    return out


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


def torchrun(nproc: int, args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Real ranks on CPU over gloo: `torchrun --standalone --nproc_per_node N ...`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(nproc: int, config: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    return torchrun(nproc, ["-m", "pipeline.train", "--config", str(config), *overrides], **kw)


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-log-interval training records (full precision) written by rank 0."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss/total" in r]


def losses(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir)}
