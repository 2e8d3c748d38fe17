"""prepare's output dir: whether a run may write there, and replacing a dataset without losing it.

- `check_output_apart(inputs, out)`: an --output that is, holds or lies inside an input is refused
  before anything is read or removed (our shards and manifest would be read as input next time).
- `prepare_output_dir(out, fingerprint, overwrite)`: resume an interrupted run with the same
  fingerprint, refuse one from other inputs or options, saying in one line what differs
  (`fingerprint_difference`).
- `swap_in(new, out)`: --overwrite of a complete dataset builds the new one in `out/.overwrite` and
  swaps it in by renames; the old one is removed only once the new one is complete.
Only files prepare writes (shards, manifest, resume state, tokenizer/) are ever removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sysconfig
from pathlib import Path

from pipeline.data.manifest import MANIFEST, STATE
from pipeline.data.readers import STDLIB_SPEC
from pipeline.errors import ConfigError, DataError


def _ours(p: Path) -> bool:
    """Looks like prepare output: such a file without a matching manifest makes the dir refused."""
    return p.name in (MANIFEST, STATE, "tokenizer") or p.suffix in (".bin", ".idx", ".tmp")


# What prepare itself writes in DIR, and so all that --overwrite may remove or replace.
_WRITTEN = re.compile(r"^(?:(?:train|valid)_\d{5}\.(?:bin|idx)(?:\.tmp)?|tokenizer|"
                      + re.escape(MANIFEST) + "|" + re.escape(STATE) + r")$")
OVERWRITE_DIR = ".overwrite"  # the new dataset of an --overwrite, built here while the old one stays
REPLACED_DIR = ".replaced"  # the old dataset during the swap (a few renames), removed right after


def _written_by_us(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if _WRITTEN.match(p.name)] if out.is_dir() else []


def _remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_output_apart(specs: list[str], out: Path) -> None:
    """Refuse an --output that is, holds or lies inside an input path: the next run would read our own
    shards / manifest as input, or --overwrite would delete files of the input."""
    import glob as globlib

    dst = Path(os.path.realpath(out))
    for spec in specs:
        if spec.startswith("hf:"):
            continue
        paths = ([sysconfig.get_paths()["stdlib"]] if spec == STDLIB_SPEC
                 else sorted(globlib.glob(spec, recursive=True)) if any(ch in spec for ch in "*?[") else [spec])
        for path in paths:
            src = Path(os.path.realpath(path))
            how = ("is the input" if src == dst else "is inside the input" if src in dst.parents
                   else "holds the input" if dst in src.parents else None)
            if how:
                raise ConfigError(f"--output {out} {how} {path}: prepare's shards and manifest would mix with the "
                                  "input files and be read as input by the next run; choose an --output outside "
                                  "every --input path")


def swap_in(new: Path, out: Path) -> None:
    """Replace the dataset in `out` by the complete one in `out/.overwrite` by renames: the old manifest
    leaves first and the new one arrives last, so `out` never claims a half-swapped dataset, and the old
    dataset is removed only once the new one is in place. Files we did not write stay where they are."""
    old = out / REPLACED_DIR
    if old.exists():
        shutil.rmtree(old)
    old.mkdir()
    if (out / MANIFEST).is_file():
        (out / MANIFEST).replace(old / MANIFEST)
    for p in _written_by_us(out):
        p.replace(old / p.name)
    for p in _written_by_us(new):
        if p.name != MANIFEST:
            p.replace(out / p.name)
    (new / MANIFEST).replace(out / MANIFEST)
    shutil.rmtree(old)
    shutil.rmtree(new)


def holds_run_of(out: Path, fingerprint: dict) -> bool:
    """`out` holds a finished or interrupted prepare with this fingerprint (one a rerun resumes)."""
    for name in (STATE, MANIFEST):
        try:
            if json.loads((out / name).read_text()).get("fingerprint") == fingerprint:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def prepare_output_dir(out: Path, fingerprint: dict, overwrite: bool, legacy_inputs=None) -> dict | None:
    """Returns the resumable state, None for a fresh start; refuses to mix with another dataset.
    `legacy_inputs()`: the inputs' size + mtime fingerprint, which dirs prepared by versions before
    content hashes recorded (accepted when it matches)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if _ours(p)]
    if overwrite:  # no complete dataset here (that case builds beside it, _prepare_locked): clear our files
        _remove(_written_by_us(out))
        return None
    for name in (STATE, MANIFEST):
        if (out / name).is_file():
            try:
                old = json.loads((out / name).read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("fingerprint") == fingerprint:
                return old if name == STATE else {"complete": True}
            was = old.get("fingerprint") or {}
            differs = [k for k in fingerprint if was.get(k) != fingerprint[k]]
            if differs == ["inputs"] and legacy_inputs is not None and was["inputs"] == legacy_inputs():
                old["fingerprint"] = fingerprint  # from an older version, inputs unchanged: upgrade
                return old if name == STATE else {"complete": True}
            why = fingerprint_difference(was, fingerprint) if was else f"{out / name} records no fingerprint"
            what = "inputs" if differs == ["inputs"] else "inputs or options"
            then = ("resuming would mix old and new text: pass --overwrite to rebuild it" if name == STATE
                    else "pass --overwrite to replace it (the old one stays until the new one is complete)")
            raise DataError(f"output dir {out} already holds a dataset prepared from different {what} ({why}); "
                            f"{then}, or choose another --output")
    if existing:
        raise DataError(
            f"output dir {out} already holds shard/tokenizer files ({existing[0].name}, ...) "
            f"without a matching manifest; pass --overwrite to replace them"
        )
    return None


# fingerprint["tokenizer"] key -> the flag that sets it
_TOKENIZER_FLAGS = {"path": "--tokenizer", "eos_token": "--eos-token", "train": "--train-tokenizer",
                    "vocab_size": "--vocab-size", "sample_docs": "--tokenizer-sample-docs",
                    "sample_bytes": "--tokenizer-sample-bytes"}


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _input_files(inputs: list) -> dict:
    """Fingerprint `inputs` -> {file: (size, content hash)}; a Hub dataset counts as one file."""
    files = {}
    for entry in inputs:
        if len(entry) > 2:
            files.update({f[0]: (f[1], f[2]) for f in entry[2]})
        else:
            files[f"hf:{entry[1]}"] = (None, None)
    return files


def _inputs_difference(old: list, new: list) -> list[str]:
    a, b = _input_files(old), _input_files(new)
    out = []
    for what, names in (
        ("added", sorted(set(b) - set(a))),
        ("removed", sorted(set(a) - set(b))),
        ("size changed", [f"{k} ({a[k][0]:,} -> {b[k][0]:,} bytes)" for k in sorted(set(a) & set(b))
                          if a[k][0] != b[k][0]]),
        ("content changed", sorted(k for k in set(a) & set(b) if a[k][0] == b[k][0] and a[k][1] != b[k][1])),
    ):
        if names:
            out.append(f"{what}: {_listed(names)}")
    if not out:  # the same files with the same content, listed in another order / format / part
        out.append("the same files in another order or read as another format")
    return out


def _settings_difference(old: dict, new: dict, flag_of) -> list[str]:
    show = lambda v: "none" if v is None else str(v)  # noqa: E731
    return [f"{flag_of(k)} {show(old.get(k))} -> {show(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def fingerprint_difference(old: dict, new: dict) -> str:
    """What differs between an output dir's fingerprint and this run's, in words, e.g.
    `added: c.jsonl; --dtype uint16 -> int32` (inputs first, then the flags whose values differ)."""
    parts = []
    if old.get("inputs") != new["inputs"]:
        parts += _inputs_difference(old.get("inputs") or [], new["inputs"])
    parts += _settings_difference(old.get("tokenizer") or {}, new["tokenizer"], lambda k: _TOKENIZER_FLAGS.get(k, k))
    parts += _settings_difference(old.get("options") or {}, new["options"], lambda k: "--" + k.replace("_", "-"))
    return "; ".join(parts) or "the recorded fingerprint is in another form"
