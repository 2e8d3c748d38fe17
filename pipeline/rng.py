"""The process-wide random streams (torch, CUDA, NumPy, Python): saved with every checkpoint per
rank, restored on resume, reseeded when per-rank streams cannot be re-dealt, and set aside around
code that seeds them (the evaluation harness)."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """A fresh, reproducible stream per rank, for when saved per-rank streams cannot be re-dealt."""
    value = (seed * 1_000_003 + step) * 4099 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
