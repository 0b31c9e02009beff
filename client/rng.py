"""Every random stream a training step draws from, as plain data a snapshot can hold."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's CPU and every CUDA device's generator state."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned (after a restore, its tuples intact)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(f"snapshot holds {len(cuda_states)} CUDA RNG states, this process "
                             f"sees {torch.cuda.device_count()} devices")
        torch.cuda.set_rng_state_all(cuda_states)
