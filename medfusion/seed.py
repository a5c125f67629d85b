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
    """Give each DataLoader worker its own augmentation stream, derived from the loader's generator."""
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**63  # base seed from the loader's generator + worker id
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if hasattr(info.dataset, "generator"):
        info.dataset.generator.manual_seed(seed)
