"""Which checkpoints a run dir holds: `RUN/checkpoints/step_N/` tags, which are complete, which one
`latest` means, which to prune, and the run config saved with one (read here, and only here).

A `step_N/` is *complete* once its trainer_state.json (written last) parses. A `latest` that is
missing, empty or names an incomplete tag never means "start fresh" while complete checkpoints
exist: the newest complete one is used, and `latest_problem` says why. A `latest` holding anything
but a plain `step_N` tag (a path such as `../../other_run/checkpoints/step_8`) stops the run: it
would load another run's weights into this one and then treat this run's newer checkpoints as
abandoned (`train.init_from` is the way to start from another run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from pipeline.errors import ConfigError

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
SAVED_CONFIG = "config.yaml"  # the resolved run config saved with every checkpoint
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_of(step: int) -> str:
    return f"step_{step}"


def step_of_tag(tag: str) -> int:
    """The step of a `step_N` tag (the inverse of tag_of)."""
    return int(_TAG_RE.match(tag).group(1))


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    if not Path(ckpt_dir).is_dir():
        return []
    return sorted(int(m.group(1)) for p in Path(ckpt_dir).iterdir() if (m := _TAG_RE.match(p.name)))


def is_complete(tag_dir: Path) -> bool:
    """The save finished: trainer_state.json, written last, parses. (Damage after the save, e.g. a
    truncated or flipped file, is not judged here but by the reader, which refuses it naming the
    file: a damaged checkpoint must stop the run, never be mistaken for "no checkpoint".)"""
    try:
        return "step" in json.loads((Path(tag_dir) / TRAINER_STATE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints, newest first."""
    ckpt_dir = Path(ckpt_dir)
    return [tag_of(s) for s in reversed(checkpoint_steps(ckpt_dir)) if is_complete(ckpt_dir / tag_of(s))]


def _latest_tag(ckpt_dir: Path) -> str:
    """What `latest` holds ("" when missing or empty); ConfigError unless that is a `step_N` tag of
    this checkpoints dir."""
    path = Path(ckpt_dir) / LATEST
    try:
        tag = path.read_text().strip()
    except OSError:
        return ""
    if tag and not _TAG_RE.match(tag):
        tags = complete_tags(ckpt_dir)
        raise ConfigError(
            f"{path} holds {tag!r}, which is not a checkpoint tag of this run (a step_N directory inside "
            f"{ckpt_dir}); write one of this run's tags into it ({', '.join(tags[:3]) or 'none complete'}) or "
            "delete it to resume from the newest; to start from another run's weights use train.init_from")
    return tag


def latest_problem(ckpt_dir: Path) -> str | None:
    """Why `latest` cannot be used as it is (None: it names a complete checkpoint, or there is none)."""
    path = Path(ckpt_dir) / LATEST
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    if not path.is_file():
        why = f"{path} is missing"
    else:
        tag = _latest_tag(ckpt_dir)
        if tag and is_complete(Path(ckpt_dir) / tag):
            return None
        why = f"{path} is empty" if not tag else f"{path} names {tag}, which is not a complete checkpoint"
    return f"{why}: resuming from the newest complete checkpoint, {tags[0]}"


def read_latest(ckpt_dir: Path) -> str | None:
    """The checkpoint to resume from: the tag `latest` names if that checkpoint is complete, else the
    newest complete one (see `latest_problem`), else None (nothing to resume)."""
    tag = _latest_tag(ckpt_dir)
    if tag and is_complete(Path(ckpt_dir) / tag):
        return tag
    tags = complete_tags(ckpt_dir)
    return tags[0] if tags else None


def find_checkpoint(ckpt_dir: Path, step: int | None = None) -> Path:
    """`step_N/` (the latest if `step` is None); ConfigError if it is absent or incomplete."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step) if step is not None else read_latest(ckpt_dir)
    if tag is None or not is_complete(ckpt_dir / tag):
        raise ConfigError(f"no complete checkpoint {tag_of(step) if step is not None else '(latest)'} under "
                          f"{ckpt_dir}; train first or pass --step with an existing step_N")
    return ckpt_dir / tag


def prunable(steps: list[int], keep: int, keep_last: int) -> list[int]:
    """Of the checkpoint steps on disk, those to delete once `keep` is the latest: all but the newest
    `keep_last` up to `keep` (later ones, e.g. of a run that went further before a restart from an
    earlier step, are left alone)."""
    upto = [s for s in sorted(steps) if s <= keep]
    return upto[: max(0, len(upto) - keep_last)]


def read_saved_config(tag_dir: Path) -> dict:
    """The resolved run config saved with checkpoint `tag_dir` (its config.yaml), as a dict."""
    return yaml.safe_load((Path(tag_dir) / SAVED_CONFIG).read_text())
