"""Per-case overlap metrics on label maps (numpy), one rule for empty masks.

Empty-mask rule (stated once, tested): with tp, fp, fn counted for one class,
    dice = 2tp / (2tp + fp + fn), iou = tp / (tp + fp + fn), precision = tp / (tp + fp),
    recall = tp / (tp + fn),
and a ratio whose denominator is 0 is 1.0 when the prediction agrees with the target for that
class (nothing to find and nothing predicted), otherwise 0.0. So an empty prediction of an empty
target is perfect, and any foreground predicted on an empty target scores 0 on dice, iou and
precision. F1 equals Dice for binary masks and is not stored twice.
"""

from __future__ import annotations

import numpy as np

METRICS = ("dice", "iou", "precision", "recall")


def _ratio(num: int, den: int, perfect: bool) -> float:
    return num / den if den else float(perfect)


def overlap_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall of binary masks of any (equal) shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    pred, target = pred.astype(bool), target.astype(bool)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    agree = fp == 0 and fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, agree),
        "iou": _ratio(tp, tp + fp + fn, agree),
        "precision": _ratio(tp, tp + fp, fn == 0),
        "recall": _ratio(tp, tp + fn, fp == 0),
    }


def case_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict[int, dict[str, float]]:
    """Metrics per foreground class (1..num_classes-1) of label maps `pred` and `target`."""
    return {c: overlap_metrics(pred == c, target == c) for c in range(1, num_classes)}


def surface(mask: np.ndarray) -> np.ndarray:
    """The boundary voxels of a binary mask: foreground voxels with a background face-neighbour
    (the image border counts as background)."""
    from scipy import ndimage

    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks.

    The distances from every surface voxel of each mask to the other mask's surface are pooled
    (both directions) and their 95th percentile is taken; in units of `spacing` (pixels if None).
    Both empty: 0. Exactly one empty: NaN (undefined; tables report how many cases were undefined).
    """
    from scipy import ndimage

    pred, target = pred.astype(bool), target.astype(bool)
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float("nan")
    s_pred, s_target = surface(pred), surface(target)
    spacing = spacing or (1.0,) * pred.ndim
    to_target = ndimage.distance_transform_edt(~s_target, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    distances = np.concatenate([to_target[s_pred], to_pred[s_target]])
    return float(np.percentile(distances, 95))
