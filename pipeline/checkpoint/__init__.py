"""Checkpoints, one package (used by the trainer, `pipeline.evaluate` and `pipeline.export`; it
imports nothing of pipeline.train):

    format.py      the reshardable on-disk format: per-tensor safetensors + index.json, read/verify
    zero_state.py  ZeRO gather/scatter of one parameter's full fp32 weight and Adam moments
    tags.py        which step_N/ are complete, which one `latest` means, pruning, the saved config
    run_state.py   RunState: the typed trainer_state.json (versioned)
    resume.py      the resume checks: same model, same global batch, same data (pure functions)
    manager.py     CheckpointManager: save and load_latest with an engine, a RunState and plain values
    async_writer.py  asynchronous saves: reused host buffers, one background writer at a time
    init_from.py   `model.init_from`: start a run from a transformers or exported weights folder
    hf_export.py   a checkpoint -> a Hugging Face (or native) folder, for `python -m pipeline.export`
"""

from pipeline.checkpoint.format import FORMAT, INDEX, StateReader, load_state, read_full_weights, save_state
from pipeline.checkpoint.hf_export import export, load_exported, write_export
from pipeline.checkpoint.init_from import WeightsFolder, load_initial_weights
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.resume import check_global_batch
from pipeline.checkpoint.run_state import RunState
from pipeline.checkpoint.tags import LATEST, checkpoint_steps, find_checkpoint, read_latest

__all__ = [
    "FORMAT",
    "INDEX",
    "LATEST",
    "CheckpointManager",
    "RunState",
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
