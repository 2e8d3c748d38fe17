"""The run's state saved with every checkpoint (its trainer_state.json), typed.

    state = RunState(step=10, consumed_samples=80, world_size=2, ...)
    text = state.to_json()               # written last by rank 0: it marks the checkpoint complete
    state = RunState.read(tag_dir)       # CheckpointError in one line on an unknown version or field

The JSON keys are the field names, the same keys trainer_state.json has always had, so checkpoints
written before this class existed (no `version` key: version 1) load unchanged; fields they lack
take the defaults below.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoint.tags import TRAINER_STATE
from pipeline.errors import CheckpointError

VERSION = 1


@dataclass(frozen=True)
class RunState:
    step: int
    consumed_samples: int = 0
    world_size: int = 1
    expert_parallel_size: int | None = None  # None: not recorded (older checkpoints)
    sequence_parallel_size: int = 1
    global_batch_size: int | None = None
    eval_history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0  # the running count TensorBoard shows
    data: dict | None = None  # data.identity.data_identity of data.train; None: not recorded
    optimizer_step: int | None = None  # Adam's step count, set by the checkpoint manager on save
    version: int = VERSION

    def to_json(self) -> str:
        out = dataclasses.asdict(self)
        for key in ("expert_parallel_size", "global_batch_size", "optimizer_step"):
            if out[key] is None:  # unrecorded stays absent, as before
                del out[key]
        return json.dumps(out, indent=2)

    @classmethod
    def from_dict(cls, raw: dict, where: str | Path) -> RunState:
        version = raw.get("version", 1)
        if version != VERSION:
            raise CheckpointError(f"{where}: run state version {version} is not one this version reads ({VERSION}); "
                                  "resume it with the version of the pipeline that wrote it")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown field(s) {', '.join(unknown)} in the run state; it was written "
                                  "by another version of the pipeline: resume it with that version")
        if "step" not in raw:
            raise CheckpointError(f"{where}: the run state has no step; the checkpoint is damaged")
        return cls(**raw)

    @classmethod
    def read(cls, tag_dir: Path) -> RunState:
        path = Path(tag_dir) / TRAINER_STATE
        return cls.from_dict(json.loads(path.read_text()), path)
