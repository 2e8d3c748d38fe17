"""The process group of a run: started once (gloo on CPU, NCCL on GPUs) under deepspeed, torchrun
or a plain `python`, and shut down once."""

from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed.ranks import RankView, current, initialized


def quiet_library_warnings() -> None:
    """DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 deprecates, once per bucket per
    step: hundreds of identical lines that would bury the training log."""
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning
    )


def init_distributed(timeout_s: float | None = None) -> RankView:
    """Start (or join) the default process group; works under deepspeed, torchrun or alone (one
    rank on 127.0.0.1:$MASTER_PORT, default 29500). `timeout_s`: how long a collective may wait
    for a peer before failing (None: DeepSpeed's default, 10 minutes)."""
    import deepspeed

    quiet_library_warnings()
    if not initialized():
        for key, default in (
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
        ):
            os.environ.setdefault(key, default)
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kwargs)
        release_shared_memory_names()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return current()


SHM_DIR = Path("/dev/shm")


def deepspeed_shm_segment() -> Path | None:
    """This rank's segment of DeepSpeed's shared-memory all-reduce, if this process maps it."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
           f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    try:
        with open("/proc/self/maps") as maps:
            mapped = any(line.rstrip().endswith(f" {SHM_DIR / name}") for line in maps)
    except OSError:  # no /proc: not Linux, no /dev/shm either
        return None
    return SHM_DIR / name if mapped else None


def release_shared_memory_names() -> None:
    """With every rank on one node (the deepspeed launcher sets LOCAL_SIZE), DeepSpeed 0.19.8's CPU
    backend all-reduces through shared memory: each rank creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB) and maps every peer's,
    and never unlinks its own, so each run left its ranks' segments in RAM until reboot (19.5 GB
    after a few hundred test runs, which starved the next run of memory). Each rank opens all peers'
    segments before init returns; after a barrier every rank unlinks the name of its own: the
    mappings stay valid, and the kernel frees the memory when the last rank exits, however it ends.
    Collective when several ranks run on the CPU backend."""
    if torch.cuda.is_available() or not initialized() or dist.get_world_size() == 1:
        return
    segment = deepspeed_shm_segment()
    dist.barrier()  # every rank has mapped every segment (its init does so before returning)
    if segment is not None:
        try:
            segment.unlink()
        except OSError:  # gone already: nothing held in RAM by name
            pass


def shutdown() -> None:
    """Destroy the default process group if one is up (NCCL aborts its communicators here)."""
    if initialized():
        dist.destroy_process_group()


def multi_rank_gloo() -> bool:
    """This process is one of several ranks of a gloo job: its gloo worker threads outlive
    destroy_process_group and can abort interpreter teardown (pipeline/process_exit.py)."""
    return initialized() and dist.get_world_size() > 1 and dist.get_backend() == "gloo"


def side_group_of_all_ranks() -> dist.ProcessGroup | None:
    """A gloo group of every rank, separate from the default group, for a background thread's
    small collectives (the checkpoint writer's agreement): two groups never share a connection or a
    sequence number, so that thread cannot interleave with the training loop's collectives.
    Collective (every rank calls it, in the same order); None with a single rank."""
    if not initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")
