"""Rank script for tests/model/test_activation_memory.py: activation memory per rank under sequence
parallelism 1, 2 and 4 at the same sequence length, as autograd saves it and as the allocator peaks.

    torchrun --standalone --nproc_per_node 4 tests/model/scripts/sp_memory.py OUT.json

For each SP size every rank builds the same model (fp32, SDPA's fused CPU kernel), applies Ulysses
sequence parallelism over groups of that size (none for 1) and runs one training forward (chunked
loss) of one sample of T tokens; it records the bytes autograd saves and the allocator's peak above
the start during forward, and during forward + backward minus the parameter gradients (which are
not activations). Rank 0 writes {sp: {"saved", "forward_peak", "peak"}} in bytes.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from pipeline.distributed.process_group import quiet_library_warnings
from pipeline.distributed.sequence_parallel import apply_sequence_parallel, create_sequence_groups
from pipeline.model import GPTOSS, get_preset
from tests.model.test_activation_memory import peak_allocated, saved_bytes

T = 1024
PRESET = dict(n_embd=128, intermediate_size=128, n_head=8, n_kv_head=4, head_dim=16, vocab_size=512, block_size=1024)


def measure(sp: int) -> dict:
    torch.manual_seed(0)
    model = GPTOSS(get_preset("debug", **PRESET))
    if sp > 1:
        apply_sequence_parallel(model, create_sequence_groups(sp))
    x = torch.randint(0, 512, (1, T + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = x[:, :-1], x[:, 1:]

    def forward():
        _, lm, aux = model(inputs, targets, return_logits=False)
        return lm + aux

    saved = saved_bytes(model, forward)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    dist.barrier()
    forward_peak = peak_allocated(forward)
    peak = peak_allocated(lambda: forward().backward()) - grads
    return {"saved": saved, "forward_peak": forward_peak, "peak": peak}


def main() -> None:
    quiet_library_warnings()
    deepspeed.init_distributed(dist_backend="gloo")
    results = {sp: measure(sp) for sp in (1, 2, 4)}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"T": T, "preset": PRESET, "results": results}, f)
    dist.barrier()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
