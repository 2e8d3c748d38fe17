"""Who this process is among the ranks of the run: one place for the "rank / world size, or 0 / 1
when no process group is up" fallback (single-process tools, tests and `python -m pipeline.evaluate`
on one device run without one)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RankView:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several ranks in an initialised process group: collectives are needed."""
        return self.world > 1 and initialized()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> RankView:
    """This process's rank view: from the default process group, or rank 0 of 1 without one."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not initialized():
        return RankView(0, 1, local)
    return RankView(dist.get_rank(), dist.get_world_size(), local)


def group_rank(group, default: int) -> int:
    """This rank's index in `group` (None: `default`, e.g. the global rank)."""
    return dist.get_rank(group=group) if group is not None else default


def group_size(group, default: int) -> int:
    """The size of `group` (None: `default`, e.g. the world size)."""
    return dist.get_world_size(group=group) if group is not None else default
