"""What a run was trained on, and whether the data still is what its manifest says.

- `data_identity(sources, seq_len, seed, prefixes, tokenizer)`: the sample-order scheme (dataset.ORDER_SCHEME), the
  settings the sample map is built from (data.seq_len, data.seed), the tokenizer identity, the shard
  set with the sha256 prepare recorded for each file (for a Megatron prefix: the content hashes of its
  .bin/.idx and data.tokenizer, see megatron_sources.py), and the blend weights of `data.train`; stored
  in every checkpoint so that a resume on other data (another tokenizer of the same vocab size,
  other shards, another blend) or in another sample order or map is caught (the saved sample
  position only means something in the map it was counted in).
- `identity_change(old, new)`: one phrase saying what changed, or None.
- `resume_order(saved)`: the sample order a resume continues in: the one the checkpoint recorded;
  a checkpoint that records none was written before the O(shards) loader and keeps the legacy order
  (legacy_order.py), so runs started before it are never silently re-ordered.
- `check_token_ranges(dirs, vocab_size)`: each shard's min/max token id (recorded by prepare) must
  fit the model, checked before the engine is built.
- `verify_checksums(dirs, rank, world)`: sha256 of every shard file against the manifest, files
  dealt over ranks by size (the full check at start-up is opt-in: it reads all the data once; by
  default background_verify.py checks the same files while the run trains).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.background_verify import deal_by_size, manifest_checksums
from pipeline.data.dataset import ORDER_SCHEME, is_weighted, source_paths
from pipeline.data.indexed import bin_path, prefix_of
from pipeline.data.legacy_order import LEGACY_ORDER
from pipeline.data.manifest import MANIFEST, Manifest, load_manifest
from pipeline.data.verify import checksum_line, sha256_problem
from pipeline.errors import DataError


def _weighted(sources: list) -> list[tuple[float | None, str]]:
    """(weight or None, path) of each source, in either form of data.train."""
    if is_weighted(sources):
        return [(float(w), str(p)) for w, p in sources]
    return [(None, p) for p in source_paths(sources)]


def resume_order(saved: dict | None, checkpoint: Path | None) -> tuple[str, list[str]]:
    """(sample order of this run, notes to log): ORDER_SCHEME for a new run; resuming `checkpoint`,
    the order it recorded (the legacy order where its data identity, or the identity itself,
    predates recording one)."""
    if checkpoint is None:
        return ORDER_SCHEME, []
    order = (saved or {}).get("order") or LEGACY_ORDER
    if order == ORDER_SCHEME:
        return order, []
    return order, [f"{checkpoint} was started in the sample order {order}: resuming in it (a new run uses "
                   f"{ORDER_SCHEME})"]


# The settings besides the data itself that build_dataset's sample map depends on: identity key -> config key.
SAMPLE_MAP_SETTINGS = {"seq_len": "data.seq_len", "seed": "data.seed"}


def data_identity(sources: list, seq_len: int, seed: int, prefixes: dict[str, dict] | None = None,
                  tokenizer: dict | None = None) -> dict:
    """{"order", "seq_len", "seed", "sources": [{"path", "weight", "tokenizer", "shards": {file: sha256}}]}
    of `data.train`. `prefixes`: megatron_sources.prefix_facts of its Megatron prefixes; `tokenizer`:
    megatron_sources.tokenizer_facts of data.tokenizer (None: not set)."""
    out = []
    for weight, path in _weighted(sources):
        entry: dict = {"path": path, "weight": weight}
        if Path(path).is_dir():
            m = load_manifest(path)
            entry["tokenizer"] = {"type": m.tokenizer.get("type"), "sha256": m.tokenizer.get("sha256"),
                                  "vocab_size": m.vocab_size, "eos_id": m.eos_id}
            entry["shards"] = {rel: digest for rel, digest in sorted(m.files.items()) if rel.endswith((".bin", ".idx"))}
        elif prefixes and prefix_of(path) in prefixes:  # a Megatron prefix: its content and data.tokenizer
            prefix, f = prefix_of(path), prefixes[prefix_of(path)]
            entry["tokenizer"] = tokenizer
            entry["shards"] = {f"{prefix}.bin": f["bin_hash"], f"{prefix}.idx": f["idx_hash"]}
            entry["bytes"] = {f"{prefix}.bin": f["bin_size"], f"{prefix}.idx": f["idx_size"]}
        else:  # a bare Megatron prefix whose content was not read: its size is all we can compare
            prefix = prefix_of(path)
            entry["shards"] = {f"{prefix}.bin": f"size:{bin_path(prefix).stat().st_size}"}
        out.append(entry)
    return {"order": ORDER_SCHEME, "seq_len": seq_len, "seed": seed, "sources": out}


def identity_change(old: dict, new: dict) -> str | None:
    """What differs between two `data_identity` records, in words (None: the same data)."""
    was, now = old.get("order") or LEGACY_ORDER, new.get("order") or LEGACY_ORDER  # none recorded: legacy
    if was != now:
        return (f"its samples were drawn in another order ({was}; now {now}): the same data would be read in a "
                "different sequence from here on")
    for key, setting in SAMPLE_MAP_SETTINGS.items():
        was, now = old.get(key), new.get(key)
        if was is not None and now is not None and was != now:  # not recorded (older checkpoints): unknown
            return (f"{setting} was {was}, now {now} (the saved sample position counts samples of the map "
                    f"built with {setting}={was}: in another map, samples would repeat or be skipped)")
    a, b = old.get("sources", []), new.get("sources", [])
    if len(a) != len(b):
        return (f"data.train had {len(a)} source(s) ({', '.join(s['path'] for s in a)}), now {len(b)} "
                f"({', '.join(s['path'] for s in b)})")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        where = f"data.train[{i}] ({y['path']})"
        if "tokenizer" not in x and "bytes" in y:
            # A Megatron prefix recorded before its content and tokenizer were: compare what was (its size).
            y = {**y, "shards": {k: f"size:{n}" for k, n in y["bytes"].items() if k in x.get("shards", {})}}
            y.pop("tokenizer")
        if x.get("tokenizer") != y.get("tokenizer"):
            tx, ty = x.get("tokenizer") or {}, y.get("tokenizer") or {}
            return (f"{where} was tokenised with another tokenizer ({tx.get('type')} "
                    f"{str(tx.get('sha256'))[:12]}, vocab {tx.get('vocab_size')} -> {ty.get('type')} "
                    f"{str(ty.get('sha256'))[:12]}, vocab {ty.get('vocab_size')})")
        if x.get("shards") != y.get("shards"):
            xs, ys = x.get("shards", {}), y.get("shards", {})
            gone, added = sorted(set(xs) - set(ys)), sorted(set(ys) - set(xs))
            changed = sorted(k for k in set(xs) & set(ys) if xs[k] != ys[k])
            parts = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                     for label, names in (("missing", gone), ("new", added), ("changed", changed)) if names]
            return f"{where} holds other shards ({'; '.join(parts)})"
        if x.get("weight") != y.get("weight"):
            return f"{where} blend weight changed ({x.get('weight')} -> {y.get('weight')})"
        if x.get("path") != y.get("path"):
            return f"data.train[{i}] moved ({x['path']} -> {y['path']}, same shards)"
    return None


def check_token_ranges(manifests: list[Manifest], vocab_size: int) -> list[str]:
    """Refuse a shard whose recorded ids do not fit the model; returns notes for manifests written
    before ranges were recorded (those ids are checked as they are read instead)."""
    notes = []
    for m in manifests:
        for split in m.splits.values():
            for shard in split.shards:
                if shard.max_id is None:
                    continue
                if shard.max_id >= vocab_size or (shard.min_id is not None and shard.min_id < 0):
                    raise DataError(
                        f"{m.path / shard.name}.bin holds token ids {shard.min_id}..{shard.max_id} "
                        f"(recorded in {m.path / MANIFEST}) but the model's vocab_size is {vocab_size}; "
                        "re-prepare the data with the model's tokenizer, or set model.vocab_size above the largest id"
                    )
        if any(s.max_id is None for split in m.splits.values() for s in split.shards):
            notes.append(f"{m.path / MANIFEST} records no token-id ranges (prepared by an older version); "
                         "ids are checked as they are read")
    return notes


def verify_checksums(data_dirs: list, rank: int, world: int) -> list[str]:
    """This rank's share of the sha256 check of every file every manifest lists."""
    files, _ = manifest_checksums(data_dirs)
    return [checksum_line(path, why) for path, digest, _ in deal_by_size(files, world)[rank]
            if (why := sha256_problem(path, digest))]
