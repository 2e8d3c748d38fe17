"""Rank script for tests/distributed/test_ep_host_reads.py: count host reads of device values in one
expert-parallel forward + backward.

A host read (`.tolist()`, `.item()`, `bool(t)`, ...) is a device sync on a GPU. Under expert
parallelism the splits of the token all-to-all must reach the host, once per MoE layer per pass;
this counts every such read by its source line and writes RUN/host_reads_rank{R}.json.

    torchrun --nproc_per_node 2 tests/distributed/scripts/ep_host_reads.py OUT_DIR
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from pipeline.distributed.expert_parallel import apply_expert_parallel, create_expert_groups
from pipeline.distributed.process_group import init_distributed
from pipeline.model import GPTOSS, get_preset

HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.where: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/pipeline/" in f.filename)
            key = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
            self.where[key] = self.where.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    out = Path(sys.argv[1])
    view = init_distributed()
    rank, _ = view.rank, view.world
    groups = create_expert_groups(2)
    torch.manual_seed(0)
    cfg = get_preset("debug", n_experts=4, top_k=2)
    model = GPTOSS(cfg)
    apply_expert_parallel(model, groups)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
    model(ids[:, :-1], ids[:, 1:], return_logits=False)[1].backward()  # warm-up (lazy init)
    counter = CountHostReads()
    with counter:
        _, loss, aux = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        (loss + aux).backward()
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layer))
    (out / f"host_reads_rank{rank}.json").write_text(json.dumps({"moe_layers": n_moe, "where": counter.where}))
    dist.barrier()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
