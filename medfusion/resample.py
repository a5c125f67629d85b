"""Class probabilities at the model's resolution -> label maps at a case's original geometry.

One function for the fold ensemble's scoring (`medfusion.evaluation`), post-processing at the original
resolution (`medfusion.postprocess`) and `medfusion predict`, so that a mask written by predict and
a mask scored by evaluate are made the same way.

Rule (our choice; METHOD.md says only "resampled back to its original geometry"): the K probability
maps of each 2-D image or slice are resized in-plane to the original H x W, bilinearly where they grow
and by area averaging where they shrink (cv2), and the label is taken there (argmax, or the per-class
thresholds of `postprocess.apply_thresholds`). Resizing probabilities, not labels, keeps boundaries
smooth at 4x upsampling (a nearest-neighbour resize of a 256x256 label map to 999x960 gives
staircase vessel edges). Volumes are sliced along their first axis and never resampled in z
(preprocessing keeps every slice), so a volume's slice count and spacing are its own.

Memory: one slice's K resized maps (K x H x W float32) at a time, plus the uint8 labels of the
output; never the K x D x H x W probabilities of a whole volume at the original size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import cv2
import numpy as np


def resize_probs(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) probabilities -> (K, H, W) float32 at `size` = (H, W); unchanged when h, w = H, W."""
    probs = np.asarray(probs, dtype=np.float32)
    h, w = probs.shape[1:]
    if (h, w) == tuple(size):
        return probs
    grows = size[0] * size[1] >= h * w
    interpolation = cv2.INTER_LINEAR if grows else cv2.INTER_AREA
    # cv2 takes (H, W, K) with up to 512 channels; one map at a time keeps K = 1..2 working too
    return np.stack([cv2.resize(p, (size[1], size[0]), interpolation=interpolation) for p in probs])


def slices_at(probs: np.ndarray, shape: Sequence[int]) -> Iterator[np.ndarray]:
    """The (K, H, W) probabilities of each 2-D image or slice of `probs`, resized to `shape`'s last two axes.

    Args:
        probs: (K, h, w) for a 2-D image or (K, D, h, w) for a volume's D slices.
        shape: the original (H, W) or (D, H, W); D must match.
    """
    size = (int(shape[-2]), int(shape[-1]))
    if probs.ndim == 3:
        if len(shape) != 2:
            raise ValueError(f"2-D probabilities {probs.shape} for a case of shape {tuple(shape)}")
        yield resize_probs(probs, size)
        return
    if len(shape) != 3 or probs.shape[1] != shape[0]:
        raise ValueError(f"{probs.shape[1]} slices of probabilities for a volume of shape {tuple(shape)}")
    for k in range(probs.shape[1]):
        yield resize_probs(probs[:, k], size)


def apply_thresholds(
    probs: np.ndarray,
    thresholds: Sequence[float | None] | None,
    parents: Sequence[int] | None = None,
) -> np.ndarray:
    """Label map from probabilities with per-class thresholds (the rule of medfusion.postprocess's docstring).

    Args:
        probs: (K, H, W) or (K, D, H, W) class probabilities, K >= 2.
        thresholds: K-1 values for classes 1..K-1, each a probability or None (argmax rule);
            None altogether for the plain argmax.
        parents: nested regions (LiTS: liver = labels 1+2 encloses tumour = 2): per class 1..K-1 the
            class whose region encloses it, 0 for none (`postprocess.nesting`); None when no region
            nests. A class's threshold then applies to its region's probability (its own and its
            descendants' summed), and a voxel whose class is rejected by its threshold falls back to
            the enclosing class where that region beats background.

    Returns:
        uint8 class indices of shape probs.shape[1:].
    """
    if thresholds is None:
        return probs.argmax(0).astype(np.uint8)
    if len(thresholds) != probs.shape[0] - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {probs.shape[0] - 1} foreground classes")
    return ThresholdRule(probs, parents).labels(thresholds)


