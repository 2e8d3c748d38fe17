"""Megatron-LM data as it is: `data.train` / `data.valid` entries that are `.bin/.idx` prefixes written by
Megatron's `tools/preprocess_data.py` (no manifest.json of ours), with `data.tokenizer` naming the
tokenizer they were made with.

- `run_vocabulary(train, tokenizer)`: (vocab_size, eos_id) a run builds its model with: the first source's
  manifest when it is a prepared dir (the manifest wins), else `data.tokenizer`.
- `tokenizer_source(train, tokenizer)`: where in-loop evaluation, evaluate --run-dir and export read the
  tokenizer from (the same rule).
- `tokenizer_notes(sources, tokenizer, given)`: `data.tokenizer` against the manifests of the prepared dirs
  among the sources: one line where it disagrees (a note when only prepared dirs use it; an error when
  prefixes, which it describes, would be mixed with data of another tokenizer).
- `prefix_facts(prefixes, fallback_dir)`: each prefix's smallest and largest token id and the content
  hashes of its two files, from its sidecar `PREFIX.ranges.json` or one chunked pass over the files
  (then recorded in that sidecar, or in `fallback_dir` where the data's directory is not writable).
  `check_prefixes` first checks every prefix's files (every rank alike); `recorded_notes` says what was
  read and where it was recorded.
- `check_prefix_ids(facts, vocab_size)`: one line naming the shard, the id and the vocabulary size.

Why a pass over the data at start-up (not lazily as shards are first read): a bad id is then one line
before the engine is built, not a crash of one rank hours in; the pass is cached, dealt over the ranks,
and reruns only for a shard whose files changed size or mtime. The hashes are taken in the same pass,
so the data identity (identity.py) holds the content of a prefix, not its mtime: a copy of the files
with new mtimes is the same data, a rewrite of the same size is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xxhash

from pipeline.data.dataset import source_paths
from pipeline.data.indexed import bin_path, idx_path, prefix_of, read_index_header
from pipeline.data.manifest import MANIFEST, load_manifest, write_json_atomic
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError, DataError

SIDECAR_SUFFIX = ".ranges.json"
SIDECAR_FORMAT = "gpt-oss-pipeline/megatron-prefix-ranges/v1"
_CHUNK_BYTES = 16 << 20  # bounded memory on multi-GB shards; a multiple of every dtype's size


def is_prefix(path: str | Path) -> bool:
    """A source that is not a prepared dir: a Megatron prefix (`.../name`, `name.bin` or `name.idx`)."""
    return not Path(path).is_dir()


def bare_prefixes(sources) -> list[str]:
    """The Megatron prefixes among `sources` (either form of data.train), without .bin/.idx."""
    return [prefix_of(p) for p in source_paths(sources or []) if is_prefix(p)]


def _load(tokenizer: str | Path) -> Tokenizer:
    try:
        return load_tokenizer(tokenizer)
    except DataError as e:  # name the key the path came from
        raise DataError(f"data.tokenizer: {e}") from None


def tokenizer_facts(path: str | Path) -> dict:
    """What the data identity records of a tokenizer: the same keys a manifest's entry gets."""
    tok = _load(path)
    return {"type": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}


def run_vocabulary(train, tokenizer: str | None) -> tuple[int, int]:
    """(vocab_size, eos_id) of the run's data."""
    first = source_paths(train)[0]
    if not is_prefix(first):
        m = load_manifest(first)
        return m.vocab_size, m.eos_id
    if not idx_path(prefix_of(first)).is_file():
        raise DataError(f"data.train[0] ({first}) is neither a prepared data dir nor a Megatron .bin/.idx prefix "
                        f"({prefix_of(first)}.idx does not exist); create a data dir with `python -m pipeline.prepare` "
                        "or give the prefix of preprocess_data.py's output")
    if tokenizer is None:
        raise ConfigError(f"data.train[0] ({first}) is a Megatron .bin/.idx prefix, which records no tokenizer: "
                          "set data.tokenizer to the one it was made with (a Hugging Face tokenizer dir or a "
                          "SentencePiece .model file)")
    tok = _load(tokenizer)
    return tok.vocab_size, tok.eos_id


def tokenizer_source(train, tokenizer: str | None) -> str:
    """Where the run's tokenizer is read from (in-loop evaluation): the first source when it is a
    prepared dir, else data.tokenizer."""
    first = source_paths(train)[0]
    return first if not is_prefix(first) or tokenizer is None else tokenizer


def tokenizer_notes(sources, tokenizer: str | None, given: dict | None) -> list[str]:
    """Notes on data.tokenizer (`tokenizer`, its tokenizer_facts `given`) where prepared dirs' manifests
    say otherwise; DataError where prefixes (made with data.tokenizer) are mixed with dirs prepared with
    another tokenizer."""
    if tokenizer is None or given is None:
        return []
    dirs = list(dict.fromkeys(p for p in source_paths(sources) if not is_prefix(p)))
    for d in dirs:
        m = load_manifest(d)
        theirs = {"type": m.tokenizer.get("type"), "sha256": m.tokenizer.get("sha256"),
                  "vocab_size": m.vocab_size, "eos_id": m.eos_id}
        if theirs == given:
            continue
        what = (f"data.tokenizer ({tokenizer}: {given['type']} {given['sha256'][:12]}, vocab {given['vocab_size']}, "
                f"eos {given['eos_id']}) is not the tokenizer {d} was prepared with ({theirs['type']} "
                f"{str(theirs['sha256'])[:12]}, vocab {theirs['vocab_size']}, eos {theirs['eos_id']}; "
                f"{m.path / MANIFEST})")
        if bare_prefixes(sources):
            raise DataError(f"{what}: the Megatron prefixes in data.train/data.valid would be read with another "
                            "tokenizer than that dir; re-tokenise one of them with the other's tokenizer")
        return [f"{what}: the manifest's tokenizer is used"]
    return []


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fallback_sidecar(prefix: str, fallback_dir: Path) -> Path:
    """Where the sidecar of `prefix` lives in the run dir: one file per absolute prefix path."""
    tag = xxhash.xxh3_64_hexdigest(str(Path(prefix).resolve()).encode())
    return fallback_dir / f"{Path(prefix).name}-{tag}{SIDECAR_SUFFIX}"


