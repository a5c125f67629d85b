"""The one batched prediction loop: a model's softmax on a batch, by whole image or by Gaussian-weighted
sliding window (native resolution), with flip test-time augmentation."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from medfusion.hardware import Precision


@torch.no_grad()
def predict_probs(model: nn.Module, image: Tensor, precision: Precision) -> Tensor:
    """Softmax probabilities (B, K, H, W) float32 on the CPU."""
    model.eval()
    with precision.autocast():
        logits = model(precision.to_device(image))
    return logits.float().softmax(dim=1).cpu()


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering [0, length): steps of at most patch x (1 - overlap)."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((length - patch) / step) + 1
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


@functools.cache
def gaussian_weights(patch: int, sigma_scale: float = 1 / 8) -> Tensor:
    """(patch, patch) importance of each window pixel: a Gaussian centred on the window, sigma =
    patch / 8 (nnU-Net's choice), scaled to a maximum of 1 and floored at its smallest positive value
    so that no pixel gets weight 0."""
    centre, sigma = (patch - 1) / 2, patch * sigma_scale
    g = torch.exp(-((torch.arange(patch, dtype=torch.float32) - centre) ** 2) / (2 * sigma**2))
    weights = g[:, None] * g[None, :]
    weights /= weights.max()
    return weights.clamp_min(float(weights[weights > 0].min()))


@torch.no_grad()
def sliding_window_probs(
    model: nn.Module, images: Tensor, precision: Precision, patch: int, overlap: float = 0.5, batch: int = 8
) -> Tensor:
    """Softmax probabilities (B, K, H, W) float32 on the CPU of images (B, C, H, W) of any size, from
    `patch` x `patch` windows overlapping by `overlap`, each weighted by `gaussian_weights` (the
    centre of a window counts more than its edges). An image smaller than a window is zero-padded
    (the z-scored mean) and cropped back. Memory: one image's K x H x W sums, `batch` windows."""
    b, c, h, w = images.shape
    H, W = max(h, patch), max(w, patch)
    if (H, W) != (h, w):
        images = torch.nn.functional.pad(images, (0, W - w, 0, H - h))
    weights = gaussian_weights(patch)
    boxes = [(y, x) for y in window_starts(H, patch, overlap) for x in window_starts(W, patch, overlap)]
    out = []
    for image in images:
        total, norm = None, torch.zeros(H, W)
        for start in range(0, len(boxes), batch):
            chunk = boxes[start : start + batch]
            windows = torch.stack([image[:, y : y + patch, x : x + patch] for y, x in chunk])
            probs = predict_probs(model, windows, precision)
            if total is None:
                total = torch.zeros(probs.shape[1], H, W)
            for (y, x), p in zip(chunk, probs, strict=True):
                total[:, y : y + patch, x : x + patch] += p * weights
                norm[y : y + patch, x : x + patch] += weights
        out.append((total / norm)[:, :h, :w])
    return torch.stack(out)


def infer_probs(
    model: nn.Module, images: Tensor, precision: Precision, patch: int | None = None, tta: str = "none"
) -> Tensor:
    """Probabilities (B, K, H, W): the model on the whole input, or by sliding window of `patch`.
    `tta` "flip": the mean over the images and their left-right, up-down and double mirrorings, each
    output flipped back (the group of the two mirrorings, so the result is equivariant to either);
    `medfusion predict --tta flip` and eval.tta both come here."""
    if tta == "flip":
        total = infer_probs(model, images, precision, patch)
        for dims in ((3,), (2,), (2, 3)):
            total = total + torch.flip(infer_probs(model, torch.flip(images, dims), precision, patch), dims)
        return total / 4
    if tta != "none":
        raise ValueError(f"tta {tta!r}; expected none or flip")
    if patch is None:
        return predict_probs(model, images, precision)
    return sliding_window_probs(model, images, precision, patch)
