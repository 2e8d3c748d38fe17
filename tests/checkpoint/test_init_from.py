"""`model.init_from`: a random tiny transformers GptOss folder whose experts are stored in MXFP4 starts a
2-rank ZeRO-3 + EP2 run whose first loss equals transformers' on the same batch; its export gives the
weights back; the dequantiser equals transformers' own; a folder of another model is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from pipeline.checkpoint.init_from import WeightsFolder
from pipeline.data import build_dataset
from pipeline.errors import ConfigError
from pipeline.model import GPTOSS, get_preset
from pipeline.model.hf import config_to_hf
from pipeline.model.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from pipeline.train.config import load_run_config, resolve_model_config
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env
from tests.runs import losses, train, write_run_config

EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")


def make_hf_folder(model_cfg, path: Path, mxfp4: bool) -> GptOssForCausalLM:
    """A random transformers GptOss folder in two safetensors files (+ index), experts optionally in
    MXFP4 as the released checkpoints store them. Returns the transformers model holding exactly
    the weights the folder stands for (MXFP4 experts dequantised by transformers' own code)."""
    torch.manual_seed(0)
    hf = GptOssForCausalLM(config_to_hf(model_cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():  # non-zero biases and sinks too
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if model_cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    if mxfp4:
        for key in [k for k in state if k.endswith(EXPERT_WEIGHTS)]:
            blocks, scales = quantize_mxfp4(state.pop(key))
            state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
            hf.get_parameter(key).data.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    path.mkdir(parents=True)
    hf.config.save_pretrained(path)
    if mxfp4:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
        (path / "config.json").write_text(json.dumps(config))
    keys = sorted(state)
    files = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in files.items():
        save_file({k: state[k] for k in part}, str(path / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in files.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf


def test_mxfp4_dequantisation_equals_transformers():
    torch.manual_seed(0)
    w_EIO = torch.randn(3, 64, 48) * torch.logspace(-3, 1, 48)  # columns of very different magnitude
    blocks, scales = quantize_mxfp4(w_EIO)
    assert blocks.shape == (3, 48, 2, 16) and scales.shape == (3, 48, 2) and blocks.dtype == torch.uint8
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    torch.testing.assert_close(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_mxfp4(blocks[1:2], scales[1:2]), ours[1:2], rtol=0, atol=0)  # a slice
    assert torch.equal(quantize_mxfp4(ours)[0], blocks)  # representable values quantise to themselves
    assert ((ours - w_EIO).abs() <= w_EIO.abs().amax(1, keepdim=True) / 4 + 1e-12).all()  # within half an FP4 step


@pytest.mark.parametrize("mxfp4", [False, True])
def test_folder_reads_expert_slices_and_checks_the_config(tmp_path, mxfp4):
    model_cfg = get_preset("debug")
    hf = make_hf_folder(model_cfg, tmp_path / "hf", mxfp4)
    folder = WeightsFolder(tmp_path / "hf")
    folder.check_matches(model_cfg)
    full = hf.get_parameter("model.layers.1.mlp.experts.gate_up_proj").detach()
    torch.testing.assert_close(folder.read("blocks.1.ffn.experts.gate_up_proj", (2, 4)), full[2:4], rtol=0, atol=0)
    torch.testing.assert_close(folder.read("blocks.1.attn.sinks"), hf.get_parameter("model.layers.1.self_attn.sinks"))
    # The whole-model loader reads the same folders (MXFP4 included) in one process.
    ids = torch.randint(0, model_cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(GPTOSS.from_hf(tmp_path / "hf").eval()(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"has n_layer=4 but the run's model has 2; set model.n_layer to match"):
        folder.check_matches(model_cfg.replace(n_layer=2))
    with pytest.raises(ConfigError, match=r"has n_experts=4 but the run's model has 8"):
        folder.check_matches(model_cfg.replace(n_experts=8))


def test_init_from_mxfp4_folder_matches_transformers_and_exports_back(prepared_data, tmp_path):
    folder = tmp_path / "gpt-oss-tiny"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run",
                           model={"preset": "debug", "init_from": str(folder)},
                           optim={"lr": 1e-12, "min_lr": 1e-12, "warmup_steps": 0}, train={"steps": 1})
    run_cfg = load_run_config(cfg)
    hf = make_hf_folder(resolve_model_config(run_cfg), folder, mxfp4=True)
    proc = train(2, cfg)
    assert f"from {folder} (model.init_from)" in proc.stdout

    # transformers on the step's global batch: 2 ranks x 2 samples, the first 4 of the sample order.
    data = build_dataset(run_cfg.data.train, "train", run_cfg.data.seq_len, run_cfg.data.seed)
    batch = torch.stack([torch.as_tensor(data[i], dtype=torch.long) for i in range(4)])  # [4, T + 1]
    with torch.no_grad():
        logits = hf(input_ids=batch[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()
    got = losses(tmp_path / "run", "loss/lm")[1]
    assert math.isclose(got, expected, abs_tol=1e-5), (got, expected)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.export", "--run-dir", str(tmp_path / "run"), "--output", str(out)]
    subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    exported = load_file(str(out / "model.safetensors"))
    reference = hf.state_dict()
    assert set(exported) <= set(reference)
    for key, value in exported.items():  # one step at lr 1e-12 moves nothing visible
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)

    # Rerunning the command resumes from the checkpoint (finished: nothing to do); init_from is not applied.
    proc = train(2, cfg)
    assert f"model.init_from={folder} ignored: the run dir has a checkpoint" in proc.stdout
