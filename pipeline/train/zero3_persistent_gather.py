"""One all-gather per partition group, not one per parameter, for ZeRO-3's persistent parameters.

Parameters at or below `stage3_param_persistence_threshold` elements stay whole between steps. The
optimizer still updates only this rank's partition of them, so DeepSpeed 0.19.8 re-gathers every one
after each step (`runtime/zero/stage3.py` `_post_step`: `persistent_parameters[0].all_gather(...)`).
That call goes through `partition_parameters.py` `_all_gather` -> `_allgather_params_coalesced`,
which, despite its name, launches one all-gather per parameter: 71 per step for the debug preset
(every one of its parameters is persistent), ~30 per layer at gpt-oss scale (norms, biases, sinks,
routers). Each is a round trip that every rank of the group must join.

The parameter fetch of the forward pass already has the flat version (`all_gather_coalesced`: this
rank's partitions concatenated into one buffer, one collective per (partition group, dtype), split
back per parameter). `gather_persistent_in_one_collective` routes the post-step gather there. Every
parameter receives the same bytes as before (a gather only copies); only the number of collectives
changes (tests/train/test_zero3_buckets.py compares every gradient and loss over two steps, which
read the re-gathered parameters, with and without it). Memory: one transient flat buffer of the
persistent parameters (below the threshold by definition: a few MB per layer stack at gpt-oss scale).
On 2 loaded CPU ranks the 71 gathers cost ~3 ms of CPU but ~130 ms of waiting per step
(benchmarks/bench_ep.py, bench_hf_trainer.py).

It replaces the `all_gather` attribute of the optimizer's first persistent parameter (DeepSpeed sets
one closure per parameter), relies on private names of exactly DeepSpeed 0.19.8 and refuses any
other version. Calls it cannot serve identically fall through to DeepSpeed's own: asynchronous
gathers, parameters already in flight, and ZeRO++ (secondary partitions or quantized weights, which
the flat path would read instead of the freshly updated primary partition).
"""

from __future__ import annotations

from pipeline.train.zero3_buckets import check_deepspeed_version


def _flat_path_is_identical(params) -> bool:
    """False where DeepSpeed's flat gather would read other data than its per-parameter one."""
    return not any(getattr(p, "ds_secondary_tensor", None) is not None
                   or hasattr(p.ds_tensor, "ds_quant_scale") for p in params)


def gather_persistent_in_one_collective(optimizer) -> bool:
    """Patch a ZeRO-3 optimizer in place (see the module docstring). Returns False, changing
    nothing, for any other optimizer or one without persistent parameters."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or not optimizer.persistent_parameters:
        return False
    check_deepspeed_version(deepspeed.__version__)
    first = optimizer.persistent_parameters[0]
    per_parameter = first.all_gather
    if getattr(per_parameter, "gathers_in_one_collective", False):
        return True

    def all_gather(param_list=None, async_op=False, hierarchy=0):
        params = [first] if param_list is None else list(param_list)
        missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if (async_op or len(missing) < 2 or not _flat_path_is_identical(missing)
                or any(p.ds_status == ZeroParamStatus.INFLIGHT for p in params)):
            return per_parameter(param_list, async_op=async_op, hierarchy=hierarchy)
        first.all_gather_coalesced(missing).wait()  # sets every one AVAILABLE, as the per-parameter path does
        return None  # what DeepSpeed's synchronous path returns

    all_gather.gathers_in_one_collective = True
    first.all_gather = all_gather
    return True
