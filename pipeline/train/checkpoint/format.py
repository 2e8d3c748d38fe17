"""The reshardable checkpoint format: per-parameter fp32 weights and Adam moments, experts split per
*global* expert id, so a checkpoint written by any number of ranks, any expert-parallel size and
either ZeRO stage is read back by any other. (Not DeepSpeed's "universal checkpoint": ours is written
directly by every rank during training, with no conversion step.)

Layout inside `step_N/`::

    state-r00003-000.safetensors    tensors owned by rank 3 (more files if one would pass 2 GiB)
    index.json                      tensor key -> file, file -> byte size, and the writing shape

Keys: `weight/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>` for every parameter and
`buffer/<name>` for every persistent buffer, where `<name>` is the parameter's name in the plain
(non-expert-parallel) model; an expert tensor `[E, ...]` is stored as E tensors `<name>[e]`.

Writing: parameters are gathered one at a time (a collective over the parameter's ZeRO partition
group); the full tensor is kept only by its owner, so the work and the disk writes are spread:
non-expert tensors round-robin over all ranks, each expert slice by one rank of the expert-data-
parallel group that holds it. Reading: every rank opens only the keys it holds (non-expert tensors
and its own experts) and writes its partition. No rank ever holds more than one full tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.io_utils import atomic_path, atomic_write_text
from pipeline.model.moe import GroupedExperts
from pipeline.train.checkpoint.zero_state import OPTIM_KEYS, ensure_optimizer_state, get_full_state, set_full_state

FORMAT = "gpt-oss-pipeline/reshardable-v1"
# The same format under the name checkpoints were written with before it was renamed.
READABLE_FORMATS = (FORMAT, "gpt-oss-pipeline/universal-v1")
INDEX = "index.json"
FILE_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True)
class Entry:
    """One parameter of this rank's module, named as in the plain model."""

    name: str
    param: nn.Parameter
    expert_offset: int | None  # global id of the first local expert; None for non-expert tensors
    group: dist.ProcessGroup | None  # ranks that gather this tensor (its ZeRO partition group)

    @property
    def n_local(self) -> int:
        return tuple(getattr(self.param, "ds_shape", self.param.shape))[0]

    def keys(self, prefix: str) -> list[str]:
        if self.expert_offset is None:
            return [f"{prefix}/{self.name}"]
        return [f"{prefix}/{self.name}[{self.expert_offset + i}]" for i in range(self.n_local)]


def canonical_name(name: str) -> str:
    return name.replace(".experts.local.", ".experts.")


def entries(module: nn.Module) -> list[Entry]:
    """Every parameter in `named_parameters` order (the same on every rank)."""
    expert_modules = {id(m): m for m in module.modules() if isinstance(m, GroupedExperts)}
    owner_of = {}
    for m in expert_modules.values():
        for p in m.parameters(recurse=False):
            owner_of[id(p)] = m
    out = []
    for name, p in module.named_parameters():
        m = owner_of.get(id(p))
        out.append(Entry(canonical_name(name), p, None if m is None else m.expert_offset,
                         getattr(p, "ds_process_group", None)))
    return out


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is None or name in mod._non_persistent_buffers_set:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if ".experts.local." in full:
                raise NotImplementedError(f"buffer {full} lives in an expert-parallel slice; not supported yet")
            out[full] = buf
    return out


class _ShardWriter:
    """Collects owned tensors and writes them as safetensors files (tmp name, then rename)."""

    def __init__(self, tag_dir: Path, rank: int):
        self.tag_dir, self.rank = tag_dir, rank
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, list[str]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= FILE_LIMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"state-r{self.rank:05d}-{len(self.files):03d}.safetensors"
        with atomic_path(self.tag_dir / name) as tmp:
            save_file(self.pending, str(tmp))
            # safetensors creates 0600, so others in the project could not read it: give the file the
            # permissions a plain file gets in this directory (its own, less the execute bits). Reading
            # the umask would need os.umask, which changes process-wide state.
            os.chmod(tmp, self.tag_dir.stat().st_mode & 0o666)
        self.files[name] = list(self.pending)
        self.pending, self.pending_bytes = {}, 0


