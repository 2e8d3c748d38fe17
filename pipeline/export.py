"""Export a training checkpoint to a Hugging Face folder (GPT-OSS presets) or a plain state dict.

    python -m pipeline.export --run-dir runs/debug --output exported/ [--step N]

Checkpoints store per-parameter fp32 weights with experts split per global expert id
(`pipeline/train/universal_ckpt.py`), so export is a single process that reads them back, whatever
world size, expert-parallel size or ZeRO stage wrote them: no ranks, no DeepSpeed engine (DeepSpeed's
`zero_to_fp32` cannot consolidate expert-parallel ZeRO-3 shards). Weights are written in the run's
precision (bf16 runs export the bf16 weights they computed with).

Output: for configs transformers' GptOss can represent, `config.json` + `model.safetensors` that
`GptOssForCausalLM.from_pretrained` loads; for the others (moe-124m, gpt2-dense) our own
`config.json` + `model.safetensors` that `load_exported()` reads back. Either one can start a new
run (`model.init_from: OUTPUT`). The data's tokenizer is copied to `OUTPUT/tokenizer/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from pipeline.config_utils import from_dict, to_dict
from pipeline.errors import ConfigError, DataError
from pipeline.model import GPTOSS, GPTOSSConfig
from pipeline.model.hf_convert import hf_incompatibilities

NATIVE_FORMAT = "gpt-oss-pipeline/native-state-dict"


def checkpoint_dir(run_dir: Path, step: int | None) -> Path:
    from pipeline.train.checkpoint import read_latest

    ckpt_root = run_dir / "checkpoints"
    tag = f"step_{step}" if step is not None else read_latest(ckpt_root)
    if tag is None or not (ckpt_root / tag / "trainer_state.json").is_file():
        raise ConfigError(f"{run_dir}: no complete checkpoint {'step_' + str(step) if step else '(latest)'} under "
                          f"{ckpt_root}; train first or pass --step with an existing step_N")
    return ckpt_root / tag


def model_config_from_saved(saved_model: dict) -> GPTOSSConfig:
    return from_dict(GPTOSSConfig, {k: v for k, v in saved_model.items() if k not in ("preset", "init_from")})


def model_from_state(model_cfg: GPTOSSConfig, state: dict) -> GPTOSS:
    """Our model holding a checkpoint's full state dict (`read_full_weights`)."""
    model = GPTOSS(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered state dict does not match the model: missing {missing}, unexpected {unexpected}")
    return model


def write_export(state: dict, model_cfg: GPTOSSConfig, output: Path, tokenizer_dir: Path | None) -> str:
    """Writes the folder atomically (tmp dir, then rename); returns the format written."""
    from safetensors.torch import save_file

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
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
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
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return fmt


def load_exported(directory: str | Path) -> GPTOSS:
    """Load either export format back into our model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != NATIVE_FORMAT:
        return GPTOSS.from_hf(directory)
    model = GPTOSS(from_dict(GPTOSSConfig, {k: v for k, v in config.items() if k != "format"}))
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    if unexpected or (missing and missing != ["lm_head.weight"]):
        raise ConfigError(f"{directory}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
    return model


def export(run_dir: str | Path, output: str | Path, step: int | None = None) -> Path:
    """Write `output` from the checkpoint (latest, or `step`) of `run_dir`; returns `output`."""
    from pipeline.train.trainer import data_sources
    from pipeline.train.universal_ckpt import read_full_weights

    run_dir, output = Path(run_dir), Path(output)
    ckpt = checkpoint_dir(run_dir, step)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    model_cfg = model_config_from_saved(saved["model"])
    dtype = torch.bfloat16 if saved.get("precision") == "bf16" else torch.float32
    state = read_full_weights(ckpt, dtype)
    data_dir = Path(data_sources(saved["data"]["train"])[0])
    fmt = write_export(state, model_cfg, output, data_dir / "tokenizer")
    print(f"exported {ckpt} -> {output} ({fmt})", flush=True)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="training run dir (holds checkpoints/)")
    parser.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.output, args.step)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
