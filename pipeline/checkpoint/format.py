"""The reshardable checkpoint format: per-parameter fp32 weights and Adam moments, experts split per
*global* expert id, so a checkpoint written by any number of ranks, any expert-parallel size and
either ZeRO stage is read back by any other. (Not DeepSpeed's "universal checkpoint": ours is written
directly by every rank during training, with no conversion step.)

Layout inside `step_N/`::

    state-r00003-000.safetensors    tensors owned by rank 3 (more files if one would pass 2 GiB)
    index.json                      tensor key -> file, file -> byte size, the writing shape, and an
                                    xxh3-64 checksum of every tensor's bytes and of every other file

Integrity: checksums are per tensor, not per file, so a rank verifies exactly the bytes it reads
(every rank reads only its keys); xxh3-64 runs at memory speed (its cost on save and load is
measured by benchmarks/bench_checkpoint.py). A tensor that fails its checksum or is not finite is
refused naming the file, the tensor and what to do. Checkpoints written before checksums load
without them. A write that fails (disk full, I/O error) is recorded, not raised, so that the rank
keeps taking part in the collectives; `save_state` returns every rank's errors.

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
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.checkpoint.zero_state import (
    OPTIM_KEYS,
    GatherBuffer,
    ensure_optimizer_state,
    get_full_state,
    set_full_state,
)
from pipeline.distributed.collectives import gather_objects
from pipeline.distributed.ranks import current, group_rank, group_size
from pipeline.errors import CheckpointError
from pipeline.io_utils import atomic_path, atomic_write_text
from pipeline.model.moe import GroupedExperts

FORMAT = "gpt-oss-pipeline/reshardable-v1"
# The same format under the name checkpoints were written with before it was renamed.
READABLE_FORMATS = (FORMAT, "gpt-oss-pipeline/universal-v1")
INDEX = "index.json"
CHECKSUM = "xxh3_64"
FILE_LIMIT_BYTES = 2 << 30


@dataclass(frozen=True)
class Entry:
    """One parameter of this rank's module, named as in the plain model."""

    name: str
    param: nn.Parameter
    expert_offset: int | None  # global id of the first local expert; None for non-expert tensors
    group: torch.distributed.ProcessGroup | None  # ranks that gather this tensor (its ZeRO partition group)

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


def owned_keys(i: int, e: Entry, prefix: str, rank: int, world: int) -> list[tuple[int | None, str]]:
    """(local expert index, or None for a whole tensor; key) of the tensors of parameter `i` that this
    rank writes on save, and verifies on load: non-expert tensors round-robin over all ranks, each
    expert slice by one rank of the expert-data-parallel group that holds it."""
    if e.expert_offset is None:
        return [(None, f"{prefix}/{e.name}")] if i % world == rank else []
    rank_in_group, size = group_rank(e.group, rank), group_size(e.group, world)
    return [(local, k) for local, k in enumerate(e.keys(prefix)) if local % size == rank_in_group]


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


