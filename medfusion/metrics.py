"""Per-case segmentation metrics (numpy/scipy), with one rule for empty masks.

A test case is a 2-D image (H, W) or a whole volume (D, H, W); metrics are computed per scored
region on the binary masks "pred in labels" and "target in labels": by default each foreground class
alone (`pred == c`), for LiTS-like data nested regions (liver = labels 1 and 2, tumour = label 2;
`medfusion.data.registry.DatasetSpec.regions`). `pooled_dice` is the global Dice of a region over
many cases (the LiTS challenge's "Dice global"): 2 sum(tp) / (2 sum(tp) + sum(fp) + sum(fn)).

Overlap metrics, with tp, fp, fn counted for one class:
    dice = 2tp / (2tp + fp + fn), iou = tp / (tp + fp + fn), precision = tp / (tp + fp),
    recall = tp / (tp + fn), f1 = dice (the harmonic mean of precision and recall is Dice for a
    binary mask; stored under its own name because the evaluation protocol reports F1).
Distance metrics, on the surfaces (foreground voxels with a background face-neighbour):
    hd95 = 95th percentile, assd = mean of the surface-to-surface distances of both directions
    pooled (every surface voxel of each mask to the nearest surface voxel of the other), in the
    units of `spacing` (mm where it is known, pixels when None).

Empty-mask rule (stated once here, METHOD.md section 3 "Rules for the hard cases", tested in
tests/test_metrics_post.py and tests/test_hard_cases.py):
    both empty          dice = iou = precision = recall = f1 = 1.0; hd95 = assd = 0.0
    empty target only   (foreground predicted on an empty target: a spurious structure) all overlap
                        metrics 0.0; hd95 = assd = the case's diagonal
    empty prediction    (target missed) all overlap metrics 0.0; hd95 = assd = the case's diagonal
In general an overlap ratio whose denominator is 0 is 1.0 when the prediction agrees with the
target for that class and 0.0 otherwise. The diagonal (`diagonal`) is the largest distance the case
can have: sqrt(sum((n_i * s_i)^2)) over its axes (the image's extent, in mm where the spacing is
known, else in pixels; the BraTS challenges' convention, e.g. 373.13 mm for 240 x 240 x 155 at 1 mm).
So a missed or spurious structure counts against the model with the worst distance, never vanishes
from a mean. `region_metrics` also gives two indicators per case and region (`FLAGS`, 0.0 or 1.0):
`penalised` (the distances are that penalty) and `present` (the region is in the ground truth), so
that every table can say how many cases were penalised and how many lack the structure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "precision", "recall")  # the overlap metrics of the report tables
# how a metric is named in tables and figures
METRIC_NAMES = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "f1": "F1",
                "hd95": "HD95", "assd": "ASSD"}  # fmt: skip
DISTANCE_METRICS = ("hd95", "assd")
COUNTS = ("tp", "fp", "fn")  # voxel counts per case and region, for pooled_dice
PENALISED, PRESENT = "penalised", "present"
FLAGS = (
    PENALISED,
    PRESENT,
)  # per case and region indicators (0.0 / 1.0), not metrics: see the module docstring


def _ratio(num: int, den: int, perfect: bool) -> float:
    return num / den if den else float(perfect)


def overlap_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall and F1 of two binary masks of any (equal) shape.

    Args:
        pred: binary mask (any dtype; nonzero is foreground).
        target: binary mask of the same shape.

    Returns:
        {"dice", "iou", "precision", "recall", "f1"} in [0, 1], empty masks as the module says.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    pred, target = pred.astype(bool), target.astype(bool)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(target)) - tp
    agree = fp == 0 and fn == 0
    dice = _ratio(2 * tp, 2 * tp + fp + fn, agree)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn, agree),
        "precision": _ratio(tp, tp + fp, fn == 0),
        "recall": _ratio(tp, tp + fn, fp == 0),
        "f1": dice,
    }


_SURFACE_CHUNK = 32  # slices per erosion: its temporaries stay a chunk's, not a volume's


def surface(mask: np.ndarray) -> np.ndarray:
    """The boundary voxels of a binary mask: foreground voxels with a background face-neighbour
    (the image border counts as background). Volumes are eroded in chunks of slices, each with its
    neighbouring slice on either side, so that memory is the output (1 byte per voxel) and one
    chunk's temporaries."""
    mask = mask.astype(bool, copy=False)
    if mask.ndim < 3 or len(mask) <= _SURFACE_CHUNK:
        return mask & ~ndimage.binary_erosion(mask, border_value=0)
    out = np.empty(mask.shape, bool)
    for z0 in range(0, len(mask), _SURFACE_CHUNK):
        z1 = min(z0 + _SURFACE_CHUNK, len(mask))
        lo, hi = max(z0 - 1, 0), min(z1 + 1, len(mask))  # the halo: the chunk's neighbours in z
        eroded = ndimage.binary_erosion(mask[lo:hi], border_value=0)[z0 - lo : z0 - lo + (z1 - z0)]
        np.logical_and(mask[z0:z1], ~eroded, out=out[z0:z1])
    return out


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {ndim}-D mask")
    return tuple(float(s) for s in spacing)


