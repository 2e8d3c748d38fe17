"""One ZeRO-3 gradient bucket per partition group, so expert layers do not flush the dense bucket.

DeepSpeed 0.19.8's stage 3 keeps one reduce-scatter bucket per communication dtype
(`runtime/zero/stage3.py`, `reduce_independent_p_g_buckets_and_remove_grads`) and flushes it
whenever the next gradient belongs to another partition group. With expert parallelism the expert
slices are partitioned over the expert-data-parallel group (distributed/expert_parallel.py) and
everything else over all ranks, so backward alternates groups at every MoE layer: each one forces a
blocking reduce-scatter of the bucket collected so far (1 -> 9 per step for the debug model; the
ranks then wait on each other in the next all-to-all).

`keep_bucket_per_partition_group` gives each (dtype, partition group) its own bucket: a bucket
flushes when it is full or at the end of backward, never because a gradient of another group
arrived. Each gradient is reduce-scattered over the same group with the same averaging as before;
only which gradients share one collective changes (tests/train/test_zero3_buckets.py compares every
parameter's gradient with and without). Cost: one more `reduce_bucket_size` buffer per extra
partition group (the planner counts it, planning/zero.py). The same change as a patch to stage3.py,
for upstream: docs/deepspeed_zero3_ep_buckets.md.

It replaces two methods on the optimizer *instance* and its `ipg_buckets` dict; it relies on
private names of exactly DeepSpeed 0.19.8 and refuses any other version.
"""

from __future__ import annotations

from pipeline.errors import ConfigError

PINNED_DEEPSPEED = "0.19.8"
# Name-mangled private method that reduce-scatters the active bucket of one dtype (stage3.py).
_REDUCE_BUCKET = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"


def check_deepspeed_version(version: str) -> None:
    if version != PINNED_DEEPSPEED:
        raise ConfigError(
            f"deepspeed {version} is installed; pipeline/train/zero3_buckets.py patches the private ZeRO-3 "
            f"bucket code of deepspeed=={PINNED_DEEPSPEED} only: pip install deepspeed=={PINNED_DEEPSPEED} "
            f"(requirements.txt)"
        )


class BucketsPerPartitionGroup(dict):
    """`optimizer.ipg_buckets` with one bucket per (dtype, partition group).

    DeepSpeed indexes it by dtype (`self.ipg_buckets[dtype]`): that returns the bucket of the group
    last activated for the dtype. `values()` / `items()` return every bucket, so what DeepSpeed does
    to all buckets (clearing stale params in `step`, offloading the contiguous buffers) reaches the
    extra ones too. Buckets are kept in first-use order, which is the same on every rank (same
    parameter shapes in the same backward order), so every group flushes in the same order.
    """

    def __init__(self, buckets: dict, make_bucket):
        super().__init__(buckets)
        self._make_bucket = make_bucket  # dtype -> a new empty bucket with its own buffer
        self._unclaimed = dict(buckets)  # DeepSpeed's own buckets, claimed by the first group of their dtype
        self.by_group: dict[tuple, object] = {}

    def activate(self, dtype, group) -> None:
        key = (dtype, group)
        if key not in self.by_group:
            claimed = self._unclaimed.pop(dtype, None)
            self.by_group[key] = claimed if claimed is not None else self._make_bucket(dtype)
        dict.__setitem__(self, dtype, self.by_group[key])

    def values(self):
        return list(self.by_group.values()) or list(dict.values(self))

    def items(self):
        return [(dtype, b) for (dtype, _), b in self.by_group.items()] or list(dict.items(self))

    def clear(self):  # the optimizer's destroy(): free every bucket's buffer, not only the active ones
        self.by_group.clear()
        self._unclaimed.clear()
        super().clear()


def keep_bucket_per_partition_group(optimizer) -> bool:
    """Patch a ZeRO-3 optimizer in place (see the module docstring). Returns False, changing
    nothing, for any other optimizer (ZeRO-2 has no partition groups to alternate)."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3, IPGBucketZ3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return False
    check_deepspeed_version(deepspeed.__version__)
    if isinstance(optimizer.ipg_buckets, BucketsPerPartitionGroup):
        return True

    def make_bucket(dtype):
        bucket = IPGBucketZ3()
        template = dict.get(optimizer.ipg_buckets, dtype)
        if template is not None and template.buffer is not None:  # contiguous_gradients: own flat buffer
            bucket.buffer = torch.empty_like(template.buffer)
        return bucket

    buckets = BucketsPerPartitionGroup(optimizer.ipg_buckets, make_bucket)
    optimizer.ipg_buckets = buckets
    reduce_bucket = getattr(optimizer, _REDUCE_BUCKET)
    add_grad = optimizer.reduce_independent_p_g_buckets_and_remove_grads
    epilogue = optimizer.independent_gradient_partition_epilogue

    def add_grad_to_its_group_bucket(param):
        # The stock method then sees a bucket of param's own group: no cross-group flush, and
        # its size check flushes this group's bucket only when it is full.
        buckets.activate(optimizer.get_param_comm_dtype(param), optimizer._get_param_partition_group(param))
        add_grad(param)

    def flush_every_bucket_then_epilogue():
        for dtype, group in list(buckets.by_group):
            buckets.activate(dtype, group)
            reduce_bucket(dtype)  # no-op for an empty bucket
        epilogue()  # flushes the (now empty) active buckets and finishes as before

    optimizer.reduce_independent_p_g_buckets_and_remove_grads = add_grad_to_its_group_bucket
    optimizer.independent_gradient_partition_epilogue = flush_every_bucket_then_epilogue
    return True
