"""Export a training checkpoint to a Hugging Face folder (GPT-OSS presets) or a plain state dict;
`python -m pipeline.export` is its command line.

Checkpoints store per-parameter fp32 weights with experts split per global expert id
(`format.py`), so export is a single process that reads them back, whatever world size,
expert-parallel size or ZeRO stage wrote them: no ranks, no DeepSpeed engine (DeepSpeed's
`zero_to_fp32` cannot consolidate expert-parallel ZeRO-3 shards). Weights are written in the run's
precision (bf16 runs export the bf16 weights they computed with).

Output: for configs transformers' GptOss can represent, `config.json` + `model.safetensors` that
`GptOssForCausalLM.from_pretrained` loads; for the others (moe-124m, gpt2-dense) our own
`config.json` + `model.safetensors` (the native format). `GPTOSS.from_hf` reads either back, and
either can start a new run (`model.init_from: OUTPUT`). The data's tokenizer is copied to
`OUTPUT/tokenizer/`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint.format import read_full_weights
from pipeline.checkpoint.tags import find_checkpoint, read_saved_config
from pipeline.config_utils import from_dict, to_dict
from pipeline.data import load_tokenizer
from pipeline.data.manifest import MANIFEST
from pipeline.data.megatron_sources import tokenizer_source
from pipeline.io_utils import atomic_path
from pipeline.model import GPTOSS, GPTOSSConfig
from pipeline.model.hf import NATIVE_FORMAT, hf_incompatibilities, model_holding


def model_config_from_saved(saved_model: dict) -> GPTOSSConfig:
    return from_dict(GPTOSSConfig, {k: v for k, v in saved_model.items() if k not in ("preset", "init_from")})


def model_from_state(model_cfg: GPTOSSConfig, state: dict) -> GPTOSS:
    """Our model (fp32) holding a checkpoint's full state dict (`read_full_weights`)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model, missing, unexpected = model_holding(GPTOSS, model_cfg, state)
    tied = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered state dict does not match the model: missing {missing}, unexpected {unexpected}")
    return model


def write_export(state: dict, model_cfg: GPTOSSConfig, output: Path, tokenizer_dir: Path | None) -> str:
    """Writes the folder atomically (tmp dir, then rename); returns the format written."""
    if model_cfg.load_balance_bias_rate > 0:
        # transformers' GptOss router has no selection-only bias, and it cannot be folded into the
        # router's Linear bias: that would also shift the softmax over the selected logits (the
        # combine weights). Dropping it keeps every weight exact and changes only which experts
        # are picked where the bias tipped the top-k; the model trained against the biased choice.
        print(f"warning: load_balance_bias_rate={model_cfg.load_balance_bias_rate}: the per-expert routing "
              "bias is not exported (transformers' GptOss has none); routing uses the unbiased router "
              "logits", file=sys.stderr, flush=True)
        model_cfg = model_cfg.replace(load_balance_bias_rate=0.0)
        state = {k: v for k, v in state.items() if not k.endswith(".router.expert_bias")}
    model = model_from_state(model_cfg, state)
    tied = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
    with atomic_path(output) as tmp:
        tmp.mkdir(parents=True)
        if not hf_incompatibilities(model_cfg):
            model.save_hf(tmp)
            fmt = "hf-gpt-oss"
        else:
            weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
            save_file(weights, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({"format": NATIVE_FORMAT, **to_dict(model_cfg)}, indent=2))
            fmt = "native"
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return fmt


def load_exported(directory: str | Path) -> GPTOSS:
    """Load either export format back into our model (the same reader as `GPTOSS.from_hf`)."""
    return GPTOSS.from_hf(directory)


def checkpoint_model(run_dir: Path, step: int | None = None) -> tuple[Path, dict, GPTOSSConfig, Path]:
    """(checkpoint dir, the run config saved with it, its model config, where its tokenizer is: the first
    data.train dir, or data.tokenizer for a run on Megatron prefixes) of `run_dir`'s checkpoint: the
    latest, or `step`."""
    ckpt = find_checkpoint(Path(run_dir) / "checkpoints", step)
    saved = read_saved_config(ckpt)
    data = saved["data"]
    return ckpt, saved, model_config_from_saved(saved["model"]), Path(tokenizer_source(data["train"],
                                                                                       data.get("tokenizer")))


def run_dtype(saved: dict) -> torch.dtype:
    """The precision the run computed in (its saved config's `precision`)."""
    return torch.bfloat16 if saved.get("precision") == "bf16" else torch.float32


def export(run_dir: str | Path, output: str | Path, step: int | None = None) -> Path:
    """Write `output` from the checkpoint (latest, or `step`) of `run_dir`; returns `output`."""
    ckpt, saved, model_cfg, data_dir = checkpoint_model(Path(run_dir), step)
    output = Path(output)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = data_dir / "tokenizer"
        if not (data_dir / MANIFEST).is_file() and data_dir.exists():  # data.tokenizer: saved as prepare saves it
            tokenizer_dir = Path(scratch) / "tokenizer"
            load_tokenizer(data_dir).save(tokenizer_dir)
        fmt = write_export(read_full_weights(ckpt, run_dtype(saved)), model_cfg, output, tokenizer_dir)
    print(f"exported {ckpt} -> {output} ({fmt})", flush=True)
    return output
