"""Checkpoints, one package:

    format.py      the reshardable on-disk format: per-tensor safetensors + index.json, read/verify
    zero_state.py  ZeRO gather/scatter of one parameter's full fp32 weight and Adam moments
    manager.py     CheckpointManager: latest, save, pruning, RNG, resume policy and checks
    init_from.py   `model.init_from`: start a run from a transformers or exported weights folder
    export.py      a checkpoint -> a Hugging Face (or native) folder, for `python -m pipeline.export`
"""

from pipeline.train.checkpoint.export import export, load_exported, write_export
from pipeline.train.checkpoint.format import FORMAT, INDEX, StateReader, load_state, read_full_weights, save_state
from pipeline.train.checkpoint.init_from import WeightsFolder, load_initial_weights
from pipeline.train.checkpoint.manager import (
    LATEST,
    CheckpointManager,
    check_global_batch,
    checkpoint_steps,
    find_checkpoint,
    read_latest,
)

__all__ = [
    "FORMAT",
    "INDEX",
    "LATEST",
    "CheckpointManager",
    "StateReader",
    "WeightsFolder",
    "check_global_batch",
    "checkpoint_steps",
    "export",
    "find_checkpoint",
    "load_exported",
    "load_initial_weights",
    "load_state",
    "read_full_weights",
    "read_latest",
    "save_state",
    "write_export",
]
