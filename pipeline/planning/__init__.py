"""Planning tools behind `python -m pipeline.plan`: ZeRO state, activations, communication, fit, step time.

    zero.py         per-rank parameter / gradient / optimizer elements and bytes (DeepSpeed's rules)
    activations.py  bytes autograd keeps per micro-batch (per attention kernel, chunked loss), checkpointing on/off
    comm.py         bytes per collective per step and the link each crosses; start-up host memory
    planner.py      run config + node count -> Plan; GPU specs; step time; smallest fitting node count
    search.py       --search: the fastest fitting EP size / micro-batch / checkpointing on N nodes
    report.py       text and JSON output
"""

from pipeline.hardware import GPUS, GPUSpec, get_gpu
from pipeline.model.activation_memory import ActivationMemory, activation_memory
from pipeline.planning.planner import Plan, Planner, model_config
from pipeline.planning.zero import (
    ParamTensor,
    RankElements,
    ZeroSettings,
    model_param_tensors,
    rank_elements,
    state_memory,
)

__all__ = [
    "GPUS",
    "ActivationMemory",
    "GPUSpec",
    "ParamTensor",
    "Plan",
    "Planner",
    "RankElements",
    "ZeroSettings",
    "activation_memory",
    "get_gpu",
    "model_config",
    "model_param_tensors",
    "rank_elements",
    "state_memory",
]
