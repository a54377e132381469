"""Seeding and the random-number-generator state that checkpoints carry.

A resumed run must draw the same dropout masks and the same point samples as the run
that was never interrupted, so every rank saves its Python, NumPy and torch (CPU and
CUDA) generator states with each checkpoint and restores them on resume. Checkpoints
without them (older ones, or a resume on another world size) fall back to a seed derived
from (seed, rank, step): reproducible, but not the uninterrupted run's stream.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A seed for one purpose (rank, start step, ...) that never collides with another's,
    unlike ``seed + rank + step`` arithmetic."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state_file(rank: int) -> str:
    return f"rng_state_rank_{rank}.pt"


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng_state(directory: str, rank: int) -> None:
    torch.save(capture_rng_state(), os.path.join(directory, rng_state_file(rank)))


def restore_rng_state(directory: str, rank: int) -> bool:
    """Restore this rank's generators from a checkpoint folder; False if it has none."""
    path = os.path.join(directory, rng_state_file(rank))
    if not os.path.exists(path):
        return False
    # weights_only=False: the Python and NumPy states are tuples of plain objects, and
    # the file is one this run's own checkpoint wrote (verified before we get here).
    state = torch.load(path, map_location="cpu", weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
