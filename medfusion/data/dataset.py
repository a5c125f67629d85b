"""`SegDataset`: samples of data/processed/<name> as tensors, with augmentation for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medfusion.data.io import read_json
from medfusion.losses.drgo import distance_map


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-image z-score over all pixels and channels (METHOD.md section 3); (C, H, W) -> float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1e-6)


def flip_augment(
    image: np.ndarray, mask: np.ndarray, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal and vertical flips, each with probability 1/2.

    The full augmentation list of METHOD.md (rotation, scaling, elastic, noise, intensity, MixUp,
    CutMix) is not implemented yet; flips are what `train.augment` turns on today.
    """
    if torch.rand((), generator=generator) < 0.5:
        image, mask = image[..., ::-1], mask[..., ::-1]
    if torch.rand((), generator=generator) < 0.5:
        image, mask = image[..., ::-1, :], mask[..., ::-1, :]
    return image, mask


class SegDataset(Dataset):
    """The samples of `case_ids` (all their slices, for volumes) from a processed dataset folder.

    Args:
        processed_dir: data/processed/<name> (images.npy, masks.npy, cases.json).
        case_ids: the test cases to include.
        augment: apply `flip_augment`.
        seed: seeds the augmentation stream (mixed with the worker id and the epoch-independent index).
        distance: also return d(x), the distance of each pixel to the nearest label edge after
            augmentation (DRGO's boundary weights), computed here in the loader workers.

    Items: dict(image (C, S, S) float32 z-scored, mask (S, S) int64, index int[, distance (S, S) float32]).
    """

    def __init__(
        self,
        processed_dir: Path,
        case_ids: list[str],
        augment: bool = False,
        seed: int = 0,
        distance: bool = False,
    ) -> None:
        processed_dir = Path(processed_dir)
        self.images = np.load(processed_dir / "images.npy", mmap_mode="r")  # (N, C, S, S) uint8
        self.masks = np.load(processed_dir / "masks.npy", mmap_mode="r")  # (N, S, S) uint8
        cases = read_json(processed_dir / "cases.json")
        wanted = set(case_ids)
        unknown = wanted - {c["case_id"] for c in cases}
        if unknown:
            raise KeyError(f"{processed_dir}: case ids not in the processed data: {sorted(unknown)[:5]}")
        self.indices = [i for i, c in enumerate(cases) if c["case_id"] in wanted]
        self.samples = [cases[i] for i in self.indices]
        self.augment = augment
        self.distance = distance
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        image, mask = np.asarray(self.images[j]), np.asarray(self.masks[j])
        if self.augment:
            image, mask = flip_augment(image, mask, self.generator)
        item = {
            "image": torch.from_numpy(zscore(np.ascontiguousarray(image))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "index": i,
        }
        if self.distance:
            item["distance"] = torch.from_numpy(distance_map(mask))
        return item