def save_state(module: nn.Module, tag_dir: Path) -> None:
    """Every rank calls this (collective); rank 0 writes index.json last."""
    rank, world = dist.get_rank(), dist.get_world_size()
    writer = _ShardWriter(tag_dir, rank)
    for i, e in enumerate(entries(module)):
        group_rank = dist.get_rank(group=e.group) if e.group is not None else rank
        group_size = dist.get_world_size(group=e.group) if e.group is not None else world
        for prefix, key in (("weight", None), *((k, k) for k in OPTIM_KEYS)):
            full = get_full_state(e.param, key)  # collective over e.group
            if e.expert_offset is None:
                if i % world == rank:
                    writer.add(f"{prefix}/{e.name}", full)
            else:
                for local, k in enumerate(e.keys(prefix)):
                    if local % group_size == group_rank:
                        writer.add(k, full[local].clone())
    if rank == 0:
        for name, buf in persistent_buffers(module).items():
            writer.add(f"buffer/{canonical_name(name)}", buf.detach().cpu())
    writer.flush()
    all_files: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(all_files, writer.files)
    if rank == 0:
        tensors, sizes = {}, {}
        for files in all_files:
            for fname, keys in files.items():
                sizes[fname] = (tag_dir / fname).stat().st_size
                tensors.update(dict.fromkeys(keys, fname))
        index = {"format": FORMAT, "files": sizes, "tensors": tensors}
        atomic_write_text(tag_dir / INDEX, json.dumps(index, indent=1, sort_keys=True))


class StateReader:
    """Lazy reader of a reshardable checkpoint: checks every file is there and whole, then opens only
    the files that hold the requested keys."""

    def __init__(self, tag_dir: Path):
        self.tag_dir = Path(tag_dir)
        index_path = self.tag_dir / INDEX
        fix = (f"restore it, or resume from an earlier checkpoint by writing its tag into "
               f"{self.tag_dir.parent / 'latest'}")
        if not index_path.is_file():
            raise CheckpointError(f"{index_path} is missing (checkpoint incomplete or of an older format); {fix}")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path} is not valid JSON ({e}); {fix}") from None
        if index.get("format") not in READABLE_FORMATS:
            raise CheckpointError(f"{index_path}: format {index.get('format')!r} is not {FORMAT!r}; {fix}")
        for fname, size in index["files"].items():
            path = self.tag_dir / fname
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing; {fix}")
            if path.stat().st_size != size:
                raise CheckpointError(f"checkpoint file {path} is {path.stat().st_size} bytes, written as {size} "
                                      f"(truncated or corrupt); {fix}")
        self.fix = fix
        self.tensors: dict[str, str] = index["tensors"]
        self._open: dict[str, object] = {}

    def has(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.tag_dir / INDEX} has no tensor {key!r}: the checkpoint is of another "
                                  "model; use a new run_dir, or the model settings it was written with")
        path = self.tag_dir / self.tensors[key]
        try:
            if path.name not in self._open:
                self._open[path.name] = safe_open(str(path), framework="pt")
            return self._open[path.name].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers / data
            raise CheckpointError(f"checkpoint file {path} is unreadable ({e}); {self.fix}") from None

    def full(self, entry: Entry, prefix: str) -> torch.Tensor:
        """The tensor this rank's parameter holds (its expert slice stacked), checked against its shape."""
        parts = [self.get(k) for k in entry.keys(prefix)]
        value = parts[0] if entry.expert_offset is None else torch.stack(parts)
        shape = tuple(getattr(entry.param, "ds_shape", entry.param.shape))
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{self.tag_dir}: {prefix}/{entry.name} has shape {tuple(value.shape)} but the "
                                  f"model's is {shape}: the checkpoint is of another model")
        return value

    def names(self, prefix: str) -> set[str]:
        return {k[len(prefix) + 1:] for k in self.tensors if k.startswith(prefix + "/")}


def load_state(engine, tag_dir: Path, with_optimizer: bool = True) -> None:
    """Set this rank's share of the weights (fp32 master and working copy), Adam moments and
    buffers from `tag_dir`. No communication: every rank reads only its own keys."""
    reader = StateReader(tag_dir)
    if with_optimizer:
        ensure_optimizer_state(engine)
    for e in entries(engine.module):
        set_full_state(e.param, reader.full(e, "weight"), None)
        if with_optimizer:
            for key in OPTIM_KEYS:
                set_full_state(e.param, reader.full(e, key), key)
    for name, buf in persistent_buffers(engine.module).items():
        key = f"buffer/{canonical_name(name)}"
        if reader.has(key):
            buf.data.copy_(reader.get(key).view(buf.shape))


def read_full_weights(tag_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The whole plain-model state dict (experts re-stacked), for export: holds the full model."""
    reader = StateReader(tag_dir)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key in sorted(reader.names("weight")):
        if key.endswith("]"):
            name, idx = key[:-1].rsplit("[", 1)
            experts.setdefault(name, {})[int(idx)] = reader.get(f"weight/{key}").to(dtype)
        else:
            out[key] = reader.get(f"weight/{key}").to(dtype)
    for name, parts in experts.items():
        out[name] = torch.stack([parts[i] for i in range(len(parts))])
    for key in reader.names("buffer"):
        out[key] = reader.get(f"buffer/{key}")
    return out