def write_error_reason(e: Exception) -> str:
    """`No space left on device` from an OSError, or from the text of safetensors' / torch's errors."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"(?:I/O error: )?([^:]*?) \(os error \d+\)", str(e))
    return m[1] if m else str(e)


def tensor_checksum(t: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes as stored (dtype and layout of the file)."""
    return xxhash.xxh3_64_hexdigest(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def all_finite(t: torch.Tensor) -> bool:
    """Exact, and ~40x faster than isfinite(t).all() on CPU: a NaN or Inf element makes the sum
    non-finite, so a finite sum proves every element finite; only a non-finite sum (an element, or
    an overflow of the sum) needs the element-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def file_checksum(path: Path) -> str:
    with open(path, "rb") as f:
        return xxhash.xxh3_64_hexdigest(f.read())


class _ShardWriter:
    """Collects owned tensors and writes them as safetensors files (tmp name, then rename). The
    first failed write is kept in `error` and later tensors are dropped: the rank goes on with the
    collectives and the save is abandoned by every rank together."""

    def __init__(self, tag_dir: Path, rank: int, checksums: bool = True):
        self.tag_dir, self.rank = tag_dir, rank
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: dict[str, list[str]] = {}
        self.checksums: dict[str, str] = {}  # tensor key -> xxh3-64 hex
        self.with_checksums = checksums
        self.error: str | None = None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.error:
            return
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= FILE_LIMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending or self.error:
            return
        name = f"state-r{self.rank:05d}-{len(self.files):03d}.safetensors"
        tmp = self.tag_dir / f"{name}.tmp"  # atomic_path's temporary
        try:
            with atomic_path(self.tag_dir / name) as tmp:
                save_file(self.pending, str(tmp))
                # safetensors creates 0600, so others in the project could not read it: give the file the
                # permissions a plain file gets in this directory (its own, less the execute bits). Reading
                # the umask would need os.umask, which changes process-wide state.
                os.chmod(tmp, self.tag_dir.stat().st_mode & 0o666)
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            self.error = f"writing {tmp} failed ({write_error_reason(e)})"
            self.pending, self.pending_bytes = {}, 0
            return
        if self.with_checksums:
            self.checksums.update({k: tensor_checksum(t) for k, t in self.pending.items()})
        self.files[name] = list(self.pending)
        self.pending, self.pending_bytes = {}, 0


def owned_tensors(module: nn.Module, into: GatherBuffer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor this rank writes, in the order it writes them. Each parameter's
    state is gathered (a collective over its partition group) when the iteration reaches it, so every
    rank must run the iteration to its end. `into`: gather into that reused buffer, on the device
    (the caller copies each tensor into host buffers of its own before the next one); else into a
    new host tensor per parameter. A tensor may be a view of a gathered one, of `into` or of a live
    buffer: copy it to keep it."""
    view = current()
    on_host = into is None
    for i, e in enumerate(entries(module)):
        for prefix, key in (("weight", None), *((k, k) for k in OPTIM_KEYS)):
            full = get_full_state(e.param, key) if on_host else into.gather(e.param, key)  # collective over e.group
            for local, k in owned_keys(i, e, prefix, view.rank, view.world):
                yield k, full if local is None else full[local]
    if view.rank == 0:
        for name, buf in persistent_buffers(module).items():
            yield f"buffer/{canonical_name(name)}", buf.detach() if not on_host else buf.detach().cpu()


def write_owned(tag_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], extra_files: list[str] = (),
                error: str | None = None, checksums: bool = True) -> dict:
    """Write this rank's tensors into `tag_dir` (local files only; the iteration itself may gather);
    returns what `write_index` needs from this rank: its files, checksums and error (`error`: a
    write this rank already failed; the iteration still runs to its end)."""
    writer = _ShardWriter(tag_dir, current().rank, checksums)
    writer.error = error
    for k, t in tensors:
        writer.add(k, t if t._base is None else t.clone())  # a slice would keep its whole gathered tensor alive
    writer.flush()
    extra = {}
    if not writer.error and checksums:
        try:
            extra = {name: file_checksum(tag_dir / name) for name in extra_files}
        except OSError as e:
            writer.error = f"reading back {tag_dir} failed ({e.strerror})"
    return {"files": writer.files, "checksums": writer.checksums, "extra": extra, "error": writer.error}


def write_index(tag_dir: Path, mine: dict, checksums: bool = True, group=None) -> list[str]:
    """Collective over `group` (None: the default group): every rank's `write_owned` result meets
    on every rank; rank 0 writes index.json unless a rank failed. Returns every rank's errors."""
    everyone: list[dict] = gather_objects(mine, group=group)
    errors = [f"rank {r}: {part['error']}" for r, part in enumerate(everyone) if part["error"]]
    if current().rank == 0 and not errors:
        tensors, sizes, sums, file_sums = {}, {}, {}, {}
        for part in everyone:
            for fname, keys in part["files"].items():
                sizes[fname] = (tag_dir / fname).stat().st_size
                tensors.update(dict.fromkeys(keys, fname))
            sums.update(part["checksums"])
            file_sums.update(part["extra"])
        index = {"format": FORMAT, "files": sizes, "tensors": tensors}
        if checksums:
            index.update(checksum=CHECKSUM, tensor_checksums=sums, file_checksums=file_sums)
        try:
            atomic_write_text(tag_dir / INDEX, json.dumps(index, indent=1, sort_keys=True))
        except OSError as e:
            errors.append(f"rank 0: writing {tag_dir / INDEX} failed ({e.strerror})")
    return errors


def save_state(module: nn.Module, tag_dir: Path, extra_files: list[str] = (), error: str | None = None,
               checksums: bool = True) -> list[str]:
    """Every rank calls this (collective); rank 0 writes index.json last, unless a rank failed to
    write (then nothing). `extra_files`: other files this rank wrote into `tag_dir` (checksummed in
    the index); `error`: a write this rank already failed. Returns every rank's write errors."""
    return write_index(tag_dir, write_owned(tag_dir, owned_tensors(module), extra_files, error, checksums), checksums)


