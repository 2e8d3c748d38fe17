"""Expert parallelism applied to a pure-PyTorch MoE model, and registered with ZeRO-3.

The model's `MoE` layer routes and permutes tokens itself and calls `moe.experts(x_sorted, counts)`
on rows grouped by global expert id. Expert parallelism swaps only that `experts` module for an
`ExpertParallelExperts` that keeps `n_experts / ep` experts on each rank and moves tokens to the
rank owning their expert with a differentiable all-to-all over the expert-parallel (EP) group.

ZeRO-3 must then partition each rank's expert slice over the *expert-data-parallel* (EDP) group
(the ranks holding the same experts), not over all ranks. DeepSpeed 0.19.8 does that for
parameters tagged with its AutoEP placement attributes. Those are private names, so they live
here and nowhere else: leaving out any one of them trains with
wrong losses and no error, which `tests/distributed/test_expert_parallel.py` guards against.

Rank layout (DeepSpeed's legacy ordering): EP groups are consecutive ranks ([0,1], [2,3] for
ep=2 on 4 ranks); EDP groups stride by ep ([0,2], [1,3]). EP rank r owns experts
[r * n_local, (r + 1) * n_local).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ExpertGroups:
    name: str  # DeepSpeed's group name, "ep_size_<ep>"
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    edp_size: int


def check_expert_parallel_size(ep_size: int, world_size: int, n_experts: int) -> None:
    if ep_size < 1:
        raise ConfigError(f"parallel.expert_parallel_size ({ep_size}) must be >= 1")
    if world_size % ep_size:
        raise ConfigError(
            f"world size ({world_size}) must be divisible by parallel.expert_parallel_size ({ep_size}); "
            f"launch a multiple of {ep_size} ranks or change the expert-parallel size"
        )
    if n_experts % ep_size:
        raise ConfigError(
            f"model.n_experts ({n_experts}) must be divisible by parallel.expert_parallel_size ({ep_size})"
        )


def create_expert_groups(ep_size: int) -> ExpertGroups:
    """Create (or fetch) DeepSpeed's EP / EDP groups. Call after init_distributed, before building the engine."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._EXPERT_PARALLEL_GROUP:
        groups._create_expert_and_data_parallel(expert_parallel_size_=ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    return ExpertGroups(
        name=name,
        ep_size=ep_size,
        ep_rank=dist.get_rank(group=ep_group),
        ep_group=ep_group,
        edp_group=edp_group,
        edp_size=dist.get_world_size(group=edp_group),
    )


def tag_expert_parameters(module: nn.Module, groups: ExpertGroups) -> None:
    """Mark parameters so ZeRO-3 partitions them over the EDP group and never all-reduces them
    over the full data-parallel group. All five attributes are required (see the module docstring)."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = groups.name
        p.ds_zero_placement_family = "autoep_expert"
        p.ds_zero_partition_group_name = groups.name
        p.ds_zero_partition_process_group = groups.edp_group


def is_expert_parameter(p: torch.Tensor) -> bool:
    return getattr(p, "ds_zero_placement_family", None) == "autoep_expert"


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits; backward sends gradients home."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """Drop-in for `GroupedExperts` holding this rank's slice of experts.

    forward(x_MD, counts_E): rows grouped by *global* expert id (as the MoE layer permutes them),
    returns outputs in the same row order, exactly as the unsharded module would.
    """

    def __init__(self, experts: nn.Module, groups: ExpertGroups):
        super().__init__()
        n_experts = experts.num_experts
        if n_experts % groups.ep_size:  # refused at start-up already (ParallelDims.check)
            raise ValueError(f"{n_experts} experts cannot be split over {groups.ep_size} ranks")
        self.n_global = n_experts
        self.n_local = n_experts // groups.ep_size
        self.groups = groups
        start = groups.ep_rank * self.n_local
        self.local = experts.shard(start, start + self.n_local)

    @property
    def num_experts(self) -> int:
        return self.n_global

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """padded: rows after sum(counts_E) are padding (capacity drop); they stay here, output zero."""
        ep, n_local, group = self.groups.ep_size, self.n_local, self.groups.ep_group
        send_counts = counts_E.to(torch.long).reshape(ep, n_local)  # [ep dest, local expert]
        recv_counts = torch.empty_like(send_counts)  # [ep src, local expert]
        # One small exchange tells every rank how many rows each peer sends to each of its
        # experts; the row splits must be known on the host before the token all-to-all.
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        # The one host sync of an MoE layer per pass: all_to_all needs its splits as Python ints,
        # so both count tables come over in one .tolist(); backward reuses them (_AllToAll's ctx),
        # and the local experts get their counts on the host too (their loop path reads them).
        send_table, recv_table = torch.stack([send_counts, recv_counts]).tolist()  # 2 x [ep][n_local]
        send_splits = [sum(row) for row in send_table]
        recv_splits = [sum(row) for row in recv_table]
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        padding = x_MD.shape[0] - n_send
        if padding and not padded:
            raise ValueError(f"{x_MD.shape[0]} rows but counts_E sums to {n_send}")

        x_recv = all_to_all(x_MD[:n_send], recv_splits, send_splits, group)  # [R, D], ordered (src, expert)
        # Regroup rows from (src rank, local expert) to (local expert, src rank) order; output_size
        # (known from the splits) keeps repeat_interleave from syncing again to learn it.
        expert_of_row = torch.repeat_interleave(
            torch.arange(n_local, device=x_MD.device).repeat(ep),
            recv_counts.flatten(),
            output_size=n_recv,
        )
        order = torch.argsort(expert_of_row, stable=True)
        local_counts = [sum(col) for col in zip(*recv_table, strict=True)]  # [n_local] rows per local expert
        # index_select, not x[order]: its backward is index_add_, far faster on CPU than index_put_.
        y_sorted = self.local(x_recv.index_select(0, order), recv_counts.sum(0), host_counts=local_counts)
        y_recv = y_sorted.index_select(0, torch.argsort(order))  # undo the regrouping
        y_MD = all_to_all(y_recv, send_splits, recv_splits, group)  # [n_send, D], original row order
        return F.pad(y_MD, (0, 0, 0, padding)) if padding else y_MD  # padding rows output zero


def apply_expert_parallel(model: nn.Module, groups: ExpertGroups) -> int:
    """Swap every MoE layer's `experts` for its expert-parallel slice and tag the slices for ZeRO-3.

    Works on a model built on the meta device too; re-run `tag_expert_parallel_parameters` after
    materialising it, since `to_empty` replaces the parameter objects that carry the tags.
    Returns the number of layers swapped.
    """
    swapped = 0
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if experts is not None and hasattr(experts, "shard") and hasattr(module, "router"):
            module.experts = ExpertParallelExperts(experts, groups)
            swapped += 1
    tag_expert_parallel_parameters(model)
    return swapped


def tag_expert_parallel_parameters(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            tag_expert_parameters(module.local, module.groups)