class ThresholdRule:
    """The threshold rule on one image's or volume's probabilities, with what does not depend on the
    thresholds (the candidate class, the region probabilities) computed once, so that many threshold
    settings are cheap to try (`postprocess.Selector`). Memory: the candidate (int64) and one float
    map per nested class (the region probabilities), of the probabilities' spatial shape.

    Rule (classes c = 1..K-1, candidate = argmax_{k >= 1} p_k, the lowest index on ties; P_c = p_c, or
    for a class that encloses others its region's probability, the sum over the region's classes):
      - the candidate c is kept when P_c >= t_c, or with t_c None when p_c > p_0 (the argmax rule);
      - nested regions only: a candidate rejected by its threshold (t_c set) falls back to the class
        a enclosing it when P_a >= t_a, or with t_a None when P_a > p_0 (the enclosing region beats
        background), and so on outward; a candidate rejected by the argmax rule falls back only to an
        enclosing class with a threshold (P_a >= t_a). All thresholds None is exactly the argmax.
    """

    def __init__(self, probs: np.ndarray, parents: Sequence[int] | None = None) -> None:
        self.probs, self.k = probs, probs.shape[0] - 1
        self.parents = None if parents is None or not any(parents) else [0, *(int(p) for p in parents)]
        self.candidate = probs[1:].argmax(0) + 1
        self.p_candidate = np.take_along_axis(probs, self.candidate[None], axis=0)[0]
        self.region: dict[int, np.ndarray] = {}
        if self.parents is not None:
            for c in range(1, self.k + 1):
                inside = [d for d in range(1, self.k + 1) if c in self._chain(d)]
                if len(inside) > 1:  # encloses other classes: its region's probability
                    self.region[c] = np.sum(probs[inside], axis=0)

    def _chain(self, c: int) -> list[int]:
        """c and the classes enclosing it, innermost first."""
        out = [c]
        while self.parents[out[-1]]:
            out.append(self.parents[out[-1]])
        return out

    def labels(self, thresholds: Sequence[float | None]) -> np.ndarray:
        """uint8 labels under `thresholds` (K-1 values, each a probability or None)."""
        p0, candidate = self.probs[0], self.candidate
        keep = np.zeros(candidate.shape, bool)
        for c, t in enumerate(thresholds, start=1):
            here = candidate == c
            if t is None:
                keep[here] = self.p_candidate[here] > p0[here]
            else:
                keep[here] = self.region.get(c, self.p_candidate)[here] >= t
        labels = np.where(keep, candidate, 0).astype(np.uint8)
        if self.parents is None:
            return labels
        by_threshold = np.zeros(candidate.shape, bool)  # rejected by a threshold, not by the argmax rule
        for c, t in enumerate(thresholds, start=1):
            if t is not None and self.parents[c]:
                by_threshold |= (candidate == c) & ~keep
        for c in range(1, self.k + 1):
            chain = self._chain(c)
            if len(chain) < 2:
                continue
            open_ = (candidate == c) & ~keep  # rejected, not yet placed
            for a in chain[1:]:
                if not open_.any():
                    break
                t = thresholds[a - 1]
                p_a = self.region.get(a, self.probs[a])
                accept = open_ & (p_a >= t if t is not None else by_threshold & (p_a > p0))
                labels[accept] = a
                open_ &= ~accept
        return labels


def labels_at(
    probs: np.ndarray,
    shape: Sequence[int],
    thresholds: Sequence[float | None] | None = None,
    parents: Sequence[int] | None = None,
) -> np.ndarray:
    """uint8 class labels of `shape` from probabilities (K, [D,] h, w): argmax, or per-class thresholds
    (`apply_thresholds`, nested by `parents`), after the in-plane resize of the module docstring."""
    out = np.empty(tuple(shape), np.uint8)
    for k, p in enumerate(slices_at(probs, shape)):
        labels = apply_thresholds(p, thresholds, parents)
        if out.ndim == 2:
            out[...] = labels
        else:
            out[k] = labels
    return out
