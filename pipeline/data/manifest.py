"""manifest.json of a prepared data dir: the format facts readers must not assume.

The manifest records the tokenizer identity (type, file sha256), vocab size, EOS/BOS ids, the
token dtype, every shard of every split with its document and token counts and its smallest and
largest token id, the sha256 of every
file, the command line and inputs, and the skip report. Readers take dtype and ids from here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write_text

MANIFEST = "manifest.json"
STATE = ".prepare_state.json"
FORMAT_NAME = "gpt-oss-pipeline/mmidx-shards"
FORMAT_VERSION = 1


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write-then-rename so a reader (or a crash) never sees half a JSON file."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str  # file prefix relative to the data dir, e.g. "train_00003"
    documents: int
    tokens: int
    min_id: int | None = None  # smallest / largest token id in the shard (None: an older manifest)
    max_id: int | None = None


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    documents: int
    tokens: int
    shards: tuple[ShardInfo, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: Path  # the data dir
    format_version: int
    vocab_size: int
    eos_id: int
    bos_id: int | None
    dtype: np.dtype
    tokenizer: dict  # {"type", "file", "sha256", ...}
    splits: dict[str, SplitInfo]
    files: dict[str, str]  # relative path -> sha256
    raw: dict

    def shard_prefixes(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise DataError(f"{self.path} has no split {split!r}; it has {', '.join(sorted(self.splits))}")
        return [self.path / s.name for s in self.splits[split].shards]


def load_manifest(data_dir: str | Path) -> Manifest:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        if (data_dir / STATE).is_file():
            raise DataError(
                f"preparation of {data_dir} did not finish (no {MANIFEST}); "
                f"rerun the same `python -m pipeline.prepare` command to resume it"
            )
        raise DataError(
            f"{data_dir} has no {MANIFEST}: not a prepared data dir; "
            f"create one with `python -m pipeline.prepare --input ... --output {data_dir}`"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run prepare into a fresh dir") from e
    if raw.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not a {FORMAT_NAME} manifest (format={raw.get('format')!r})")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {raw['format_version']}; this code reads up to "
            f"{FORMAT_VERSION}: update the pipeline"
        )
    splits = {
        name: SplitInfo(
            documents=int(s["documents"]),
            tokens=int(s["tokens"]),
            shards=tuple(
                ShardInfo(sh["name"], int(sh["documents"]), int(sh["tokens"]),
                          None if sh.get("min_id") is None else int(sh["min_id"]),
                          None if sh.get("max_id") is None else int(sh["max_id"]))
                for sh in s["shards"]
            ),
        )
        for name, s in raw["splits"].items()
    }
    tok = raw["tokenizer"]
    return Manifest(
        path=data_dir,
        format_version=int(raw["format_version"]),
        vocab_size=int(tok["vocab_size"]),
        eos_id=int(tok["eos_id"]),
        bos_id=None if tok.get("bos_id") is None else int(tok["bos_id"]),
        dtype=np.dtype(raw["dtype"]),
        tokenizer=tok,
        splits=splits,
        files=dict(raw["files"]),
        raw=raw,
    )


def check_vocab_compatible(data_dirs: list, model_vocab_size: int) -> None:
    """Raise DataError unless every dir's tokenizer fits the model and all dirs share one tokenizer.

    A model vocab larger than the tokenizer's is fine (embedding tables are often padded to a
    multiple of 64/128); a smaller one would index past the embedding table.
    """
    manifests = [load_manifest(d) for d in data_dirs]
    for m in manifests:
        if m.vocab_size > model_vocab_size:
            padded = -(-m.vocab_size // 128) * 128
            raise DataError(
                f"data dir {m.path} was tokenised with a {m.tokenizer.get('type')} tokenizer of vocab size "
                f"{m.vocab_size}, but the model's vocab_size is {model_vocab_size}: token ids up to "
                f"{m.vocab_size - 1} would index past the embedding table; "
                f"set model.vocab_size={m.vocab_size} "
                f"(or {padded}, padded to a multiple of 128), or re-prepare the data with a smaller tokenizer"
            )
    if manifests:
        first = manifests[0]
        for m in manifests[1:]:
            if m.tokenizer.get("sha256") != first.tokenizer.get("sha256") or m.eos_id != first.eos_id:
                raise DataError(
                    f"data dirs {first.path} and {m.path} were prepared with different tokenizers "
                    f"({first.tokenizer.get('type')} {first.tokenizer.get('sha256', '')[:12]}, vocab "
                    f"{first.vocab_size}, eos {first.eos_id} vs {m.tokenizer.get('type')} "
                    f"{m.tokenizer.get('sha256', '')[:12]}, vocab {m.vocab_size}, eos {m.eos_id}); "
                    f"re-prepare them with one tokenizer (--tokenizer {first.path})"
                )
