"""Rank script for tests/planning/test_comm.py: build the trainer's engine the trainer's way, measure the
start-up peak RSS of `build_model`, then count every collective of one optimizer step.

    torchrun --standalone --nproc_per_node 4 tests/planning/scripts/comm_counts.py RUN_OVERRIDES_JSON OUT_DIR

Collectives are counted by wrapping the torch.distributed functions before DeepSpeed's comm backend
binds them (it keeps references to all_gather_into_tensor / reduce_scatter_tensor from start-up), so
DeepSpeed's ZeRO-3 gathers and reduce-scatters and the expert-parallel all-to-all are all seen.
Writes OUT_DIR/rank{R}.json per rank.
"""

import ctypes
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

COUNTS: dict[str, dict] = defaultdict(lambda: {"calls": 0, "in_bytes": 0, "out_bytes": 0})
COUNTING = {"on": False}


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _wrap(name: str, out_arg: bool):
    original = getattr(dist, name)

    def wrapped(*args, **kwargs):
        if COUNTING["on"]:
            group = kwargs.get("group")
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            key = f"{name}/{size}"
            c = COUNTS[key]
            c["calls"] += 1
            if out_arg:  # f(output, input, ...)
                c["out_bytes"] += _nbytes(args[0] if args else kwargs.get("output_tensor", kwargs.get("output")))
                c["in_bytes"] += _nbytes(args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input")))
            else:  # f(tensor, ...)
                c["in_bytes"] += _nbytes(args[0] if args else kwargs.get("tensor"))
        return original(*args, **kwargs)

    setattr(dist, name, wrapped)


for _name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "all_gather", "reduce_scatter",
              "_all_gather_base", "_reduce_scatter_base"):
    if hasattr(dist, _name):
        _wrap(_name, out_arg=True)
for _name in ("all_reduce", "broadcast"):
    _wrap(_name, out_arg=False)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    import deepspeed

    from pipeline.checkpoint.format import owned_bytes, persistent_buffers
    from pipeline.distributed.process_group import init_distributed
    from pipeline.planning import model_config
    from pipeline.train.config import load_run_config
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_model
    from pipeline.train.optim import param_groups

    run = load_run_config(None, json.loads(sys.argv[1]))
    view = init_distributed()
    rank, world = view.rank, view.world
    cfg = model_config(run)
    ds = build_ds_config(run, world_size=world, use_cuda=False)

    # Start-up peak: one build first pays the one-time costs (imports, expert groups, DeepSpeed's
    # first zero.Init); then reset the kernel's high-water mark, build again, read it back.
    build_model(run, cfg, world, ds)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # RSS before the build = what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before = _status_kib("VmRSS") * 1024
    model = build_model(run, cfg, world, ds)
    startup_peak = _status_kib("VmHWM") * 1024 - rss_before
    partitioned = all(hasattr(p, "ds_tensor") for p in model.parameters())

    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds)
    torch.manual_seed(100 + rank // run.parallel.sequence_parallel_size)  # an SP group shares its samples
    t = run.train

    def step():
        for _ in range(t.grad_accum_steps):
            x = torch.randint(0, cfg.vocab_size, (t.micro_batch_size, run.data.seq_len + 1))
            _, loss, aux = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss + aux)
        engine.step()

    step()  # the first step records DeepSpeed's module trace; count a steady-state step
    dist.barrier()
    COUNTING["on"] = True
    step()
    COUNTING["on"] = False
    buffers = sum(b.numel() * b.element_size() for b in persistent_buffers(engine.module).values())
    result = {"rank": rank, "world": world, "startup_peak_bytes": startup_peak,
              "snapshot_bytes": owned_bytes(engine.module), "buffer_bytes": buffers if rank == 0 else 0,
              "partitioned_before_initialize": partitioned, "counts": dict(COUNTS)}
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
