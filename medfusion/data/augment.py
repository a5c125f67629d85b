"""Training augmentation (METHOD.md section 3): albumentations per sample, MixUp and CutMix per batch.

Per sample (`build_transform`, `augment_sample`), on uint8 images (H, W, C), C = 1 or 3, and uint8
class-index masks (H, W), in this order: horizontal flip, vertical flip, rotation, scaling, elastic
deformation (geometric: image and mask together), then brightness/contrast, gamma, Gaussian noise
(image only). Masks are resampled nearest-neighbour with a constant 0 (background) border, so they
hold only the class indices they held before; images use bilinear resampling with a constant 0 border
too, so a pixel brought in from outside is black in the image and background in the mask.

Per batch (`MixCollate`, the training DataLoader's collate_fn, so it runs in the workers), after the
per-sample augmentation and z-scoring:
* CutMix, per sample with probability `cutmix_p`: a box of another sample of the batch (its image AND
  its mask) is pasted in; labels stay hard, and d(x) of the new mask is recomputed.
* MixUp, per batch with probability `mixup_p`: image = lam x_a + (1 - lam) x_b, lam ~ Beta(alpha, alpha),
  x_b the batch rolled by a random offset; the batch keeps both masks (`mask`, `mix_mask`), both distance
  maps (`distance`, `mix_distance`) and `mix_lambda`, and the loss is lam L(y_a) + (1 - lam) L(y_b)
  (`medfusion.training.loop.mixup_loss`).
A batch can get both (CutMix first). Validation and test datasets are never augmented.

Reproducibility: every random number comes from generators derived from the run's seed, the epoch and
the sample index (`sample_generators`), or the epoch and the batch's sample indices (`MixCollate`), never
from a global or per-worker stream; so the augmentation of sample i at epoch e with seed s is a pure
function of (s, e, i), whatever the number of workers and the order they fetch in, and a resumed run
can replay an epoch. Each call hands albumentations one numpy and one python generator through
`Compose.set_random_state`: `Compose.set_random_seed(k)` would seed every transform with the same k,
so that all transforms draw the same numbers (both flips, with equal p, always fire together).
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from medfusion.config import AugmentParams
from medfusion.data.distance import distance_map

SAMPLE_STREAM, MIX_STREAM = 0, 1  # first spawn-key word: per-sample draws vs per-batch mixing draws


def build_transform(p: AugmentParams) -> A.Compose:
    """The per-sample albumentations pipeline of `p` (the `augment` section of params.yaml).

    Defaults of params.yaml and why (the paper lists the transforms, not their settings):
    * flips `hflip_p` = `vflip_p` = 0.5: endoscopy and fundus images have no canonical orientation;
      for CT/MRI slices a flip mirrors the anatomy, which the paper accepts by listing flips.
    * rotation, `rotate_p` 0.5, uniform in +-`rotate_limit` = 30 degrees: patient and camera pose vary
      by tens of degrees; larger angles mostly add black corners.
    * scaling, `scale_p` 0.5, isotropic factor uniform in `scale_range` [0.8, 1.2]: organ and polyp
      sizes vary by about this much between patients; scaling down leaves a black, background border.
    * elastic deformation, `elastic_p` 0.2, `elastic_alpha` 200 and `elastic_sigma` 10 (pixels at
      data.image_size): a smooth field of about 2 px RMS displacement (about 20 px at most) at 256x256, soft
      tissue-like; rarer than the rigid transforms because it is the most expensive and the least
      realistic at large strength.
    * brightness/contrast, `brightness_contrast_p` 0.3, `brightness_limit` = `contrast_limit` = 0.2
      (albumentations' defaults). Note: SegDataset z-scores each image afterwards, which undoes any
      global linear intensity change; what is left is the saturation of pixels pushed past 0 or 255.
    * gamma, `gamma_p` 0.3, gamma uniform in `gamma_range` [0.8, 1.25] (symmetric in log gamma):
      non-linear, so it survives the z-score; models exposure and window differences.
    * Gaussian noise, `noise_p` 0.2, std uniform in `noise_std_range` [0.01, 0.05] of 255 per channel:
      sensor noise well below the structures' contrast.

    Args:
        p: the probabilities and magnitudes.

    Returns:
        A Compose to call as `augment_sample` does; all probabilities 0 gives the identity.
    """
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    resample = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST}
    return A.Compose(
        [
            A.HorizontalFlip(p=p.hflip_p),
            A.VerticalFlip(p=p.vflip_p),
            A.Affine(rotate=(-p.rotate_limit, p.rotate_limit), p=p.rotate_p, **resample, **border),
            A.Affine(scale=tuple(p.scale_range), keep_ratio=True, p=p.scale_p, **resample, **border),
            A.ElasticTransform(
                alpha=p.elastic_alpha, sigma=p.elastic_sigma, p=p.elastic_p, **resample, **border
            ),
            A.RandomBrightnessContrast(
                brightness_limit=p.brightness_limit,
                contrast_limit=p.contrast_limit,
                p=p.brightness_contrast_p,
            ),
            A.RandomGamma(gamma_limit=(100 * p.gamma_range[0], 100 * p.gamma_range[1]), p=p.gamma_p),
            A.GaussNoise(std_range=tuple(p.noise_std_range), p=p.noise_p),
        ]
    )


def sample_generators(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, random.Random]:
    """The numpy and python generators of sample `index` at `epoch`: a pure function of the three."""
    sequence = np.random.SeedSequence(seed % 2**64, spawn_key=(SAMPLE_STREAM, epoch, index))
    rng = np.random.default_rng(sequence)
    return rng, random.Random(int(rng.integers(2**63)))


def augment_sample(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int, epoch: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one sample, reproducibly in (seed, epoch, index).

    Args:
        transform: from `build_transform`.
        image: (C, H, W) uint8, C = 1 or 3 (the processed layout).
        mask: (H, W) uint8 class indices.

    Returns:
        image (C, H, W) uint8 and mask (H, W) uint8, both C-contiguous.
    """
    transform.set_random_state(*sample_generators(seed, epoch, index))
    out = transform(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=np.ascontiguousarray(mask))
    image = out["image"].reshape(*out["image"].shape[:2], -1)  # (H, W, C), C = 1 kept
    return np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(out["mask"])


def cutmix_box(height: int, width: int, area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (y0, x0, y1, x1) of about `area` x the image, with the image's aspect ratio, fully inside it
    at a uniform position (as CutMix, Yun 2019, with sides sqrt(area) H and sqrt(area) W)."""
    h = min(height, max(1, round(height * area**0.5)))
    w = min(width, max(1, round(width * area**0.5)))
    y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return y0, x0, y0 + h, x0 + w


def mix_batch(batch: dict, p: AugmentParams, rng: np.random.Generator) -> dict:
    """CutMix (per sample) then MixUp (per batch) on a collated batch; see the module docstring.

    Args:
        batch: image (B, C, H, W) float, mask (B, H, W) int64, optional distance (B, H, W) float, ...
        p: cutmix_p, cutmix_area_range, mixup_p, mixup_alpha.
        rng: the batch's generator; every draw is made whatever the outcome, in a fixed order.

    Returns:
        The batch (new tensors where changed); with MixUp also mix_mask (B, H, W), mix_lambda (scalar
        float32 tensor) and, when distance is present, mix_distance (B, H, W).
    """
    b = len(batch["mask"])
    if b < 2:
        return batch
    height, width = batch["mask"].shape[-2:]
    cut = rng.random(b) < p.cutmix_p
    cut_partner = (np.arange(b) + rng.integers(1, b, size=b)) % b  # never the sample itself
    cut_area = rng.uniform(*p.cutmix_area_range, size=b)
    boxes = [cutmix_box(height, width, a, rng) for a in cut_area]
    mix = rng.random() < p.mixup_p
    lam = float(rng.beta(p.mixup_alpha, p.mixup_alpha))
    mix_partner = (np.arange(b) + int(rng.integers(1, b))) % b
    if cut.any():
        image, mask = batch["image"].clone(), batch["mask"].clone()
        distance = batch["distance"].clone() if "distance" in batch else None
        for i in np.flatnonzero(cut):
            y0, x0, y1, x1 = boxes[i]
            j = cut_partner[i]
            image[i, :, y0:y1, x0:x1] = batch["image"][j, :, y0:y1, x0:x1]
            mask[i, y0:y1, x0:x1] = batch["mask"][j, y0:y1, x0:x1]
            if distance is not None:  # d(x) of the new label map, not a paste of the old ones
                distance[i] = torch.from_numpy(distance_map(mask[i].numpy()))
        batch = {**batch, "image": image, "mask": mask}
        if distance is not None:
            batch["distance"] = distance
    if mix:
        index = torch.from_numpy(mix_partner)
        batch = {
            **batch,
            "image": lam * batch["image"] + (1 - lam) * batch["image"][index],
            "mix_mask": batch["mask"][index],
            "mix_lambda": torch.tensor(lam, dtype=torch.float32),
        }
        if "distance" in batch:
            batch["mix_distance"] = batch["distance"][index]
    return batch


class MixCollate:
    """collate_fn of the training DataLoader: default collation, then `mix_batch` with a generator that
    is a pure function of (seed, epoch, the batch's sample indices), so it is the same in any worker."""

    def __init__(self, params: AugmentParams, seed: int) -> None:
        self.params, self.seed = params, seed

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        epoch = int(items[0]["epoch"])
        key = (MIX_STREAM, epoch, *(int(item["index"]) for item in items))
        rng = np.random.default_rng(np.random.SeedSequence(self.seed % 2**64, spawn_key=key))
        return mix_batch(batch, self.params, rng)
