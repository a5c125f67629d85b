"""Deterministic synthetic data, so the whole pipeline runs offline.

`synthetic`: 2-D RGB images (sizes vary, not square) of polyp-like blobs on a textured, vignetted
mucosa-like background with noise; masks are the blobs. Written in the Kvasir-SEG layout
(images/*.jpg, masks/*.png).

`synthetic_volumes`: small 3-D CT-like volumes in Hounsfield units, an 'organ' ellipsoid (label 1)
holding hypodense 'lesions' (label 2) inside a body outline, written as NIfTI in the LiTS layout
(volume-N.nii, segmentation-N.nii), so the volume path (reading, windowing, slicing,
per-volume evaluation, three classes) runs too.

Each case draws from `numpy.random.default_rng([seed, index])`: the same seed gives the same
files, and a case does not depend on how many others are generated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from medfusion.data.io import write_nifti, write_png


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An irregular, roughly elliptical blob: radius modulated by low-frequency angular noise."""
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.08, 0.22) * h, rng.uniform(0.08, 0.22) * w
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return (u / rx) ** 2 + (v / ry) ** 2 <= (1 + wobble) ** 2


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic RGB image (H, W, 3) uint8 and its mask (H, W) uint8 in {0, 1}."""
    h, w = int(rng.choice([128, 144, 160])), int(rng.choice([160, 176, 192]))
    texture = _smooth_noise(rng, (h, w), 3.0)
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1 - 0.5 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2)
    base = np.array([170.0, 90.0, 80.0]) * rng.uniform(0.85, 1.1)
    img = base[None, None, :] * vignette[..., None] + 14 * texture[..., None]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        mask |= _blob(rng, h, w)
    # polyps: brighter, more saturated, shaded from one side
    shade = ndimage.gaussian_filter(mask.astype(np.float64), 2.0)
    tint = np.array([45.0, 10.0, -5.0]) * rng.uniform(0.7, 1.3)
    img += shade[..., None] * (tint[None, None, :] + 10 * _smooth_noise(rng, (h, w), 2.0)[..., None])
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def make_volume(rng: np.random.Generator, slices: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT-like volume (D, H, W) float32 in HU and its labels (D, H, W) uint8 in {0, 1, 2}."""
    zz, yy, xx = np.mgrid[0:slices, 0:size, 0:size].astype(np.float64)
    z = (zz - slices / 2) / (slices / 2)
    body = ((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.4 * size)) ** 2 <= 1
    c = rng.uniform(0.4, 0.6, size=2) * size
    r = rng.uniform(0.16, 0.24, size=2) * size
    organ = ((yy - c[0]) / r[0]) ** 2 + ((xx - c[1]) / r[1]) ** 2 + (z / rng.uniform(0.7, 1.0)) ** 2 <= 1
    organ &= body
    lesion = np.zeros_like(organ)
    for _ in range(int(rng.integers(1, 4))):
        inside = np.argwhere(organ)
        if len(inside) == 0:
            break
        cz, cy, cx = inside[rng.integers(len(inside))]
        rad = rng.uniform(0.06, 0.1) * size
        lesion |= ((zz - cz) * 2.5) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
    lesion &= organ
    hu = np.where(body, 20.0, -1000.0)
    hu = np.where(organ, 110.0, hu)
    hu = np.where(lesion, 30.0, hu)
    hu += 30 * _smooth_noise(rng, hu.shape, 1.0) + rng.normal(0, 15, size=hu.shape)
    labels = organ.astype(np.uint8) + lesion.astype(np.uint8)
    return hu.astype(np.float32), labels


def write_synthetic_images(out_dir: Path, num_images: int, seed: int) -> None:
    """Write `num_images` image/mask pairs to out_dir/images/*.jpg and out_dir/masks/*.png."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i in range(num_images):
        image, mask = make_image(np.random.default_rng([seed, i]))
        Image.fromarray(image).save(out_dir / "images" / f"synthetic_{i:04d}.jpg", quality=95)
        write_png(out_dir / "masks" / f"synthetic_{i:04d}.png", mask * 255)


def write_synthetic_volumes(out_dir: Path, num_volumes: int, slices: int, seed: int) -> None:
    """Write `num_volumes` NIfTI pairs volume-N.nii / segmentation-N.nii (uncompressed: byte-identical on every run) to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(num_volumes):
        volume, labels = make_volume(np.random.default_rng([seed, 10_000 + i]), slices)
        write_nifti(out_dir / f"volume-{i}.nii", volume, (2.5, 0.8, 0.8))
        write_nifti(out_dir / f"segmentation-{i}.nii", labels, (2.5, 0.8, 0.8))
