"""`model.init_from`: start a run from a transformers GPT-OSS folder (bf16 or the released MXFP4)
or from an export of ours, each rank reading only what it holds.

    model: {preset: gpt-oss-20b, init_from: /models/gpt-oss-20b}

Every rank opens the folder's safetensors lazily and reads, one tensor at a time, the non-expert
tensors and the rows of each expert tensor that belong to its expert-parallel slice
(`get_slice(...)[first:last]`); MXFP4 experts (`*_blocks` + `*_scales`) are dequantised slice by
slice to fp32 and cast to the run precision when written into the engine. Starting gpt-oss-120b
therefore never puts a layer's 128 experts in any rank's memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.checkpoint.format import entries
from pipeline.checkpoint.zero_state import set_full_state
from pipeline.errors import CheckpointError, ConfigError
from pipeline.model import GPTOSSConfig
from pipeline.model.config import architecture, differing_fields
from pipeline.model.hf import key_to_hf, read_folder_config
from pipeline.model.mxfp4 import dequantize_mxfp4


class WeightsFolder:
    """A folder of weights to start from: its model config and lazy per-tensor reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.config, self.native = read_folder_config(self.path)
        except ConfigError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        self.key_file = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return {k: self.path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"model.init_from: {self.path} holds no model.safetensors or "
                                  "model.safetensors.index.json; download or export the weights there")
        with self._open(single) as f:
            return dict.fromkeys(f.keys(), single)

    def _open(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"model.init_from: weights file {path} is missing; download it again")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:
            raise CheckpointError(f"model.init_from: weights file {path} is unreadable ({e}); "
                                  "it is truncated or corrupt: download it again") from None

    def check_matches(self, model_cfg: GPTOSSConfig) -> None:
        """ConfigError naming the first architecture field where the run's model differs."""
        diff = differing_fields(architecture(self.config), architecture(model_cfg))
        if diff:
            name = diff[0]
            key = {"kv_heads": "n_kv_head", "head_size": "head_dim", "expert_hidden": "intermediate_size",
                   "resolved_layer_types": "layer_types", "num_moe_layers": "moe_layers"}.get(name, name)
            theirs, ours = getattr(self.config, name), getattr(model_cfg, name)
            raise ConfigError(f"model.init_from: {self.path} has {name}={theirs!r} but the run's model has "
                              f"{ours!r}; set model.{key} to match, or use another preset")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Our parameter `name` (plain-model naming), or only rows [first, last) of an expert tensor."""
        key = name if self.native else key_to_hf(name)
        if key in self.key_file:
            with self._open(self.key_file[key]) as f:
                sl = f.get_slice(key)
                return sl[rows[0]:rows[1]] if rows else sl[:]
        if f"{key}_blocks" in self.key_file:  # MXFP4: dequantise only the requested experts
            with self._open(self.key_file[f"{key}_blocks"]) as fb, self._open(self.key_file[f"{key}_scales"]) as fs:
                b, s = fb.get_slice(f"{key}_blocks"), fs.get_slice(f"{key}_scales")
                blocks, scales = (b[rows[0]:rows[1]], s[rows[0]:rows[1]]) if rows else (b[:], s[:])
            return dequantize_mxfp4(blocks, scales, torch.float32)
        raise CheckpointError(f"model.init_from: {self.path} has no tensor {key!r} for parameter {name}; "
                              "the folder is not a complete GPT-OSS checkpoint")


def load_initial_weights(engine, folder: WeightsFolder) -> int:
    """Write the folder's weights into the engine (fp32 master and working copy); returns tensors set."""
    count = 0
    for e in entries(engine.module):
        shape = tuple(getattr(e.param, "ds_shape", e.param.shape))
        rows = None if e.expert_offset is None else (e.expert_offset, e.expert_offset + e.n_local)
        value = folder.read(e.name, rows).float()
        if tuple(value.shape) != shape:
            raise CheckpointError(f"model.init_from: {folder.path}: {e.name} has shape {tuple(value.shape)}, "
                                  f"the model's is {shape}")
        set_full_state(e.param, value, None)
        count += 1
    return count
