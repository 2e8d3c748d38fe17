"""Test-wide settings.

DeepSpeed JIT-compiles its CPU ops (shared-memory comm, CPU Adam) on first use, which takes
~35-50 s each. Every test process, including the ranks tests spawn, inherits one extensions
directory so the ops are built once per machine / CI run, not once per test.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
# Keep rank processes from oversubscribing the 2 cores with intra-op threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """~300k tokens of real Python source (stdlib json/email/asyncio), SentencePiece BPE 512."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    std = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(std / pkg / "*.py") for pkg in ("json", "email", "asyncio")]
    cmd = [sys.executable, "-m", "pipeline.prepare", "--input", *inputs, "--output", str(out),
           "--train-tokenizer", "bpe", "--vocab-size", "512", "--valid-fraction", "0.05", "--no-progress"]
    subprocess.run(cmd, check=True, env=_rank_env(), cwd=REPO_ROOT, capture_output=True, text=True)
    return out


def _rank_env() -> dict[str, str]:
    from tests.ranks import rank_env  # tests.ranks imports REPO_ROOT from here

    return rank_env()
