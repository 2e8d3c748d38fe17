"""`python -m pipeline.export` turns ZeRO-3 checkpoints (expert-parallel ones included, where
DeepSpeed's zero_to_fp32 fails) into models whose logits equal the single-process reference."""

from __future__ import annotations

import subprocess
import sys

import torch
from transformers import GptOssForCausalLM

from pipeline.checkpoint.hf_export import load_exported
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import train, write_run_config
from tests.train.reference import reference_run

STEPS = 6


def export(run_dir, out) -> None:
    # Launched alone: the exporter starts as many CPU ranks as wrote the checkpoint.
    cmd = [sys.executable, "-m", "pipeline.export", "--run-dir", str(run_dir), "--output", str(out)]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_expert_parallel_checkpoint_exports_to_transformers(prepared_data, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", train={"steps": STEPS})
    train(2, cfg)
    export(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer" / "tokenizer.model").is_file()

    _, reference = reference_run(cfg, world=2)
    hf = GptOssForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reference.eval()(ids)[0]
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_dense_model_exports_plain_state_dict(prepared_data, tmp_path):
    model = {"preset": "gpt2-dense", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", model=model,
                           parallel={"expert_parallel_size": 1}, train={"steps": STEPS})
    train(2, cfg)
    export(tmp_path / "run", tmp_path / "out")
    exported = load_exported(tmp_path / "out").eval()
    _, reference = reference_run(cfg, world=2)
    ids = torch.randint(0, reference.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids)[0], reference.eval()(ids)[0], rtol=1e-4, atol=1e-4)
