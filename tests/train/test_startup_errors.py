"""Start-up errors through the real entry point: one line per node (no traceback from any rank),
exit code 2, no rank left waiting in a collective; under plain python, torchrun and deepspeed."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import train, write_run_config
from tests.train.test_launch import free_port


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_no_rank_traceback(text: str) -> None:
    # torchrun / deepspeed print their own summary of a failed child; our ranks print none.
    assert not [line for line in text.splitlines() if re.match(r"\[rank\d+\]", line)], text[-3000:]
    assert "pipeline/" not in text, text[-3000:]


def test_plain_python(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg), "optim.lr=3e-4", "train.steps=abc"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: config key train.steps = 'abc' is not a valid int"]
    assert "Traceback" not in proc.stderr


def test_torchrun_two_ranks(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run")
    proc = train(2, cfg, "model.n_experts=three", check=False, timeout=120)
    assert proc.returncode != 0  # torchrun's own exit code is 1 whenever a rank fails
    assert error_lines(proc.stderr) == ["error: config key model.n_experts = 'three' is not a valid int"]
    assert len(re.findall(r"exitcode\s*:\s*2 ", proc.stderr)) >= 1, proc.stderr[-3000:]
    assert_no_rank_traceback(proc.stderr)


def test_deepspeed_launcher_error_after_distributed_init(prepared_data, tmp_path):
    """Raised on every rank after the process group exists: each rank exits on its own."""
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pipeline.train",
           "--config", str(cfg), "data.seq_len=500"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        "error: data.seq_len (500) exceeds model.block_size (128); lower data.seq_len or set model.block_size=500"
    ]
    assert_no_rank_traceback(proc.stderr)


def test_flex_attention_training_on_cpu_is_refused_at_start(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run")
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg), "model.attention_backend=flex",
           "parallel.expert_parallel_size=1"]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert "model.attention_backend='flex' cannot train on CPU" in line and "model.attention_backend=auto" in line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built or written
    assert "Traceback" not in proc.stderr
