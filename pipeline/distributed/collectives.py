"""The collectives the run's bookkeeping needs, each written once. Every function here is a
collective when a process group of several ranks is up (every rank must call it, in the same
order) and a plain local computation otherwise, so single-process tools and tests call the same
code.

    from_rank0(value, group)       rank 0's value on every rank
    agree_on_error(action, view)   rank 0 runs a check; every rank raises its ConfigError
    gather_objects(obj, dst, group) every rank's object, on every rank (dst=None) or on rank dst
    first_error(error)             the first rank's error (or None), on every rank
    any_rank(flag, device)         True on every rank iff one rank's flag is set
    max_over_ranks(values, device) element-wise maximum of a few integers over ranks
    sum_over_ranks(t, device)      sum (or mean) of a small tensor over ranks, on the CPU
    all_reduce_sum_(t, group)      in-place SUM all-reduce of a device tensor (no host sync)
    all_gather_into(out, part, group) every rank's `part` into `out`, in rank order
    new_world_group()              a second group of every rank (test-only faults: a collective no peer joins)
    barrier(group)

`group`: None for the default group (every rank); a side group of all ranks (e.g. the checkpoint
writer's, pipeline/checkpoint/async_writer.py) lets a background thread agree without touching the
default group the training loop's collectives run on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from pipeline.distributed.ranks import RankView, current, initialized
from pipeline.errors import ConfigError


def _several() -> bool:
    return initialized() and dist.get_world_size() > 1


def from_rank0(value, group=None):
    """Rank 0's `value` (picklable) on every rank: a collective when there are several ranks."""
    if _several():
        box = [value]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]
    return value


def agree_on_error(action: Callable[[], object], view: RankView | None = None):
    """Run `action` on rank 0; every rank raises the ConfigError it raised (one line each, no rank
    left waiting in a collective). Returns its result on rank 0, None elsewhere."""
    view = view or current()
    result, error = None, None
    if view.rank == 0:
        try:
            result = action()
        except ConfigError as e:
            error = str(e)
    if error := from_rank0(error):
        raise ConfigError(error)
    return result


def gather_objects(obj, dst: int | None = None, group=None) -> list | None:
    """Every rank's `obj` (picklable), in rank order: on every rank (dst None, an all-gather) or only
    on rank `dst` (the others get None). One rank alone: [obj]."""
    if not _several():
        return [obj]
    world = dist.get_world_size()
    if dst is None:
        out: list = [None] * world
        dist.all_gather_object(out, obj, group=group)
        return out
    out = [None] * world if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def first_error(error: str | None) -> str | None:
    """The lowest rank's error (None if no rank has one), on every rank: for work dealt over the
    ranks (each file verified by one reader only), where every rank must learn of a failure."""
    return next((e for e in gather_objects(error) if e), None)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is set on at least one (a MAX all-reduce on `device`)."""
    return bool(max_over_ranks([1 if flag else 0], device)[0])


def max_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Element-wise maximum of a few integers over ranks, on every rank (one MAX all-reduce on `device`)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if _several():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """SUM `t` over the ranks of `group` (None: all) in place and return it; stays on its device."""
    if initialized():
        dist.all_reduce(t, group=group)
    return t


def all_gather_into(out: torch.Tensor, part: torch.Tensor, group=None) -> torch.Tensor:
    """`out` [ranks * part.numel()] <- every rank's `part` of `group`, in rank order (one rank: a copy)."""
    if initialized():
        dist.all_gather_into_tensor(out, part, group=group)
    else:
        out.copy_(part.reshape(-1))
    return out


def new_world_group():
    """A new group of every rank, which the run itself never uses (None without several ranks): a
    collective one rank enters on it is one its peers never join (health.FaultInjection's
    `collective` fault). A collective: every rank creates it."""
    return dist.new_group() if _several() else None


def sum_over_ranks(t: torch.Tensor, device: torch.device, mean: bool = False) -> torch.Tensor:
    """Sum (or mean) over ranks of a small tensor, returned on the CPU; reduced on `device` because
    NCCL only reduces GPU tensors. Never reduces into the caller's tensor."""
    t = all_reduce_sum_(t.to(device, copy=True)).cpu()
    return t / current().world if mean else t


def barrier(group=None) -> None:
    if _several():  # one rank: nothing to wait for (and a background thread must not touch its group)
        dist.barrier(group=group)
