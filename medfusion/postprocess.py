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
    resolution    `apply` and `Selector` take probabilities at the model's resolution and a case's
                  shape: the label map is made at that shape (`medfusion.resample`: the probabilities
                  are resized in-plane first), so min_size counts pixels (voxels) of the resolution
                  scored, the original one by default.
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

from medfusion.metrics import dice_from_counts, overlap_metrics
from medfusion.resample import apply_thresholds, labels_at, slices_at

__all__ = ["apply_thresholds"]  # re-exported: the rule lives with the resampling that applies it

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


def apply(
    postprocess: PostProcess,
    probs: np.ndarray,
    shape: Sequence[int] | None = None,
    fov: np.ndarray | None = None,
) -> np.ndarray:
    """Labels (uint8) of one case from its probabilities (K, [D,] h, w), at `shape` (the case's
    original (H, W) or (D, H, W); default the probabilities' own); with a field of view `fov` (bool,
    of `shape`), background outside it before the components and holes.

    Thresholds (or argmax) first, slice by slice after the in-plane resize (`medfusion.resample`);
    then, for a binary task (K = 2), components and holes on the whole case at `shape`. min_size and
    fill_holes are refused for K > 2: filling one class's holes would overwrite another class inside
    it (a tumour inside the liver).
    """
    shape = tuple(probs.shape[1:]) if shape is None else tuple(shape)
    labels = labels_at(probs, shape, postprocess.thresholds)
    if fov is not None:
        labels[~fov] = 0
    if postprocess.min_size <= 1 and not postprocess.fill_holes:
        return labels
    if probs.shape[0] != 2:
        raise ValueError(f"min_size and fill_holes are for binary tasks, got {probs.shape[0]} classes")
    return apply_binary(labels == 1, postprocess.min_size, postprocess.fill_holes).astype(np.uint8)


