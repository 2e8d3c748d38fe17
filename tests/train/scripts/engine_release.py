"""Rank script for tests/train/test_engine_release.py: does a finished ZeRO-3 engine's module get
freed? Writes OUT (JSON): {"plain_del": alive after `del engine; gc.collect()`, "released": alive
after release_engine, "fused": the `fused` flag of the torch AdamW DeepSpeed built from the CUDA
config of implementation=auto (torch's fused AdamW also runs on CPU, so the CUDA config is built and
trained here)}.

    torchrun --nproc_per_node 1 tests/train/scripts/engine_release.py OUT
"""

import gc
import json
import sys
import weakref

import torch

from pipeline.config_utils import from_dict
from pipeline.distributed.process_group import init_distributed
from pipeline.model import get_preset
from pipeline.train.config import RunConfig
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine, release_engine
from pipeline.train.objective import compute_loss


def trained_engine(cuda_optimizer: bool = False):
    run = from_dict(RunConfig, {
        "model": {"preset": "debug"}, "data": {"train": ["unused"], "seq_len": 32},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0, "implementation": "auto"},
        "train": {"steps": 1, "micro_batch_size": 2, "seed": 0}, "precision": "fp32",
    })
    engine = build_engine(run, get_preset("debug"), build_ds_config(run, 1, use_cuda=cuda_optimizer), 1)
    batch = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    engine.backward(compute_loss(engine, batch).total)
    engine.step()
    return engine


def main() -> None:
    init_distributed()
    engine = trained_engine(cuda_optimizer=True)
    fused = engine.optimizer.optimizer.defaults.get("fused")
    module = weakref.ref(engine.module)
    del engine
    gc.collect()
    plain_del = module() is not None
    engine = trained_engine()
    module2 = weakref.ref(engine.module)
    release_engine(engine)
    del engine
    gc.collect()
    json.dump({"plain_del": plain_del, "released": module2() is not None, "fused": fused}, open(sys.argv[1], "w"))


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)