def owned_bytes(module: nn.Module) -> int:
    """Bytes of the tensors this rank writes (fp32 weight + Adam moments of its keys, and rank 0's
    buffers), without gathering: what an asynchronous save holds in host memory."""
    view = current()
    total = 0
    for i, e in enumerate(entries(module)):
        shape = tuple(getattr(e.param, "ds_shape", e.param.shape))
        numel = math.prod(shape) if e.expert_offset is None else math.prod(shape[1:])
        total += 4 * numel * sum(len(owned_keys(i, e, p, view.rank, view.world)) for p in ("weight", *OPTIM_KEYS))
    if view.rank == 0:
        total += sum(b.numel() * b.element_size() for b in persistent_buffers(module).values())
    return total


class StateReader:
    """Lazy reader of a reshardable checkpoint: checks every file is there and whole, then opens only
    the files that hold the requested keys."""

    def __init__(self, tag_dir: Path, fix: str | None = None, verify: bool = True):
        self.tag_dir = Path(tag_dir)
        self.verify_reads = verify  # checksum and finiteness of every tensor read (off: benchmarks only)
        self.verify_only: set[str] | None = None  # if set: the keys this rank checks (load_state)
        index_path = self.tag_dir / INDEX
        fix = fix or (f"restore it, or resume from an earlier checkpoint by writing its tag into "
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
        self.checksums: dict[str, str] = index.get("tensor_checksums", {})  # empty: written before checksums
        self.file_checksums: dict[str, str] = index.get("file_checksums", {})
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
            tensor = self._open[path.name].get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers / data
            raise CheckpointError(f"checkpoint file {path} is unreadable ({e}); {self.fix}") from None
        if not self.verify_reads or (self.verify_only is not None and key not in self.verify_only):
            return tensor
        want = self.checksums.get(key)
        if want is not None and tensor_checksum(tensor) != want:
            raise CheckpointError(f"checkpoint file {path}: tensor {key} fails its {CHECKSUM} checksum (damaged on "
                                  f"disk since it was written); {self.fix}")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"checkpoint file {path}: tensor {key} holds NaN or Inf values; {self.fix}")
        return tensor

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Read and check every tensor (checksum, finite) and every checksummed file; with `world`
        > 1 this rank checks only every world-th file. Raises CheckpointError on the first problem."""
        by_file: dict[str, list[str]] = {}
        for key, fname in sorted(self.tensors.items()):
            by_file.setdefault(fname, []).append(key)
        for i, (fname, keys) in enumerate(sorted(by_file.items())):
            if i % world == rank:
                for key in keys:
                    self.get(key)
                self._open.pop(fname, None)
        for i, (fname, want) in enumerate(sorted(self.file_checksums.items())):
            path = self.tag_dir / fname
            if i % world == rank and (not path.is_file() or file_checksum(path) != want):
                raise CheckpointError(f"checkpoint file {path} is missing or fails its {CHECKSUM} checksum; {self.fix}")

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


def verified_by_this_rank(module: nn.Module, with_optimizer: bool) -> set[str]:
    """The keys this rank verifies on load: save_state's write assignment, on the loading shape."""
    view = current()
    rank, world = view.rank, view.world
    prefixes = ("weight", *OPTIM_KEYS) if with_optimizer else ("weight",)
    mine = {f"buffer/{canonical_name(n)}" for n in persistent_buffers(module)} if rank == 0 else set()
    for i, e in enumerate(entries(module)):
        for p in prefixes:
            mine.update(k for _, k in owned_keys(i, e, p, rank, world))
    return mine


def load_state(engine, tag_dir: Path, with_optimizer: bool = True, fix: str | None = None,
               verify: bool = True) -> StateReader:
    """Set this rank's share of the weights (fp32 master and working copy), Adam moments and
    buffers from `tag_dir`. No communication: every rank reads only its own keys. Each tensor is
    verified (checksum, finite) by one of the ranks that read it, the one that would write it: every
    byte is checked once, at 1/world of the checkpoint per rank, and a damaged tensor stops the run
    from that rank. Returns the reader (its index: e.g. the checksums of the other files)."""
    reader = StateReader(tag_dir, fix, verify)
    reader.verify_only = verified_by_this_rank(engine.module, with_optimizer)
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
    return reader


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
