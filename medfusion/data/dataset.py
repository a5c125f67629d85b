"""`SegDataset`: samples of data/processed/<name> as tensors, with augmentation for training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medfusion.config import AugmentParams
from medfusion.data.distance import distance_map
from medfusion.data.io import read_json


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-image z-score over all pixels and channels (METHOD.md section 3); (C, H, W) -> float32."""
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1e-6)


class SegDataset(Dataset):
    """The samples of `case_ids` (all their slices, for volumes) from a processed dataset folder.

    Args:
        processed_dir: data/processed/<name> (images.npy, masks.npy, cases.json).
        case_ids: the test cases to include.
        augment: the training augmentation (`medfusion.data.augment.build_transform`) with these
            settings; True = AugmentParams' defaults (params.yaml's); False or None = none
            (validation and test).
        seed: the run's seed; the augmentation of item i at epoch e is a pure function of (seed, e, i).
        distance: also return d(x), the distance of each pixel to the nearest label edge after
            augmentation (DRGO's boundary weights), computed here in the loader workers.

    Indexing: `dataset[i]` augments as at epoch `self.epoch` (`set_epoch`); `dataset[(e, i)]` as at
    epoch e. The training loader uses the second through `EpochSampler`, so the epoch reaches
    persistent workers, which never see a `set_epoch` made in the main process.

    Items: dict(image (C, S, S) float32 z-scored, mask (S, S) int64, index int, epoch int
    [, distance (S, S) float32]).
    """

    def __init__(
        self,
        processed_dir: Path,
        case_ids: list[str],
        augment: AugmentParams | bool | None = False,
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
        if augment is True:
            augment = AugmentParams()
        self.augment: AugmentParams | None = augment or None
        self.transform = self.augment_sample = None
        if self.augment:  # albumentations is imported only where training augments (0.6 s)
            from medfusion.data.augment import augment_sample, build_transform

            self.transform, self.augment_sample = build_transform(self.augment), augment_sample
        self.seed = seed
        self.epoch = 0
        self.distance = distance

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation plain integer indexing returns."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        j = self.indices[i]
        image, mask = np.asarray(self.images[j]), np.asarray(self.masks[j])
        if self.transform is not None:
            image, mask = self.augment_sample(self.transform, image, mask, self.seed, epoch, i)
        item = {
            "image": torch.from_numpy(zscore(np.ascontiguousarray(image))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "index": i,
            "epoch": epoch,
        }
        if self.distance:
            item["distance"] = torch.from_numpy(distance_map(mask))
        return item


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled (epoch, index) pairs for the training DataLoader.

    The order of epoch e is a pure function of (seed, e), and every index carries its epoch to the
    worker that loads it, so augmentation does not depend on the number of workers, on their
    persistence, or on what ran before (a resumed run replays an epoch). Call `set_epoch` before
    iterating: a DataLoader draws its indices when its iterator is created.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        sequence = np.random.SeedSequence(self.seed % 2**64, spawn_key=(self.epoch,))
        for i in np.random.default_rng(sequence).permutation(self.size):
            yield self.epoch, int(i)
