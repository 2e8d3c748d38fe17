"""Export a training checkpoint to a Hugging Face folder (GPT-OSS presets) or a plain state dict.

    python -m pipeline.export --run-dir runs/debug --output exported/ [--step N]

DeepSpeed's `zero_to_fp32` cannot consolidate expert-parallel ZeRO-3 checkpoints (experts are
partitioned over the expert-data-parallel group, not over all ranks). So this exports *online*:
it rebuilds the exact engine the run trained with (saved config.yaml + ds_config.json), loads the
checkpoint, gathers every ZeRO-3 partition and all-gathers expert slices over the expert-parallel
group. A checkpoint written by W ranks is loaded by W ranks: launched alone on a machine without a
launcher, this command starts W local CPU processes itself (gloo); under torchrun/deepspeed with W
ranks it uses those.

Output: for configs transformers' GptOss can represent, `config.json` + `model.safetensors` that
`GptOssForCausalLM.from_pretrained` loads; for the others (moe-124m, gpt2-dense) our own
`config.json` + `model.safetensors` that `load_exported()` reads back. The data's tokenizer is
copied to `OUTPUT/tokenizer/` either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from pipeline.config_utils import from_dict, to_dict
from pipeline.errors import ConfigError
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
    return from_dict(GPTOSSConfig, {k: v for k, v in saved_model.items() if k != "preset"})


def gather_state_dict(engine, ep_size: int) -> dict[str, torch.Tensor]:
    """Full fp32/bf16 state dict on rank 0 (empty on other ranks); every rank must call it."""
    import deepspeed

    from pipeline.train.expert_parallel import create_expert_groups, is_expert_parameter

    ep_group = create_expert_groups(ep_size).ep_group if ep_size > 1 else None
    rank = dist.get_rank()
    state = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = p.detach().clone()  # on the parameter's device: NCCL gathers GPU tensors only
        if ep_group is not None and is_expert_parameter(p):
            # This rank's [n_local, ...] slice; EP rank r holds experts [r*n_local, (r+1)*n_local).
            parts = [torch.empty_like(full) for _ in range(ep_size)]
            dist.all_gather(parts, full, group=ep_group)
            full = torch.cat(parts, dim=0)
            name = name.replace(".experts.local.", ".experts.")
        if rank == 0:
            state[name] = full.cpu()
    return state


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
    model = GPTOSS(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model_cfg.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered state dict does not match the model: missing {missing}, unexpected {unexpected}")
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


def export_rank(run_dir: Path, output: Path, step: int | None) -> None:
    """Body run on every rank."""
    from pipeline.train.config import RunConfig
    from pipeline.train.engine import build_engine, init_distributed
    from pipeline.train.trainer import data_sources

    ckpt = checkpoint_dir(run_dir, step)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    ds_config = json.loads((ckpt / "ds_config.json").read_text())
    model_cfg = model_config_from_saved(saved["model"])
    cfg = from_dict(RunConfig, saved)
    rank, world = init_distributed()
    written_by = json.loads((ckpt / "trainer_state.json").read_text())["world_size"]
    if world != written_by:
        raise ConfigError(f"{ckpt} was written by {written_by} ranks; export it with {written_by} ranks")
    engine = build_engine(cfg, model_cfg, ds_config, world)
    # With load_optimizer_states=False DeepSpeed consolidates through zero_to_fp32, which fails on EP
    # checkpoints; the full load restores the fp32 partitions the parameters are copied from.
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt}")
    state = gather_state_dict(engine, cfg.parallel.expert_parallel_size)
    if rank == 0:
        data_dir = Path(data_sources(saved["data"]["train"])[0])
        fmt = write_export(state, model_cfg, output, data_dir / "tokenizer")
        print(f"exported {ckpt} -> {output} ({fmt})", flush=True)
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank: int, world: int, port: int, run_dir: Path, output: Path, step: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    export_rank(run_dir, output, step)


def export(run_dir: str | Path, output: str | Path, step: int | None = None) -> Path:
    """Export from a plain process: spawns as many local CPU ranks as wrote the checkpoint."""
    run_dir, output = Path(run_dir), Path(output)
    ckpt = checkpoint_dir(run_dir, step)
    world = json.loads((ckpt / "trainer_state.json").read_text())["world_size"]
    if "WORLD_SIZE" in os.environ:  # already under a launcher
        export_rank(run_dir, output, step)
    else:
        torch.multiprocessing.start_processes(
            _spawned_rank, args=(world, _free_port(), run_dir, output, step), nprocs=world, start_method="spawn"
        )
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
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