def _union_box(pred: np.ndarray, target: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The bounding box of pred | target, grown by `margin` voxels and clipped to the array."""
    union = pred | target
    box = []
    for axis, size in enumerate(union.shape):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, size)))
    return tuple(box)


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None
) -> np.ndarray | None:
    """Distances from every surface voxel of each mask to the other mask's surface, both directions.

    Args:
        pred: binary mask, (H, W) or (D, H, W).
        target: binary mask of the same shape.
        spacing: voxel size per axis ((y, x) or (z, y, x)); None for pixels.

    Returns:
        1-D float32 array (|surface(pred)| + |surface(target)|,); an empty array when both masks are
        empty, None when exactly one is (undefined).

    The surfaces are found on the bounding box of both masks (plus a one-voxel margin), not the
    whole image: that is exact, since outside the box both masks are background, so erosion finds the
    same surfaces there as on the full image. Each distance, from a surface voxel's centre to the
    nearest surface voxel centre of the other mask in mm, is read from an exact anisotropic Euclidean
    distance transform of that other surface over the box (medpy's and MONAI's way; the `edt`
    package's separable transform, float32, threaded over the process's cores, whose time and memory
    grow with the box, not with how many surface voxels there are: a noisy prediction costs what a
    clean one costs).
    Memory: per voxel of the box, the surface being transformed (1 byte, inverted in place for its
    transform), the other one bit-packed (1 bit: volumes; it is only where distances are read) and
    one transform at a time (4 bytes, and 1 byte the transform holds while it runs); per surface
    voxel, its distance (4 bytes), gathered 32 slices at a time. A 987 x 512 x 512 case whose box is
    the whole volume, with a noisy prediction (half its voxels surface): about 8 bytes per voxel,
    2.1 GB, besides the masks (benchmarks/case_memory.py measures a whole case).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    return _region_distances([pred.astype(bool, copy=False), target.astype(bool, copy=False)], spacing)


def _surfaces_distances(surfaces: list[np.ndarray], sampling: Sequence[float]) -> np.ndarray:
    """`surface_distances` from surfaces = [pred's, target's] (bool, the box's shape, both non-empty;
    the list is emptied, so that it holds the only references). Each surface is inverted in place for
    its transform; a volume's other surface is kept bit-packed meanwhile (`_Bits`), being only where
    the distances are read."""
    s_pred, s_target = surfaces
    surfaces.clear()
    n_pred = int(np.count_nonzero(s_pred))
    out = np.empty(n_pred + int(np.count_nonzero(s_target)), np.float32)  # the result, filled in place
    if s_pred.ndim < 3:  # an image: small enough as it is
        _gather(_distance_to(s_target, sampling), s_pred, out[:n_pred])
        _gather(_distance_to(s_pred, sampling), s_target, out[n_pred:])
        return out
    where = _Bits(s_pred)
    del s_pred
    _gather(_distance_to(s_target, sampling), where, out[:n_pred])
    s_pred, where = where.unpack(), _Bits(s_target)
    del s_target
    _gather(_distance_to(s_pred, sampling), where, out[n_pred:])
    return out


class _Bits:
    """A bool volume (D, H, W) kept bit-packed (1 bit per voxel), read back a slab of slices at a
    time; slabs start at multiples of _SURFACE_CHUNK slices, so on a byte (32 planes are 4 bytes per
    pixel of a plane)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.shape, self.plane = mask.shape, int(np.prod(mask.shape[1:]))
        self.bits = np.packbits(np.ascontiguousarray(mask), axis=None)

    def __len__(self) -> int:
        return self.shape[0]

    def slab(self, z0: int, z1: int) -> np.ndarray:
        start, stop = z0 * self.plane, z1 * self.plane
        assert start % 8 == 0, "slabs start on a byte"
        part = np.unpackbits(self.bits[start // 8 : -(-stop // 8)], count=stop - start)
        return part.view(bool).reshape(z1 - z0, *self.shape[1:])

    def unpack(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=len(self) * self.plane).view(bool).reshape(self.shape)


def _gather(values: np.ndarray, where: np.ndarray | _Bits, out: np.ndarray) -> None:
    """out[:] = values[where], gathered _SURFACE_CHUNK slices at a time (no surface-sized temporary)."""
    if values.ndim < 3:
        out[:] = values[where]
        return
    filled = 0
    for z0 in range(0, len(values), _SURFACE_CHUNK):
        z1 = min(z0 + _SURFACE_CHUNK, len(values))
        mask = where.slab(z0, z1) if isinstance(where, _Bits) else where[z0:z1]
        part = values[z0:z1][mask]
        out[filled : filled + part.size] = part
        filled += part.size


def _cores() -> int:
    """The CPU cores this process may run on: the distance transform's threads (its result does not
    depend on how many: each thread takes whole rows of the separable passes)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _distance_to(surface_mask: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """float32 distance in mm from every voxel centre to the nearest voxel of `surface_mask` (not
    empty); the mask is inverted for the transform and put back as it was."""
    import edt

    np.logical_not(surface_mask, out=surface_mask)
    try:
        return edt.edt(surface_mask, anisotropy=tuple(sampling), black_border=False, parallel=_cores())
    finally:
        np.logical_not(surface_mask, out=surface_mask)


def diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """The diagonal of a case of `shape` ((H, W) or (D, H, W)): sqrt(sum((n_i * s_i)^2)), in the
    units of `spacing` (pixels if None): the HD95/ASSD of a missed or spurious structure."""
    sampling = _check_spacing(spacing, len(shape))
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sampling, strict=True))))