class Selector:
    """`choose_postprocess` one validation case at a time: memory is the per-candidate sums of Dice
    (candidates x classes floats) and one case's arrays while it is added, whatever the number of cases.

    Args:
        num_classes: K; binary (K = 2) chooses min_size and fill, K > 2 per-class thresholds.
        min_sizes, grid: the candidate sizes (binary) and thresholds (multi-class).
    """

    def __init__(
        self,
        num_classes: int,
        min_sizes: Sequence[int] = MIN_SIZE_GRID,
        grid: Sequence[float] = THRESHOLD_GRID,
    ) -> None:
        self.num_classes, self.cases = num_classes, 0
        self.min_sizes = sorted(min_sizes)  # from the smallest change up: only a real gain moves the choice
        self.candidates = [None, *sorted(grid, key=lambda t: (abs(t - 0.5), t))]
        if num_classes == 2:
            self.before, self.sums = 0.0, np.zeros((len(self.min_sizes), 2))
        else:
            self.sums = np.zeros((num_classes - 1, len(self.candidates)))

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        """One case: `pred` its probabilities (K, [D,] h, w) at any in-plane size (made into labels at
        the target's shape), or for a binary task a mask / label map of the target's shape; `target`
        its label map (H, W) or (D, H, W) at the resolution scored."""
        self.add_score(self.score(pred, target))

    def score(self, pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None):
        """One case's Dice under every candidate, what `add` sums: to add it to several selectors
        (a run's and the pooled one of the ensemble) without computing it twice. `fov` (bool, of the
        target's shape): the prediction is background outside it, as `apply` makes it."""
        if self.num_classes == 2:
            mask = _binary_mask(pred, target)
            return self._score_binary(mask if fov is None else mask & fov, target == 1)
        return self._score_thresholds(pred, target, fov)

    def add_score(self, score) -> None:
        """Add one case's `score` (from `score` of a selector with the same candidates)."""
        if self.num_classes == 2:
            before, dice = score
            self.before += before
            self.sums += dice
        else:
            self.sums += score
        self.cases += 1

    def _score_binary(self, mask: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        """Dice of (min_size, fill) candidates from per-component counts: the mask is labelled once;
        each size keeps the components at least that large, so its Dice without filling is a sum
        over components, and holes are filled only when the kept set differs from the last size's."""
        labels, sizes = _components(mask)  # labelled once per case, not once per size
        tp = np.bincount(labels[target], minlength=len(sizes)).astype(np.float64)  # per component
        actual = float(np.count_nonzero(target))
        dice, last, filled = np.zeros((len(self.min_sizes), 2)), None, 0.0
        for i, min_size in enumerate(self.min_sizes):
            keep = sizes >= min_size
            keep[0] = False  # background
            dice[i, 0] = dice_from_counts(tp[keep].sum(), sizes[keep].sum(), actual)
            kept = int(np.count_nonzero(keep))  # sizes ascend: the kept sets are nested
            if kept != last:
                filled, last = overlap_metrics(fill_holes(keep[labels]), target)["dice"], kept
            dice[i, 1] = filled
        return overlap_metrics(mask, target)["dice"], dice

    def _score_thresholds(
        self, probs: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None
    ) -> np.ndarray:
        if probs.shape[0] != self.num_classes:
            raise ValueError(f"probabilities of {probs.shape[0]} classes for a {self.num_classes}-class task")
        k, n = self.num_classes - 1, len(self.candidates)
        tp, predicted, actual = np.zeros((k, n)), np.zeros((k, n)), np.zeros((k, 1))
        slices = [target] if target.ndim == 2 else target
        fovs = [None] * len(slices) if fov is None else ([fov] if fov.ndim == 2 else fov)
        for p, t, inside in zip(slices_at(probs, target.shape), slices, fovs, strict=True):
            # the candidate class and its probability per pixel do not depend on the thresholds
            candidate = p[1:].argmax(0) + 1
            if inside is not None:
                candidate[~inside] = 0  # background outside the field of view: no class is a candidate
            for c in range(1, self.num_classes):
                here, truth = candidate == c, t == c
                actual[c - 1] += np.count_nonzero(truth)
                for j, thr in enumerate(self.candidates):
                    pred = here & (p[c] > p[0] if thr is None else p[c] >= thr)
                    predicted[c - 1, j] += np.count_nonzero(pred)
                    tp[c - 1, j] += np.count_nonzero(pred & truth)
        return dice_from_counts(tp, predicted, actual)

    def result(self) -> Selection:
        """The choice (METHOD.md's rule, ties to the smallest change) and the mean Dice before/after."""
        if self.cases == 0:
            raise ValueError("no validation case to choose post-processing on")
        means = self.sums / self.cases
        if self.num_classes == 2:
            before = self.before / self.cases
            best, best_dice = PostProcess(), before
            for i, min_size in enumerate(self.min_sizes):
                for fill in (False, True):
                    if means[i, int(fill)] > best_dice + _TOLERANCE:
                        best, best_dice = (
                            PostProcess(min_size=min_size, fill_holes=fill),
                            float(means[i, int(fill)]),
                        )
            return Selection(best, float(before), float(best_dice))
        chosen, after = [], []
        for scores in means:
            best = 0
            for i in range(1, len(scores)):
                if scores[i] > scores[best] + _TOLERANCE:
                    best = i
            chosen.append(self.candidates[best])
            after.append(scores[best])
        thresholds = None if all(t is None for t in chosen) else tuple(chosen)
        return Selection(PostProcess(thresholds=thresholds), float(means[:, 0].mean()), float(np.mean(after)))


def _binary_mask(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A case's predicted foreground at the target's shape: from probabilities (2, [D,] h, w) by argmax
    (resized in-plane first), or from a mask / label map of the target's shape."""
    if pred.shape == target.shape:
        return pred.astype(bool)
    if pred.shape[0] == 2 and pred.ndim == target.ndim + 1:
        return labels_at(pred, target.shape) == 1
    raise ValueError(f"prediction shape {pred.shape} fits neither target {target.shape} nor (2, ...)")


def _choose(preds, targets, num_classes: int, **grids) -> Selection:
    selector = Selector(num_classes, **grids)
    for p, t in zip(preds, targets, strict=True):
        selector.add(p, t)
    return selector.result()


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
    return _choose(preds, targets, 2, min_sizes=min_sizes)


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
    return _choose(probs, targets, probs[0].shape[0], grid=grid)


def choose_postprocess(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> Selection:
    """The METHOD.md choice on validation cases: `choose_binary` for K = 2, `choose_thresholds` for K > 2."""
    return _choose(probs, targets, probs[0].shape[0])
