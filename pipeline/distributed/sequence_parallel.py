"""Ulysses sequence parallelism applied to the pure-PyTorch GPT-OSS model, exact for its attention.

`parallel.sequence_parallel_size: N` splits every sample's sequence into N contiguous shards, one
per rank of a sequence-parallel (SP) group. Norms, router, experts, LM head and loss run on the
rank's own T/N tokens. Around the softmax part of attention an all-to-all turns sequence shards into
head shards and back (DeepSpeed-Ulysses), so each rank runs attention over the *whole* sequence for
H/N query heads:

    q [B, T/N, H, d] --all-to-all--> [B, T, H/N, d] -> core -> [B, T, H/N, d] --all-to-all--> [B, T/N, H, d]

What makes it exact for GPT-OSS:
- sinks: the core of rank r gets the sink logits of its heads [r H/N, (r+1) H/N) (a slice of the
  replicated parameter, so its gradient lands on the right entries);
- GQA: query heads are grouped per KV head in order, so splitting the H query heads and the G KV
  heads into N contiguous blocks keeps every query head with its KV head when N divides G. For
  N > G (N a multiple of G) each KV head is first repeated N/G times, one copy per rank that runs
  its query heads: K/V traffic then grows by N/G. Other N are refused.
- masks and positions: the model gets whole samples (every rank of a group reads the same one) and
  builds document ids, RoPE positions (restarting per document) and the causal / sliding-window /
  document masks for the whole sequence (pipeline/model/gpt_oss.py `SequenceShard`), so a window or
  a document that crosses a shard boundary is handled like any other.
- losses: each rank's LM loss is its share of the whole sequence's mean (scaled so the mean over the
  group is the unsplit loss); the router's load-balancing loss uses expert counts summed over the
  group (`reduce_counts`), so it equals the unsplit one too. DeepSpeed averages gradients over all
  ranks, which with these losses is the gradient of the global batch's mean loss.

DeepSpeed's own pieces: the all-to-all and its backward are DeepSpeed's `DistributedAttention`
(deepspeed.sequence.layer), wrapped around our core. What it cannot do for GPT-OSS is left to this
module: slicing the sinks per rank, KV heads fewer than N, the whole-sequence masks and positions,
and the loss / router scaling. Its `ds_config` "sequence_parallel_size" is not used: it would make
ZeRO average gradients over a sequence-data-parallel group built by DeepSpeed's mpu, whereas here
every rank is an ordinary data-parallel rank of ZeRO (and of the expert-parallel groups, which may
overlap the SP groups freely).

Rank layout: SP groups are consecutive ranks ([0, 1], [2, 3] for N = 2 on 4 ranks), so a group stays
inside a node; the data-parallel index of a rank is rank // N.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model import GPTOSSConfig, TopKRouter
from pipeline.model.attention import Attention
from pipeline.model.gpt_oss import SequenceShard


@dataclass(frozen=True)
class SequenceGroups:
    size: int
    rank: int  # index of this rank's shard in its group
    group: dist.ProcessGroup


def check_sequence_parallel_size(sp: int, world: int, model_cfg: GPTOSSConfig, seq_len: int) -> None:
    """The layout rules of the module docstring, each refused with the key to change."""
    if sp == 1:
        return
    if world % sp:
        raise ConfigError(
            f"world size ({world}) must be divisible by parallel.sequence_parallel_size ({sp}); "
            f"launch a multiple of {sp} ranks or change the sequence-parallel size"
        )
    if model_cfg.n_head % sp:
        raise ConfigError(
            f"model.n_head ({model_cfg.n_head}) must be divisible by parallel.sequence_parallel_size ({sp})"
        )
    G = model_cfg.kv_heads
    if G % sp and sp % G:
        raise ConfigError(
            f"parallel.sequence_parallel_size ({sp}) must divide model.n_kv_head ({G}) or be a multiple of it"
        )
    if seq_len % sp:
        raise ConfigError(
            f"data.seq_len ({seq_len}) must be divisible by parallel.sequence_parallel_size ({sp})"
        )


def data_parallel_coords(rank: int, world: int, sp: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): the ranks of one SP group read the same samples."""
    return rank // sp, world // sp


_GROUPS: dict[int, SequenceGroups] = {}


def create_sequence_groups(sp: int) -> SequenceGroups:
    """The SP group of this rank (consecutive ranks). Every rank must call it: new_group is collective."""
    if sp not in _GROUPS:
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = None
        for start in range(0, world, sp):
            group = dist.new_group(list(range(start, start + sp)))
            if start <= rank < start + sp:
                mine = group
        _GROUPS[sp] = SequenceGroups(size=sp, rank=rank % sp, group=mine)
    return _GROUPS[sp]


