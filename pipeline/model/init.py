"""Deterministic, sliceable weight init: every tensor (every expert) has its own generator.

With one global RNG stream, a tensor's values depend on everything drawn before it, so a rank
that builds only its slice of the experts could never reproduce the full model's values. Keying a
generator per tensor name (and per global expert id) makes any subset materialisable on its own,
in any order: the trainer builds on the meta device and initialises only what a rank keeps, and the
result equals the same slice of a model built whole (drawn on the same kind of device, see
`seeded_normal_`).
"""

from __future__ import annotations

import hashlib

import torch


def new_init_seed() -> int:
    """One draw from torch's global CPU RNG: `torch.manual_seed(s); GPTOSS(cfg)` stays reproducible."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def seeded_normal_(tensor: torch.Tensor, std: float, seed: int, key: str, device: torch.device | None = None) -> None:
    """tensor <- N(0, std) drawn in fp32 from the generator of (seed, key) on `device` (default: the
    tensor's own device); meta: no-op.

    Drawing on the GPU is what makes start-up fast (a CPU draws 44-65 M values/s on one thread:
    minutes per rank for gpt-oss-20b). CUDA's generator (Philox) gives other values than the CPU's
    (Mersenne Twister) for the same seed, so a model drawn on a GPU differs from one drawn on the
    CPU; for one draw device every tensor still depends only on (seed, key), so every layout (ranks,
    expert parallelism, ZeRO stage, visiting order) gets the same model.
    """
    if tensor.is_meta:
        return
    device = tensor.device if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(key_seed(seed, key))
    tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device).mul_(std))
