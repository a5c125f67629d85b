"""Post-processing of predicted probabilities, with its settings chosen on validation predictions.

METHOD.md section 3: binary tasks remove connected components below a size and fill holes;
multi-class tasks use per-class probability thresholds chosen on validation. The settings are
chosen on a validation fold's predictions (`choose_postprocess`) and then applied unchanged to the
test predictions (`apply`); they are never chosen on test cases.

Rules (a case is a 2-D image (H, W) or a whole volume (D, H, W)):
    components    `remove_small_components` labels the mask in its own dimension with full
                  connectivity (8-connected in 2-D, 26-connected in 3-D, so a diagonal line is one
                  component) and removes every component of fewer than `min_size` pixels (voxels).
    holes         `fill_holes` fills background regions that are not connected (4-connectivity, the
                  dual of the 8-connected foreground) to the border of their 2-D image or slice;
                  volumes are filled slice by slice, as the models predict them, which also fills
                  in-plane holes that stay open through a neighbouring slice.
    binary order  components first, then holes (`apply_binary`).
    thresholds    with probabilities (K, ...), a voxel's candidate is its most probable foreground
                  class c = argmax_{k >= 1} p_k (the lowest index on ties); it takes c when
                  p_c >= t_c and is background otherwise. A threshold None keeps the argmax rule for
                  that class: c when p_c > p_0. All None is exactly the plain argmax. A threshold
                  only moves voxels between its class and background, so each class's Dice depends
                  on its own threshold alone and the per-class choice is exact.
    selection     the setting with the highest mean validation Dice (per case, foreground classes,
                  empty masks as in medfusion.metrics); ties go to the smallest change: for binary
                  the smallest min_size, then no fill; for thresholds None (argmax), then the value
                  closest to 0.5. So a setting that cannot help is never chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medfusion.metrics import overlap_metrics

MIN_SIZE_GRID = (0, 10, 25, 50, 100, 200, 500)  # pixels (voxels for volumes)
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
_TOLERANCE = 1e-12  # a gain below this is float noise, not a reason to change anything


@dataclass(frozen=True)
class PostProcess:
    """Chosen post-processing settings; `dataclasses.asdict` gives its JSON.

    Attributes:
        min_size: binary only: components smaller than this many pixels (voxels) are removed; 0 keeps all.
        fill_holes: binary only: fill enclosed holes (per 2-D image or slice).
        thresholds: per foreground class 1..K-1, a probability threshold or None (argmax rule);
            None altogether for the plain argmax.
    """

    min_size: int = 0
    fill_holes: bool = False
    thresholds: tuple[float | None, ...] | None = None


@dataclass(frozen=True)
class Selection:
    """A choice made on validation: the settings and the mean validation Dice before and after."""

    postprocess: PostProcess
    dice_before: float
    dice_after: float


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove the connected components of fewer than `min_size` pixels (voxels).

    Args:
        mask: binary (H, W) or (D, H, W); components are 8- (2-D) or 26-connected (3-D).
        min_size: smallest size kept; 0 or 1 keeps everything.

    Returns:
        bool mask of the same shape.
    """
    mask = mask.astype(bool)
    if min_size <= 1:
        return mask
    return _keep_large(*_components(mask), min_size)


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component labels (full connectivity) and the size of each label (index 0: background)."""
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    return labels, np.bincount(labels.ravel())


def _keep_large(labels: np.ndarray, sizes: np.ndarray, min_size: int) -> np.ndarray:
    keep = sizes >= min_size
    keep[0] = False  # background
    return keep[labels]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary (H, W) mask, or of each slice of a (D, H, W) mask.

    A hole is background not 4-connected to the image border: an enclosed hole is filled, a notch
    open to the outside is not.
    """
    mask = mask.astype(bool)
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def apply_binary(mask: np.ndarray, min_size: int, fill: bool) -> np.ndarray:
    """Small components removed (below `min_size`), then holes filled if `fill`; bool mask."""
    mask = remove_small_components(mask, min_size)
    return fill_holes(mask) if fill else mask


def apply_thresholds(probs: np.ndarray, thresholds: Sequence[float | None] | None) -> np.ndarray:
    """Label map from probabilities with per-class thresholds (rule in the module docstring).

    Args:
        probs: (K, H, W) or (K, D, H, W) class probabilities, K >= 2.
        thresholds: K-1 values for classes 1..K-1, each a probability or None (argmax rule);
            None altogether for the plain argmax.

    Returns:
        uint8 class indices of shape probs.shape[1:].
    """
    if thresholds is None:
        return probs.argmax(0).astype(np.uint8)
    if len(thresholds) != probs.shape[0] - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {probs.shape[0] - 1} foreground classes")
    candidate = probs[1:].argmax(0) + 1
    p_candidate = np.take_along_axis(probs, candidate[None], axis=0)[0]
    keep = np.zeros(candidate.shape, bool)
    for c, t in enumerate(thresholds, start=1):
        here = candidate == c
        keep[here] = p_candidate[here] > probs[0][here] if t is None else p_candidate[here] >= t
    return np.where(keep, candidate, 0).astype(np.uint8)


