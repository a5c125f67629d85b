"""Post-processing of predicted probabilities, with its settings chosen on validation predictions.

METHOD.md section 3: binary tasks remove connected components below a size and fill holes;
multi-class tasks use per-class probability thresholds chosen on validation. The settings are
chosen on a validation fold's predictions (`choose_postprocess`) and then applied unchanged to the
test predictions (`apply`); they are never chosen on test cases.

Rules (a case is a 2-D image (H, W) or a whole volume (D, H, W)):
    components    `remove_small_components` labels the mask in its own dimension with full
                  connectivity (8-connected in 2-D, 26-connected in 3-D, so a diagonal line is one
                  component) and removes every component of fewer than `min_size` pixels (voxels).
                  The smallest size kept can also be relative to the case, `min_fraction` of its
                  pixels (voxels): 500 px is tiny in a 1920 x 1072 Kvasir image and large in a
                  256 x 256 one; the size used is the larger of the two. `largest` keeps the largest
                  component only (nnU-Net's candidate; ties: the lowest component label).
    holes         `fill_holes` fills background regions that are not connected (4-connectivity, the
                  dual of the 8-connected foreground) to the border of their 2-D image or slice;
                  volumes are filled slice by slice, as the models predict them, which also fills
                  in-plane holes that stay open through a neighbouring slice.
    binary order  components first, then holes (`apply_binary`).
    thresholds    with probabilities (K, ...), a voxel's candidate is its most probable foreground
                  class c = argmax_{k >= 1} p_k (the lowest index on ties); it takes c when
                  p_c >= t_c and is background otherwise. A threshold None keeps the argmax rule for
                  that class: c when p_c > p_0. All None is exactly the plain argmax. Without nested
                  regions a threshold only moves voxels between its class and background, so each
                  class's Dice depends on its own threshold alone and the per-class choice is exact.
    nested        where scored regions nest (LiTS: liver = labels 1+2 encloses tumour = label 2;
                  `nesting`), the thresholds are chosen on the regions that are scored and applied to
                  them (METHOD.md section 3): t_c to the probability of c's region (its classes'
                  probabilities summed), and a voxel whose inner class is rejected by its threshold
                  falls back to the enclosing class where that region beats background (its threshold,
                  or p_region > p_0 without one) instead of leaving a hole in the liver
                  (`medfusion.resample.ThresholdRule`; a voxel the argmax rule itself sends to
                  background stays there unless the enclosing class has a threshold it passes, so that
                  all thresholds None stay the plain argmax). An inner region's Dice depends only on the
                  thresholds inside it, so the choice goes from the innermost region outward: each
                  region's threshold is the best for that region given the ones already chosen inside
                  (greedy by design: the inner region is scored on its own, and its threshold is not
                  bent to help the outer one).
    resolution    `apply` and `Selector` take probabilities at the model's resolution and a case's
                  shape: the label map is made at that shape (`medfusion.resample`: the probabilities
                  are resized in-plane first), so min_size counts pixels (voxels) of the resolution
                  scored, the original one by default.
    selection     the setting with the highest mean validation Dice (per case, per scored region,
                  nested regions inward-out as above, empty masks as in medfusion.metrics); ties go
                  to the smallest change: for binary no change, then the absolute sizes from the smallest, then the relative ones from
                  the smallest, then the largest component, each without then with filling; for
                  thresholds None (argmax), then the value closest to 0.5. So a setting that cannot
                  help is never chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medfusion.metrics import dice_from_counts, overlap_metrics
from medfusion.resample import ThresholdRule, apply_thresholds, labels_at, slices_at

__all__ = ["apply_thresholds"]  # re-exported: the rule lives with the resampling that applies it

MIN_SIZE_GRID = (0, 10, 25, 50, 100, 200, 500)  # pixels (voxels for volumes)
MIN_FRACTION_GRID = (0.001, 0.005, 0.01, 0.02)  # of the case's pixels (voxels)
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7)
_MAX_COMBINATIONS = 4096  # threshold settings tried at once for one nested region
_TOLERANCE = 1e-12  # a gain below this is float noise, not a reason to change anything


@dataclass(frozen=True)
class PostProcess:
    """Chosen post-processing settings; `dataclasses.asdict` gives its JSON.

    Attributes:
        min_size: binary only: components smaller than this many pixels (voxels) are removed; 0 keeps all.
        fill_holes: binary only: fill enclosed holes (per 2-D image or slice).
        thresholds: per foreground class 1..K-1, a probability threshold or None (argmax rule);
            None altogether for the plain argmax.
        min_fraction: binary only: components smaller than this share of the case's pixels (voxels)
            are removed too (the larger of the two sizes applies); 0 for none.
        largest: binary only: keep the largest component only.
        parents: with thresholds on nested regions, per class 1..K-1 the class enclosing it (0: none;
            `nesting`); None when no region nests.
    """

    min_size: int = 0
    fill_holes: bool = False
    thresholds: tuple[float | None, ...] | None = None
    min_fraction: float = 0.0
    largest: bool = False
    parents: tuple[int, ...] | None = None

    def size_for(self, voxels: int) -> int:
        """The smallest component kept in a case of `voxels` pixels (voxels)."""
        return max(int(self.min_size), int(np.ceil(self.min_fraction * voxels)))


def nesting(regions: Mapping[str, Sequence[int]], num_classes: int) -> tuple[int, ...] | None:
    """Per class 1..K-1 the class whose scored region encloses it (0: none), or None when no region
    nests. A class's region is the smallest scored region holding it; the regions nest when each
    class's region is the class and every class whose region lies inside it (LiTS: liver = [1, 2],
    tumour = [2] gives (0, 1)). Regions that overlap without nesting give None (per-class rule)."""
    own = {}
    for c in range(1, num_classes):
        holding = [frozenset(labels) for labels in regions.values() if c in labels]
        if not holding:
            return None
        own[c] = min(holding, key=len)
    parents = []
    for c in range(1, num_classes):
        outer = [own[a] for a in own if a != c and own[c] < own[a]]
        if not outer:
            parents.append(0)
            continue
        enclosing = min(outer, key=len)
        owners = [a for a in own if own[a] == enclosing and a not in own[c]]
        if len(owners) != 1:
            return None
        parents.append(owners[0])
    for c in range(1, num_classes):  # a region is its class and the classes nested in it, nothing else
        inside = {d for d in range(1, num_classes) if _encloses(parents, c, d)}
        if own[c] != frozenset(inside):
            return None
    return tuple(parents) if any(parents) else None


def _encloses(parents: Sequence[int], c: int, d: int) -> bool:
    """Whether class c is d or encloses d (parents: per class 1..K-1, 0 for none)."""
    while d:
        if d == c:
            return True
        d = parents[d - 1]
    return False


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
    labels, sizes = _components(mask)
    return _kept(sizes, min_size)[labels]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component labels (full connectivity) and the size of each label (index 0: background)."""
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    return labels, np.bincount(labels.ravel())


