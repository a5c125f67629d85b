"""DRGO's distance maps d(x) (METHOD.md section 2, boundary refinement), on the data side.

Computed per sample in the DataLoader workers after augmentation (SegDataset, MixCollate), never in
the loss: scipy's exact Euclidean transform is a CPU job. The loss's own edge map
(`medfusion.losses.drgo.edge_map`, on tensors) marks the same pixels (tested).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# label of the pixels outside a field of view in training masks (SegDataset(roi=True)): no class has
# it; d(x) counts them as background
OUTSIDE_ROI = 255


def label_edges(mask: np.ndarray) -> np.ndarray:
    """E(x): True where a label map (H, W) differs from one of its 4-neighbours; bool (H, W)."""
    mask = np.asarray(mask)
    edges = np.zeros(mask.shape, dtype=bool)
    dx = mask[:, 1:] != mask[:, :-1]
    dy = mask[1:, :] != mask[:-1, :]
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    return edges


def distance_map(mask: np.ndarray) -> np.ndarray:
    """d(x): Euclidean distance to the nearest edge pixel of a label map (H, W) -> float32 (H, W).

    A map without edges (empty or all one class) gets H + W everywhere: further than any real distance.
    OUTSIDE_ROI pixels are background here: the edge of a field of view is no label edge.
    """
    edges = label_edges(np.where(mask == OUTSIDE_ROI, 0, mask))
    if not edges.any():
        return np.full(edges.shape, float(sum(edges.shape)), dtype=np.float32)
    return ndimage.distance_transform_edt(~edges).astype(np.float32)
