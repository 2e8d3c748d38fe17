"""Everything distributed, in one package: nothing outside it calls `torch.distributed` for
bookkeeping (tests/test_layers.py checks it).

    ranks.py             RankView (rank, world, local rank); `current()` is 0 / 1 / 0 without a process group
    process_group.py     init_distributed (gloo on CPU, NCCL on GPUs) and shutdown
    collectives.py       rank-0 verdicts (from_rank0, agree_on_error), gathers, any_rank, sums, barrier
    parallel_dims.py     ParallelDims: world / expert-parallel / sequence-parallel sizes checked once,
                         data-parallel coordinates
    expert_parallel.py   expert parallelism: EP / EDP groups, the all-to-all, ZeRO-3 tags
    sequence_parallel.py Ulysses sequence parallelism: SP groups, attention cores, router counts
    hang_policy.py       when a run is hung and which rank stopped it (allowances per phase; no ranks needed)
    hang_watchdog.py     heartbeats through the rendezvous store, the watch thread, stacks in RUN/hang/, exit 4

The model stays pure PyTorch: expert and sequence parallelism are applied to it from here.
"""

from pipeline.distributed.ranks import RankView, current

__all__ = ["RankView", "current"]
