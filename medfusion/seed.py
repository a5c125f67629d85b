"""Seeding: one call at the entry point, explicit generators for DataLoaders."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns a torch.Generator for DataLoader shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def worker_init_fn(worker_id: int) -> None:
    """Seed a DataLoader worker's global numpy and python streams from the loader's generator.

    Augmentation does not use them: it draws from generators derived from (seed, epoch, index)
    (medfusion/data/augment.py), so that it does not depend on the number of workers; this only keeps
    any other library's global draws reproducible. (OpenCV's thread count is left alone here: calling
    cv2.setNumThreads in a forked worker after the parent has used OpenCV's thread pool deadlocks.)
    """
    seed = torch.initial_seed() % 2**63  # base seed from the loader's generator + worker id
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_states() -> dict:
    """The global generators' states (Python, numpy, torch CPU and CUDA), for a resumable checkpoint,
    as tensors and plain Python values only, so that `torch.load(weights_only=True)` reads them (numpy's
    MT19937 key becomes an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` saved (CUDA only where both the checkpoint and this machine have it)."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