def keep_largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask (full connectivity; ties: the lowest label)."""
    labels, sizes = _components(mask.astype(bool))
    return _kept(sizes, largest=True)[labels]


def _kept(sizes: np.ndarray, least: int = 0, largest: bool = False) -> np.ndarray:
    """Which component labels a rule keeps (index 0, background, never): the largest only, or every
    component of at least `least` pixels (voxels). One rule for `apply` and the `Selector`'s scores."""
    if largest:
        keep = np.zeros(len(sizes), bool)
        if len(sizes) > 1:
            keep[1 + int(np.argmax(sizes[1:]))] = True
        return keep
    keep = sizes >= least
    keep[0] = False
    return keep


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a binary (H, W) mask, or of each slice of a (D, H, W) mask.

    A hole is background not 4-connected to the image border: an enclosed hole is filled, a notch
    open to the outside is not.
    """
    mask = mask.astype(bool)
    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def apply_binary(mask: np.ndarray, min_size: int, fill: bool, largest: bool = False) -> np.ndarray:
    """Small components removed (below `min_size`; only the largest with `largest`), then holes filled
    if `fill`; bool mask."""
    mask = keep_largest(mask) if largest else remove_small_components(mask, min_size)
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
    labels = labels_at(probs, shape, postprocess.thresholds, postprocess.parents)
    if fov is not None:
        labels[~fov] = 0
    min_size = postprocess.size_for(labels.size)
    if min_size <= 1 and not postprocess.fill_holes and not postprocess.largest:
        return labels
    if probs.shape[0] != 2:
        raise ValueError(f"component and hole rules are for binary tasks, got {probs.shape[0]} classes")
    mask = apply_binary(labels == 1, min_size, postprocess.fill_holes, postprocess.largest)
    return mask.astype(np.uint8)


class Selector:
    """`choose_postprocess` one validation case at a time: memory is the per-candidate sums of Dice
    (candidates x regions floats; for a nested region, one per combination of the thresholds inside
    it) and one case's arrays while it is added, whatever the number of cases.

    Args:
        num_classes: K; binary (K = 2) chooses the component rule and fill, K > 2 per-class thresholds.
        min_sizes, min_fractions, grid: the candidate sizes (absolute, relative: binary) and thresholds
            (multi-class).
        parents: nested regions (`nesting`): thresholds chosen on the scored regions, innermost first.
    """

    def __init__(
        self,
        num_classes: int,
        min_sizes: Sequence[int] = MIN_SIZE_GRID,
        grid: Sequence[float] = THRESHOLD_GRID,
        min_fractions: Sequence[float] = MIN_FRACTION_GRID,
        parents: Sequence[int] | None = None,
    ) -> None:
        self.num_classes, self.cases = num_classes, 0
        # from the smallest change up: only a real gain moves the choice
        self.rules = [
            *(("size", int(m)) for m in sorted(min_sizes)),
            *(("fraction", float(f)) for f in sorted(min_fractions)),
            ("largest", None),
        ]
        self.candidates = [None, *sorted(grid, key=lambda t: (abs(t - 0.5), t))]
        self.parents = tuple(parents) if parents is not None and any(parents) else None
        if num_classes == 2:
            self.before, self.sums = 0.0, np.zeros((len(self.rules), 2))
            return
        links = self.parents or (0,) * (num_classes - 1)
        # per class c, the classes of its region (c and those nested in it), whose thresholds set its Dice
        self.inside = {
            c: [d for d in range(1, num_classes) if _encloses(links, c, d)] for c in range(1, num_classes)
        }
        for c, inside in self.inside.items():
            if len(self.candidates) ** len(inside) > _MAX_COMBINATIONS:
                raise ValueError(
                    f"class {c}'s region nests {len(inside)} classes: {len(self.candidates)}^{len(inside)} "
                    f"threshold settings to try; give fewer candidate thresholds"
                )
        self.sums = {c: np.zeros(len(self.candidates) ** len(inside)) for c, inside in self.inside.items()}

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
            for c, dice in score.items():
                self.sums[c] += dice
        self.cases += 1

    def _score_binary(self, mask: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        """Dice of (component rule, fill) candidates from per-component counts: the mask is labelled
        once; each rule keeps a set of components, so its Dice without filling is a sum over
        components, and holes are filled once per distinct kept set."""
        labels, sizes = _components(mask)  # labelled once per case, not once per rule
        tp = np.bincount(labels[target], minlength=len(sizes)).astype(np.float64)  # per component
        actual = float(np.count_nonzero(target))
        dice, filled = np.zeros((len(self.rules), 2)), {}
        for i, (kind, value) in enumerate(self.rules):
            least = int(np.ceil(value * mask.size)) if kind == "fraction" else value or 0
            keep = _kept(sizes, least, largest=kind == "largest")
            dice[i, 0] = dice_from_counts(tp[keep].sum(), sizes[keep].sum(), actual)
            key = keep.tobytes()
            if key not in filled:
                filled[key] = overlap_metrics(fill_holes(keep[labels]), target)["dice"]
            dice[i, 1] = filled[key]
        return overlap_metrics(mask, target)["dice"], dice

    def _score_thresholds(
        self, probs: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None
    ) -> dict[int, np.ndarray]:
        """Per class c, the Dice of c's scored region (c alone, or c and the classes nested in it) under
        every combination of the thresholds inside that region (product over `self.inside[c]`)."""
        if probs.shape[0] != self.num_classes:
            raise ValueError(f"probabilities of {probs.shape[0]} classes for a {self.num_classes}-class task")
        n = len(self.candidates)
        counts = {c: np.zeros((3, n ** len(inside))) for c, inside in self.inside.items()}  # tp, pred, truth
        tables = {c: np.isin(np.arange(self.num_classes), inside) for c, inside in self.inside.items()}
        lowest = min((t for t in self.candidates if t is not None), default=np.inf)
        slices = [target] if target.ndim == 2 else target
        fovs = [None] * len(slices) if fov is None else ([fov] if fov.ndim == 2 else fov)
        for p, t, inside_fov in zip(slices_at(probs, target.shape), slices, fovs, strict=True):
            # only voxels that some setting can make foreground are labelled: the foreground's total
            # probability bounds every region's, so below the lowest threshold and p_0 none can
            foreground = p[1:].sum(0)
            live = (foreground >= lowest) | (foreground > p[0])
            if inside_fov is not None:
                live &= inside_fov  # background outside the field of view: as `apply` makes it
            rule = ThresholdRule(p[:, live], self.parents)
            truth_live = t[live]
            for c, inside in self.inside.items():
                table = tables[c]
                counts[c][2] += np.count_nonzero(table[t])
                truth = table[truth_live]
                for j, combo in enumerate(itertools.product(self.candidates, repeat=len(inside))):
                    thresholds = [None] * (self.num_classes - 1)
                    for d, value in zip(inside, combo, strict=True):
                        thresholds[d - 1] = value
                    pred = table[rule.labels(thresholds)]
                    counts[c][0, j] += np.count_nonzero(pred & truth)
                    counts[c][1, j] += np.count_nonzero(pred)
        return {c: dice_from_counts(tp, predicted, actual) for c, (tp, predicted, actual) in counts.items()}

    def result(self) -> Selection:
        """The choice (METHOD.md's rule, ties to the smallest change) and the mean Dice before/after."""
        if self.cases == 0:
            raise ValueError("no validation case to choose post-processing on")
        if self.num_classes == 2:
            means = self.sums / self.cases
            before = self.before / self.cases
            best, best_dice = PostProcess(), before
            for i, (kind, value) in enumerate(self.rules):
                for fill in (False, True):
                    if means[i, int(fill)] > best_dice + _TOLERANCE:
                        best_dice = float(means[i, int(fill)])
                        best = PostProcess(
                            min_size=value if kind == "size" else 0,
                            fill_holes=fill,
                            min_fraction=value if kind == "fraction" else 0.0,
                            largest=kind == "largest",
                        )
            return Selection(best, float(before), float(best_dice))
        chosen: dict[int, int] = {}  # class -> index into self.candidates
        after = {}
        for c in sorted(self.inside, key=lambda c: len(self.inside[c])):  # innermost regions first
            means = self.sums[c] / self.cases
            inside = self.inside[c]
            best, best_dice = 0, -np.inf
            for i in range(len(self.candidates)):
                combo = tuple(i if d == c else chosen[d] for d in inside)
                dice = means[_combo_index(combo, len(self.candidates))]
                if dice > best_dice + _TOLERANCE:
                    best, best_dice = i, dice
            chosen[c], after[c] = best, best_dice
        before = np.mean([self.sums[c][0] / self.cases for c in self.inside])  # every threshold None
        thresholds = tuple(self.candidates[chosen[c]] for c in range(1, self.num_classes))
        if all(t is None for t in thresholds):
            return Selection(PostProcess(), float(before), float(before))
        settings = PostProcess(thresholds=thresholds, parents=self.parents)
        return Selection(settings, float(before), float(np.mean(list(after.values()))))


def _combo_index(combo: Sequence[int], n: int) -> int:
    """The position of a combination of candidate indices in itertools.product order."""
    index = 0
    for i in combo:
        index = index * n + i
    return index


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
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    min_sizes: Sequence[int] = MIN_SIZE_GRID,
    min_fractions: Sequence[float] = MIN_FRACTION_GRID,
) -> Selection:
    """The component rule (absolute size, relative size, largest only) and fill with the best mean
    validation Dice over cases (ties: the smallest change).

    Args:
        preds: per validation case, probabilities (2, ...) or a binary mask / label map (...).
        targets: per case, the binary mask or label map (foreground = 1), same order.
        min_sizes, min_fractions: the candidate sizes; every rule is tried with and without filling.

    Returns:
        Selection(PostProcess(min_size | min_fraction | largest, fill_holes), dice_before, dice_after).
    """
    return _choose(preds, targets, 2, min_sizes=min_sizes, min_fractions=min_fractions)


def choose_thresholds(
    probs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    grid: Sequence[float] = THRESHOLD_GRID,
    parents: Sequence[int] | None = None,
) -> Selection:
    """Per-class thresholds with the best mean validation Dice of each class (ties: the smallest change).

    Args:
        probs: per validation case, probabilities (K, ...).
        targets: per case, the label map (...), same order.
        grid: candidate thresholds; None (the argmax rule) is always a candidate and wins ties.
        parents: nested regions (`nesting`), chosen on the regions scored.

    Returns:
        Selection(PostProcess(thresholds=..., parents=...), dice_before, dice_after); Dice means are
        over cases and scored regions (each foreground class alone without nesting). thresholds is None
        when no class changes.
    """
    return _choose(probs, targets, probs[0].shape[0], grid=grid, parents=parents)


def choose_postprocess(
    probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], parents: Sequence[int] | None = None
) -> Selection:
    """The METHOD.md choice on validation cases: `choose_binary` for K = 2, `choose_thresholds` for K > 2."""
    return _choose(probs, targets, probs[0].shape[0], parents=parents)