def apply(postprocess: PostProcess, probs: np.ndarray) -> np.ndarray:
    """Labels (uint8, shape probs.shape[1:]) of one case from its probabilities (K, ...).

    Thresholds (or argmax) first; then, for a binary task (K = 2), components and holes. min_size and
    fill_holes are refused for K > 2: filling one class's holes would overwrite another class inside
    it (a tumour inside the liver).
    """
    labels = apply_thresholds(probs, postprocess.thresholds)
    if postprocess.min_size <= 1 and not postprocess.fill_holes:
        return labels
    if probs.shape[0] != 2:
        raise ValueError(f"min_size and fill_holes are for binary tasks, got {probs.shape[0]} classes")
    return apply_binary(labels == 1, postprocess.min_size, postprocess.fill_holes).astype(np.uint8)


def _binary_mask(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A case's predicted foreground: from probabilities (2, ...) by argmax, or from a mask/label map."""
    if pred.shape == target.shape:
        return pred.astype(bool)
    if pred.shape == (2, *target.shape):
        return pred.argmax(0) == 1
    raise ValueError(f"prediction shape {pred.shape} fits neither target {target.shape} nor (2, ...)")


def choose_binary(
    preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], min_sizes: Sequence[int] = MIN_SIZE_GRID
) -> Selection:
    """min_size and fill with the best mean validation Dice over cases (ties: the smallest change).

    Args:
        preds: per validation case, probabilities (2, ...) or a binary mask / label map (...).
        targets: per case, the binary mask or label map (foreground = 1), same order.
        min_sizes: the candidate sizes; every size is tried with and without hole filling.

    Returns:
        Selection(PostProcess(min_size, fill_holes), dice_before, dice_after).
    """
    masks = [_binary_mask(p, t) for p, t in zip(preds, targets, strict=True)]
    targets = [t == 1 for t in targets]
    before = float(np.mean([overlap_metrics(m, t)["dice"] for m, t in zip(masks, targets, strict=True)]))
    components = [_components(m) for m in masks]  # labelled once per case, not once per size
    best, best_dice = PostProcess(), before
    for min_size in sorted(min_sizes):  # from the smallest change up: only a real gain moves `best`
        kept = [_keep_large(labels, sizes, min_size) for labels, sizes in components]
        for fill in (False, True):
            dices = [
                overlap_metrics(fill_holes(k) if fill else k, t)["dice"]
                for k, t in zip(kept, targets, strict=True)
            ]
            dice = float(np.mean(dices))
            if dice > best_dice + _TOLERANCE:
                best, best_dice = PostProcess(min_size=min_size, fill_holes=fill), dice
    return Selection(best, before, best_dice)


def choose_thresholds(
    probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], grid: Sequence[float] = THRESHOLD_GRID
) -> Selection:
    """Per-class thresholds with the best mean validation Dice of each class (ties: the smallest change).

    Args:
        probs: per validation case, probabilities (K, ...).
        targets: per case, the label map (...), same order.
        grid: candidate thresholds; None (the argmax rule) is always a candidate and wins ties.

    Returns:
        Selection(PostProcess(thresholds=...), dice_before, dice_after); Dice means are over cases and
        foreground classes. thresholds is None when no class changes.
    """
    num_classes = probs[0].shape[0]
    candidates = [None, *sorted(grid, key=lambda t: (abs(t - 0.5), t))]
    # the candidate class and its probability per voxel do not depend on the thresholds
    fg = [(p[1:].argmax(0) + 1, p) for p in probs]
    chosen, before, after = [], [], []
    for c in range(1, num_classes):
        scores = []
        for t in candidates:
            dices = []
            for (candidate, p), target in zip(fg, targets, strict=True):
                here = candidate == c
                pred = here & (p[c] > p[0] if t is None else p[c] >= t)
                dices.append(overlap_metrics(pred, target == c)["dice"])
            scores.append(float(np.mean(dices)))
        best = 0  # candidates run from the smallest change up, so only a real gain moves `best`
        for i in range(1, len(candidates)):
            if scores[i] > scores[best] + _TOLERANCE:
                best = i
        chosen.append(candidates[best])
        before.append(scores[0])
        after.append(scores[best])
    thresholds = None if all(t is None for t in chosen) else tuple(chosen)
    return Selection(PostProcess(thresholds=thresholds), float(np.mean(before)), float(np.mean(after)))


def choose_postprocess(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> Selection:
    """The METHOD.md choice on validation cases: `choose_binary` for K = 2, `choose_thresholds` for K > 2."""
    if probs[0].shape[0] == 2:
        return choose_binary(probs, targets)
    return choose_thresholds(probs, targets)
