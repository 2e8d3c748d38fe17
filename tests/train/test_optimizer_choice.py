"""optim.implementation=auto on CUDA is torch's fused AdamW (no JIT build) because it gives the same
updates as DeepSpeed's FusedAdam; measured here on CPU (DeepSpeed's CPU FusedAdam build, torch's CPU
fused kernel) and, on a GPU, against the CUDA FusedAdam."""

from __future__ import annotations

import pytest
import torch

from pipeline.config_utils import from_dict
from pipeline.train.config import RunConfig
from pipeline.train.ds_config import build_ds_config

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _run(impl: str) -> RunConfig:
    return from_dict(RunConfig, {"model": {"preset": "debug"}, "data": {"train": ["unused"], "seq_len": 32},
                                 "optim": {"implementation": impl}, "train": {"micro_batch_size": 2}})


def test_auto_is_torch_adamw_fused_on_cuda_and_plain_on_cpu():
    on_cuda = build_ds_config(_run("auto"), 1, use_cuda=True)["optimizer"]["params"]
    assert on_cuda["torch_adam"] is True and on_cuda["fused"] is True
    on_cpu = build_ds_config(_run("auto"), 1, use_cuda=False)["optimizer"]["params"]
    assert on_cpu["torch_adam"] is True and "fused" not in on_cpu
    explicit = build_ds_config(_run("fused"), 1, use_cuda=True)
    assert explicit["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's FusedAdam, as asked


def _updates(make_optimizer, device, steps=5, dtype=torch.float32):
    """Parameters after `steps` AdamW steps on the same seeded gradients (a matrix, a vector, a bias)."""
    g = torch.Generator().manual_seed(0)
    shapes = ((300, 257), (257,), (7,))
    params = [torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for shape in shapes]
    opt = make_optimizer(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device, dtype)
        opt.step()
    return [p.detach().float().cpu() for p in params]


def _assert_same_updates(got, ref):
    for a, b in zip(got, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


@pytest.mark.slow  # DeepSpeed JIT-builds its CPU FusedAdam once per TORCH_EXTENSIONS_DIR (~50 s)
def test_torch_fused_adamw_equals_deepspeed_fused_adam_on_cpu():
    from deepspeed.ops.adam import FusedAdam

    ours = _updates(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), "cpu")
    deepspeed = _updates(lambda ps: FusedAdam(ps, adam_w_mode=True, **HYPER), "cpu")
    _assert_same_updates(ours, deepspeed)
    # And both are AdamW: plain (foreach) torch gives the same.
    _assert_same_updates(_updates(lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER), "cpu"), deepspeed)


@pytest.mark.gpu
def test_gpu_torch_fused_adamw_equals_deepspeed_fused_adam():
    from deepspeed.ops.adam import FusedAdam

    from pipeline.train.optim import check_optimizer_builds

    check_optimizer_builds({"optimizer": {"params": {"torch_adam": False}}})  # builds it, or says what to set
    ours = _updates(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), "cuda")
    deepspeed = _updates(lambda ps: FusedAdam(ps, adam_w_mode=True, **HYPER), "cuda")
    _assert_same_updates(ours, deepspeed)