def _distance_metrics(distances: np.ndarray | None, worst: float) -> dict[str, float]:
    """hd95 and assd of pooled distances; None (exactly one mask empty) gives `worst` (the case's
    diagonal) for both."""
    if distances is None:
        return {"hd95": worst, "assd": worst}
    if distances.size == 0:
        return {"hd95": 0.0, "assd": 0.0}
    # float64 for the mean: a float32 sum of 10^8 distances would lose digits; the mean first, then the
    # percentile partitions the array in place (the distances are discarded after: no second copy)
    assd = float(distances.mean(dtype=np.float64))
    return {"hd95": float(np.percentile(distances, 95, overwrite_input=True)), "assd": assd}


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of the pooled symmetric surface distances (`surface_distances`).

    In units of `spacing` (pixels if None). Both empty: 0.0. Exactly one empty: the case's diagonal.
    """
    return _distance_metrics(surface_distances(pred, target, spacing), diagonal(target.shape, spacing))[
        "hd95"
    ]


def assd(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Average symmetric surface distance: the mean of the pooled distances of both directions.

    In units of `spacing` (pixels if None). Both empty: 0.0. Exactly one empty: the case's diagonal.
    """
    return _distance_metrics(surface_distances(pred, target, spacing), diagonal(target.shape, spacing))[
        "assd"
    ]


def case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    distances: bool = False,
) -> dict[int, dict[str, float]]:
    """Metrics per foreground class (1..num_classes-1) of one test case.

    Args:
        pred: (H, W) or (D, H, W) int class indices.
        target: int class indices of the same shape.
        num_classes: number of classes, background included.
        spacing: voxel size per axis, e.g. (z, y, x) in mm; None for pixels.
        distances: also compute hd95 and assd. Off by default: training validation calls this per
            sample and only needs Dice; evaluation turns it on.

    Returns:
        {class: {dice, iou, precision, recall, f1[, hd95, assd]}}.
    """
    out = {}
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        out[c] = overlap_metrics(p, t)
        if distances:
            out[c] |= _distance_metrics(surface_distances(p, t, spacing), diagonal(t.shape, spacing))
    return out


