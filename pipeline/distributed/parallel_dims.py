"""The parallel layout of a run, checked once at start-up: world size, expert-parallel size (EP)
and sequence-parallel size (SP), and the data-parallel coordinates that follow from them.

    dims = ParallelDims(world=8, ep=2, sp=2)
    dims.check(model_cfg, seq_len)           # ConfigError naming the key to change
    dims.dp_rank(rank), dims.dp_world        # the ranks of one SP group read the same samples

The rules themselves live with the parallelism they belong to (expert_parallel.py,
sequence_parallel.py); the planner calls the same checks for the layouts it considers.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.distributed.expert_parallel import check_expert_parallel_size
from pipeline.distributed.sequence_parallel import check_sequence_parallel_size, data_parallel_coords


@dataclass(frozen=True)
class ParallelDims:
    world: int
    ep: int = 1
    sp: int = 1

    def check(self, model_cfg, seq_len: int) -> ParallelDims:
        """Refuse a layout the model or the world size cannot take (expert-parallel first)."""
        check_expert_parallel_size(self.ep, self.world, model_cfg.n_experts)
        check_sequence_parallel_size(self.sp, self.world, model_cfg, seq_len)
        return self

    @property
    def dp_world(self) -> int:
        return data_parallel_coords(0, self.world, self.sp)[1]

    def dp_rank(self, rank: int) -> int:
        return data_parallel_coords(rank, self.world, self.sp)[0]