class _LocalCoreBTHd(nn.Module):
    """DeepSpeed's DistributedAttention hands [B, T, h, d] tensors to its local attention; our core
    takes [B, h, T, d]."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, q_BThd, k_BTgd, v_BTgd, mask=None, sinks_h=None, scale=1.0, dropout=0.0):
        y_BhTd = self.core(q_BThd.transpose(1, 2), k_BTgd.transpose(1, 2), v_BTgd.transpose(1, 2),
                           mask, sinks_h, scale, dropout)
        return y_BhTd.transpose(1, 2)  # [B, T, h, d]


class UlyssesAttention(nn.Module):
    """Drop-in for `AttentionCore` on one sequence shard: q [B, H, T/N, d], k/v [B, G, T/N, d] and a
    whole-sequence mask -> [B, H, T/N, d], exactly the rows the unsplit core gives for this shard."""

    def __init__(self, core: nn.Module, groups: SequenceGroups, n_head: int, n_kv_head: int):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.groups, self.n_head, self.n_kv_head = groups, n_head, n_kv_head
        # scatter heads (dim 2), gather the sequence (dim 1) of [B, T, H, d]; the inverse afterwards.
        self.ulysses = DistributedAttention(_LocalCoreBTHd(core), groups.group, scatter_idx=2, gather_idx=1)

    def forward(self, q_BHtd, k_BGtd, v_BGtd, mask, sinks_H, scale: float, dropout: float = 0.0):
        N, r = self.groups.size, self.groups.rank
        if self.n_kv_head < N:  # one copy of each KV head per rank that runs its query heads
            k_BGtd = k_BGtd.repeat_interleave(N // self.n_kv_head, dim=1)
            v_BGtd = v_BGtd.repeat_interleave(N // self.n_kv_head, dim=1)
        h = self.n_head // N
        sinks_h = None if sinks_H is None else sinks_H[r * h : (r + 1) * h]
        y_BtHd = self.ulysses(q_BHtd.transpose(1, 2), k_BGtd.transpose(1, 2), v_BGtd.transpose(1, 2), 0, None,
                              mask=mask, sinks_h=sinks_h, scale=scale, dropout=dropout)
        return y_BtHd.transpose(1, 2)  # [B, H, T/N, d]

    @property
    def local_core(self) -> nn.Module:
        """The core this one wraps (the model's own, for whole sequences on one rank)."""
        return self.ulysses.local_attn.core


def _sum_over_group(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    counts = counts.detach().clone()  # counts carry no gradient; never reduce into the caller's
    dist.all_reduce(counts, group=group)
    return counts


def apply_sequence_parallel(model: nn.Module, groups: SequenceGroups) -> int:
    """Make `model` compute this rank's sequence shard: Ulysses attention cores, whole-sequence
    router counts. Adds no parameters or buffers (checkpoints are unchanged). Returns the number of
    attention layers wrapped."""
    model.sequence_shard = SequenceShard(groups.rank, groups.size)
    wrapped = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.core = UlyssesAttention(module.core, groups, module.n_head, module.n_kv_head)
            wrapped += 1
        elif isinstance(module, TopKRouter):
            module.reduce_counts = functools.partial(_sum_over_group, group=groups.group)
    return wrapped


@contextmanager
def whole_sequences(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` (made sequence-parallel by `apply_sequence_parallel`) computes whole
    sequences on each rank alone, as before it was applied: its own attention cores, no sequence
    shard, router counts local. KV-cached generation needs it: every rank decodes whole requests of
    its own, so no step may wait on the SP group. The sequence-parallel state comes back on exit,
    also on an exception. Every rank of an SP group must enter it together (the group's collectives
    stop for all its ranks); a model without sequence parallelism passes through unchanged."""
    shard = model.sequence_shard
    cores = {m: m.core for m in model.modules() if isinstance(m, Attention) and isinstance(m.core, UlyssesAttention)}
    routers = {m: m.reduce_counts for m in model.modules() if isinstance(m, TopKRouter)}
    try:
        model.sequence_shard = None
        for attn, ulysses in cores.items():
            attn.core = ulysses.local_core
        for router in routers:
            router.reduce_counts = None
        yield
    finally:
        model.sequence_shard = shard
        for attn, ulysses in cores.items():
            attn.core = ulysses
        for router, reduce_counts in routers.items():
            router.reduce_counts = reduce_counts


def whole_sequence_forward(forward, groups: SequenceGroups):
    """`forward(ids [B, T]) -> logits [B, T, V]` for a model that computes one sequence shard (its
    forward returns [B, T/N, V]): every rank of the SP group passes the same ids, the sequence is
    right-padded to a multiple of N (causal: the pad cannot change earlier positions) and the shards'
    logits are all-gathered over the group. For evaluation (no gradient through the gather); each
    rank then holds the whole [B, T, V], as without sequence parallelism."""
    N = groups.size

    def run(ids_BT: torch.Tensor) -> torch.Tensor:
        T = ids_BT.shape[1]
        pad = -T % N
        if pad:
            ids_BT = torch.cat([ids_BT, ids_BT[:, -1:].expand(-1, pad)], dim=1)  # [B, T + pad]
        local_BtV = forward(ids_BT).contiguous()  # [B, (T + pad) / N, V]
        shards = [torch.empty_like(local_BtV) for _ in range(N)]
        dist.all_gather(shards, local_BtV, group=groups.group)
        return torch.cat(shards, dim=1)[:, :T]  # [B, T, V]

    return run
