"""`SegDataset`: samples of data/processed/<name> as tensors, with augmentation for training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from medfusion.config import AugmentParams
from medfusion.data.distance import OUTSIDE_ROI, distance_map
from medfusion.data.io import read_json


def zscore(image: np.ndarray, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Per-image z-score over all pixels and channels (METHOD.md section 3); (C, H, W) -> float32.
    `stats` (mean, std) of the whole image where `image` is a patch of it."""
    image = image.astype(np.float32)
    mean, std = stats if stats is not None else (float(image.mean()), float(image.std()))
    return (image - mean) / max(std, 1e-6)


FOREGROUND_PATCHES = 1 / 3  # share of training patches centred on a foreground pixel (nnU-Net's 0.33)


def patch_box(
    mask: np.ndarray, patch: int, rng: np.random.Generator, foreground: float = FOREGROUND_PATCHES
) -> tuple[int, int]:
    """Top-left (y, x) of a `patch` x `patch` training patch in an (H, W) image, which may start
    outside an image smaller than the patch (the rest is padding). With probability `foreground` and
    where the mask has foreground, the patch is centred on a uniformly drawn foreground pixel (clipped
    to stay inside the image where it can); otherwise its position is uniform over the image."""
    h, w = mask.shape
    hi_y, hi_x = max(h - patch, 0), max(w - patch, 0)
    if rng.random() < foreground:
        ys, xs = np.nonzero(mask)
        if len(ys):
            k = int(rng.integers(len(ys)))
            y = min(max(int(ys[k]) - patch // 2, 0), hi_y)
            x = min(max(int(xs[k]) - patch // 2, 0), hi_x)
            return y, x
    return int(rng.integers(0, hi_y + 1)), int(rng.integers(0, hi_x + 1))


def crop_padded(array: np.ndarray, y: int, x: int, height: int, width: int) -> np.ndarray:
    """array[..., y:y+height, x:x+width], zero-padded where the box leaves the array."""
    out = np.zeros((*array.shape[:-2], height, width), array.dtype)
    part = array[..., y : y + height, x : x + width]
    out[..., : part.shape[-2], : part.shape[-1]] = part
    return out


def pad_to_multiple(array: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Zero-pad the last two axes at the bottom and right up to a multiple of `multiple`."""
    h, w = array.shape[-2:]
    return crop_padded(array, 0, 0, -(-h // multiple) * multiple, -(-w // multiple) * multiple)


class StoredRows:
    """Rows of a .npy array on disk, read with os.pread: they pass through the page cache but are
    never mapped into this process, so its resident memory stays one read, not the file (a
    memory-mapped 3.8 GB images.npy read once counts 3.8 GB of resident pages). Opens the file
    lazily per process (DataLoader workers fork)."""

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r")
        self.path, self.shape, self.dtype, self.offset = Path(path), header.shape, header.dtype, header.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def row(self, j: int) -> np.ndarray:
        data = os.pread(self._file(), self.row_bytes, self.offset + int(j) * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        """One row (an int), or several stacked (a list of ints)."""
        if isinstance(rows, int | np.integer):
            return self.row(rows)
        return (
            np.stack([self.row(j) for j in rows]) if len(rows) else np.empty((0, *self.shape[1:]), self.dtype)
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}


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
        patch_size: native images: training patches of this side (None: whole images).
        roi: where the data has a field of view (fov.npy), masks hold OUTSIDE_ROI (255) outside it
            (eval.roi_loss: the loss then ignores those pixels, `medfusion.training.loop.inside_roi`).

    Indexing: `dataset[i]` augments as at epoch `self.epoch` (`set_epoch`); `dataset[(e, i)]` as at
    epoch e. The training loader uses the second through `EpochSampler`, so the epoch reaches
    persistent workers, which never see a `set_epoch` made in the main process.

    Items: dict(image (C, S, S) float32 z-scored, mask (S, S) int64, index int, epoch int
    [, distance (S, S) float32]).

    Native images (meta.json image_size "native"): an item is the image at its own size, cropped from
    its canvas and zero-padded to a multiple of 16 (`patch_size` None: validation and test, one per
    batch), or, with `patch_size`, a training patch (`patch_box`: a third of them centred on
    foreground), drawn reproducibly in (seed, epoch, index) and then augmented. Both are z-scored
    with the whole image's mean and std, as sliding-window inference sees them.
    """

    def __init__(
        self,
        processed_dir: Path,
        case_ids: list[str],
        augment: AugmentParams | bool | None = False,
        seed: int = 0,
        distance: bool = False,
        patch_size: int | None = None,
        roi: bool = False,
    ) -> None:
        processed_dir = Path(processed_dir)
        self.images = np.load(processed_dir / "images.npy", mmap_mode="r")  # (N, C, S, S) uint8
        self.masks = np.load(processed_dir / "masks.npy", mmap_mode="r")  # (N, S, S) uint8
        # items are read with pread, not through the maps: memory stays one sample (StoredRows)
        self.image_rows = StoredRows(processed_dir / "images.npy")
        self.mask_rows = StoredRows(processed_dir / "masks.npy")
        self.fov_rows = None  # roi: the field of view, marked in each mask as OUTSIDE_ROI
        if roi and (processed_dir / "fov.npy").is_file():
            self.fov_rows = StoredRows(processed_dir / "fov.npy")
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
        self.native = (processed_dir / "meta.json").is_file() and read_json(processed_dir / "meta.json")[
            "image_size"
        ] == "native"
        self.patch_size = patch_size if self.native else None
        if self.native:
            shapes = read_json(processed_dir / "meta.json")["cases"]
            self.sizes = [tuple(shapes[c["case_id"]]["shape"][:2]) for c in self.samples]

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation plain integer indexing returns."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        j = self.indices[i]
        stats = None
        if self.native:
            image, mask, stats = self._native(i, j, epoch)
        else:
            image, mask = self.image_rows.row(j), self._mask(j)
        if self.transform is not None:
            image, mask = self.augment_sample(self.transform, image, mask, self.seed, epoch, i)
        item = {
            "image": torch.from_numpy(zscore(np.ascontiguousarray(image), stats)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)),
            "index": i,
            "epoch": epoch,
        }
        if self.distance:
            item["distance"] = torch.from_numpy(distance_map(mask))
        if self.native and self.patch_size is None:  # padding z-scores to 0 (the mean), as inference pads
            h, w = self.sizes[i]
            item["image"][:, h:, :] = 0
            item["image"][:, :, w:] = 0
        return item

    def _mask(self, j: int) -> np.ndarray:
        """Row j's label map; with `roi`, OUTSIDE_ROI outside the field of view (before augmentation,
        so that the region moves with the image; rotations and scaling pad with background)."""
        mask = self.mask_rows.row(j)
        if self.fov_rows is None:
            return mask
        return np.where(self.fov_rows.row(j) > 0, mask, OUTSIDE_ROI).astype(np.uint8)

    def _native(self, i: int, j: int, epoch: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        """Sample i (row j) of a native dataset: its image and mask (a patch, or the whole image padded
        to a multiple of 16) and the whole image's (mean, std)."""
        h, w = self.sizes[i]
        image, mask = self.image_rows.row(j)[:, :h, :w], self._mask(j)[:h, :w]
        stats = (float(image.mean()), float(image.std()))
        if self.patch_size is None:
            return pad_to_multiple(image), pad_to_multiple(mask), stats
        sequence = np.random.SeedSequence(self.seed % 2**64, spawn_key=(epoch, i, 7))
        y, x = patch_box(mask, self.patch_size, np.random.default_rng(sequence))
        p = self.patch_size
        return crop_padded(image, y, x, p, p), crop_padded(mask, y, x, p, p), stats


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