def _scan(prefix: str) -> dict:
    """One pass over the prefix's files: min/max of the ids the index covers (vectorised per chunk)
    and the xxh3-128 of each file."""
    header = read_index_header(prefix)
    covered = header.tokens * header.dtype.itemsize  # bytes of .bin the index reaches
    lo = hi = None
    h = xxhash.xxh3_128()
    read = 0
    with open(bin_path(prefix), "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            h.update(block)
            use = min(len(block), max(0, covered - read)) // header.dtype.itemsize * header.dtype.itemsize
            if use:
                ids = np.frombuffer(block, dtype=header.dtype, count=use // header.dtype.itemsize)
                a, b = int(ids.min()), int(ids.max())
                lo, hi = a if lo is None else min(lo, a), b if hi is None else max(hi, b)
            read += len(block)
    ih = xxhash.xxh3_128()
    with open(idx_path(prefix), "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            ih.update(block)
    return {"min_id": lo, "max_id": hi, "bin_hash": "xxh3_128:" + h.hexdigest(),
            "idx_hash": "xxh3_128:" + ih.hexdigest()}


def _read_sidecar(path: Path, key: dict) -> dict | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or half-written by an older tool: compute again
        return None
    if raw.get("format") != SIDECAR_FORMAT or raw.get("key") != key:
        return None  # another format, or the files changed since it was written
    return raw


def prefix_facts(prefixes: list[str], fallback_dir: Path) -> tuple[dict[str, dict], list[str], list[str]]:
    """({prefix: {"min_id", "max_id", "bin_hash", "idx_hash", "bin_size", "idx_size"}}, the prefixes read
    now, those of them recorded in `fallback_dir`) of `prefixes` (this rank's share)."""
    facts, computed, fell_back = {}, [], []
    for prefix in prefixes:
        key = {"bin": _file_key(bin_path(prefix)), "idx": _file_key(idx_path(prefix))}
        beside, elsewhere = Path(prefix + SIDECAR_SUFFIX), _fallback_sidecar(prefix, fallback_dir)
        raw = _read_sidecar(beside, key) or _read_sidecar(elsewhere, key)
        if raw is None:
            raw = {"format": SIDECAR_FORMAT, "key": key, **_scan(prefix)}
            computed.append(prefix)
            try:
                write_json_atomic(beside, raw)
            except OSError:  # the data's directory is read-only (or not ours to write): keep it in the run dir
                try:
                    elsewhere.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(elsewhere, raw)
                except OSError as e:
                    raise DataError(f"cannot record the token-id range of {prefix} beside it (read-only) nor in "
                                    f"{fallback_dir} ({e.strerror or e}); make run_dir writable") from None
                fell_back.append(prefix)
        facts[prefix] = {k: raw[k] for k in ("min_id", "max_id", "bin_hash", "idx_hash")} | {
            "bin_size": key["bin"]["size"], "idx_size": key["idx"]["size"]}
    return facts, computed, fell_back


def check_prefixes(prefixes: list[str]) -> None:
    """One line for a missing, truncated or foreign file, on every rank alike (before the pass is dealt
    over the ranks, so no rank waits for one that failed): a few preads per shard."""
    for prefix in prefixes:
        read_index_header(prefix)


def recorded_notes(computed: list[str], fell_back: list[str], fallback_dir: Path) -> list[str]:
    """What prefix_facts read and where it recorded it (all ranks' lists), for the run's log."""
    notes = []
    if computed:
        notes.append(f"token-id ranges of {len(computed)} Megatron shard(s) read (first: {computed[0]}) and "
                     f"recorded beside them in PREFIX{SIDECAR_SUFFIX}, reused while their files keep size and mtime")
    if fell_back:
        notes.append(f"{len(fell_back)} of them in a read-only directory (first: {fell_back[0]}): recorded in "
                     f"{fallback_dir} instead")
    return notes


def check_prefix_ids(facts: dict[str, dict], vocab_size: int) -> None:
    """One line for the first shard holding an id outside [0, vocab_size)."""
    for prefix, f in facts.items():
        if f["max_id"] is None:
            continue  # an empty shard
        bad = f["max_id"] if f["max_id"] >= vocab_size else f["min_id"] if f["min_id"] < 0 else None
        if bad is not None:
            raise DataError(f"{prefix}.bin holds token id {bad}, outside the vocabulary of size {vocab_size} "
                            f"(ids {f['min_id']}..{f['max_id']}): it was made with another tokenizer than "
                            "data.tokenizer, or model.vocab_size is too small; point data.tokenizer at the "
                            "tokenizer given to preprocess_data.py")
