"""Planning tools behind `python -m pipeline.plan`: ZeRO state, activation memory, fit and step time.

    zero.py         per-rank parameter / gradient / optimizer elements and bytes (DeepSpeed's rules)
    activations.py  bytes autograd keeps per micro-batch, with and without checkpointing
    planner.py      run config + node count -> Plan; GPU specs; smallest fitting node count
    report.py       text and JSON output
"""

from pipeline.planning.activations import ActivationMemory, activation_memory
from pipeline.planning.planner import GPUS, GPUSpec, Plan, Planner, get_gpu, model_config
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