def label_mask(labels_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """bool mask of the voxels whose label is one of `labels`, without `np.isin`'s temporaries
    (about 9 bytes per voxel: 2.2 GB on a 987 x 512 x 512 volume). Memory: the mask (1 byte per
    voxel); uint8 maps through a 256-entry lookup table, others one label and 32 slices at a time."""
    labels = [int(v) for v in labels]
    if labels_map.dtype == np.uint8:
        table = np.zeros(256, bool)
        table[[v for v in labels if 0 <= v < 256]] = True
        return table[labels_map]
    out = np.zeros(labels_map.shape, bool)
    step = _SURFACE_CHUNK if labels_map.ndim >= 3 else len(labels_map) or 1
    for z0 in range(0, len(labels_map), step):
        part = labels_map[z0 : z0 + step]
        for v in labels:
            out[z0 : z0 + step] |= part == v
    return out


def region_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    regions: Mapping[str, Sequence[int]],
    spacing: Sequence[float] | None = None,
    distances: bool = True,
) -> dict[str, dict[str, float]]:
    """Metrics per scored region of one test case: {region: {dice, iou, precision, recall, f1, tp, fp,
    fn, present[, hd95, assd, penalised]}}, a region being the union of its labels (`regions`: name ->
    labels). tp, fp and fn are the region's voxel counts, kept for `pooled_dice`; present and
    penalised are the indicators of the module docstring (`FLAGS`)."""
    out = {}
    worst = diagonal(target.shape, spacing)
    for name, labels in regions.items():
        masks = [label_mask(pred, labels), label_mask(target, labels)]  # the only references: freed early
        counts = _counts(*masks)
        out[name] = overlap_metrics(*masks) | counts | {PRESENT: float(counts["tp"] + counts["fn"] > 0)}
        if distances:
            found = _region_distances(masks, spacing)
            out[name] |= _distance_metrics(found, worst) | {PENALISED: float(found is None)}
        masks.clear()
    return out


def _region_distances(masks: list[np.ndarray], spacing: Sequence[float] | None) -> np.ndarray | None:
    """`surface_distances` of masks = [pred, target] (bool), the list emptied once the surfaces are
    found, so that masks it holds the only references to are released before the transforms."""
    sampling = _check_spacing(spacing, masks[0].ndim)
    has_pred, has_target = bool(masks[0].any()), bool(masks[1].any())
    if not has_pred and not has_target:
        return np.zeros(0, np.float32)
    if not has_pred or not has_target:
        return None
    box = _union_box(masks[0], masks[1])
    surfaces = [surface(masks[0][box]), surface(masks[1][box])]
    masks.clear()
    return _surfaces_distances(surfaces, sampling)


def _counts(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    tp = int(np.count_nonzero(pred & target))
    return {
        "tp": float(tp),
        "fp": float(np.count_nonzero(pred) - tp),
        "fn": float(np.count_nonzero(target) - tp),
    }


def dice_from_counts(tp, predicted, actual) -> np.ndarray:
    """Dice from pixel counts, scalars or arrays (broadcast): 2 tp / (|pred| + |target|), 1 where
    both are empty (the empty-mask rule). float64."""
    tp, predicted, actual = (np.asarray(x, dtype=np.float64) for x in (tp, predicted, actual))
    total = predicted + actual
    return np.where(total == 0, 1.0, 2 * tp / np.maximum(total, 1))


def pooled_dice(tp: Iterable[float], fp: Iterable[float], fn: Iterable[float]) -> float:
    """Global Dice over many cases from their per-case counts: 2 sum(tp) / (2 sum(tp) + sum(fp) +
    sum(fn)); 1.0 when every case is empty in both prediction and target (the empty-mask rule)."""
    tp_, fp_, fn_ = (float(np.sum(list(x))) for x in (tp, fp, fn))
    return float(dice_from_counts(tp_, tp_ + fp_, tp_ + fn_))


def processed_spacing(
    original_shape: Sequence[int], original_spacing: Sequence[float] | None, image_size: int
) -> tuple[float, ...] | None:
    """Voxel spacing at the preprocessed resolution.

    Preprocessing resizes every 2-D image or slice to image_size x image_size, ignoring the aspect
    ratio, and keeps the slice axis of a volume, so the last two axes are rescaled and a leading
    slice axis is unchanged.

    Args:
        original_shape: (H, W) or (D, H, W) of the case before preprocessing (meta.json `shape`).
        original_spacing: the matching (y, x) or (z, y, x) spacing, or None where unknown.
        image_size: the in-plane size S after preprocessing.

    Returns:
        (y', x') or (z, y', x') with y' = y * H / S, x' = x * W / S; None when the spacing is unknown.
    """
    if original_spacing is None:
        return None
    if len(original_shape) != len(original_spacing) or len(original_shape) not in (2, 3):
        raise ValueError(f"shape {tuple(original_shape)} and spacing {tuple(original_spacing)} do not match")
    h, w = original_shape[-2:]
    y, x = original_spacing[-2:]
    slice_axis = tuple(float(s) for s in original_spacing[:-2])  # () for 2-D, (z,) for volumes
    return (*slice_axis, float(y) * h / image_size, float(x) * w / image_size)
