"""Dynamic Region-Guided Optimisation (METHOD.md section 2) as pure functions.

Notation: logits (B, K, H, W), probabilities p = softmax(logits), target y (B, H, W) int64, regions
R_1..R_N = the grid of `size` x `size` squares in row-major order (N = H W / size^2), class frequencies
`class_freq` (K,) of the training split. No function keeps state: the confidence average that drives
gamma lives in the training loop and is passed in; random draws take an explicit generator.

The objective (`drgo_loss`): L = L_seg + alpha L_ada + beta L_bnd + delta L_drs, each extra term
present only when its switch is on (`use_adaptive`, `use_boundary`, `use_sampling`). Everything is
computed in fp32 whatever the autocast dtype of the model.

Decisions where METHOD.md is silent (also in the closing note of the DRGO issue):
* Class frequencies are Laplace-smoothed, (count_c + 1) / (total + K), so that a class absent from the
  training split has a finite -log pi.
* Importance weights (a, b, c) are normalised to sum to 1 (params.yaml writes [1, 1, 1] for 1/3 each).
* If every region's importance is 0, the sampling distribution is uniform (its first term is 0/0).
* If all lambda are 0 (no uncertainty and g = 1), the weights are uniform (lambda_i = 1).
* An image without any edge (empty or all-foreground mask) has d(x) = H + W everywhere (further than
  any real distance), so w(x) is small but not zero and the pair term still asks for agreement.
* |Sobel| is the gradient magnitude sqrt(gx^2 + gy^2) with replicate padding; the edge-consistency BCE
  clamps E_hat to [1e-6, 1 - 1e-6].
* |grad p|_1 uses forward differences, summed over classes and both axes (0 past the last row/column).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medfusion.losses.dice import segmentation_loss

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


@dataclass(frozen=True)
class DRGOSettings:
    """The `drgo` section of params.yaml (the same keys: `DRGOSettings(**section, use_boundary=...)`)
    plus CASNet's `use_boundary` switch. `confidence_momentum` is the training loop's (c_t)."""

    use_sampling: bool = True
    use_adaptive: bool = True
    use_boundary: bool = True
    alpha: float = 0.5
    beta: float = 0.5
    delta: float = 0.5
    smooth_weight: float = 0.1
    gamma0: float = 1.0
    region_size: int = 32
    regions_per_image: int = 8
    tau: float = 1.0
    eps: float = 0.1
    importance_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    confidence_momentum: float = 0.9


# --- regions -------------------------------------------------------------------------------------


def region_mean(x: Tensor, size: int) -> Tensor:
    """Mean over each size x size region: (B, H, W) -> (B, N) or (B, C, H, W) -> (B, C, N)."""
    h, w = x.shape[-2:]
    if h % size or w % size:
        raise ValueError(
            f"DRGO: image {h}x{w} is not a whole number of {size}x{size} regions (drgo.region_size)"
        )
    if x.dim() == 3:
        return F.avg_pool2d(x[:, None], size).flatten(1)
    return F.avg_pool2d(x, size).flatten(2)


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise (B, N) over each image's regions; a constant row becomes 0."""
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-12), torch.zeros_like(x))


def class_frequencies(
    masks: np.ndarray, num_classes: int, indices: Sequence[int] | None = None, chunk: int = 256
) -> Tensor:
    """pi(c) over the label maps `masks[indices]` (all of them when None), Laplace-smoothed:
    (count_c + 1) / (total + K); shape (K,).

    Counted `chunk` maps at a time, so that a memory-mapped stack (N, H, W) is read once and the
    int64 counts never hold more than one chunk: memory chunk x H x W x 8 bytes, whatever N.
    """
    rows = range(len(masks)) if indices is None else list(indices)
    counts = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        part = np.asarray(masks[rows[start : start + chunk]]).reshape(-1)
        counts += np.bincount(part, minlength=num_classes)[:num_classes]
    return smoothed_frequencies(counts)


def smoothed_frequencies(counts: np.ndarray) -> Tensor:
    """pi(c) from pixel counts per class, Laplace-smoothed: (count_c + 1) / (total + K); shape (K,)."""
    counts = np.asarray(counts, dtype=np.float64)
    return torch.tensor((counts + 1) / (counts.sum() + len(counts)), dtype=torch.float32)


def entropy(probs: Tensor) -> Tensor:
    """H(p(x)) = -sum_c p log p: (B, K, H, W) -> (B, H, W)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def sobel_magnitude(x: Tensor) -> Tensor:
    """|Sobel(x)| = sqrt(gx^2 + gy^2), replicate padding: (B, H, W) -> (B, H, W)."""
    kx = torch.tensor(SOBEL_X, dtype=x.dtype, device=x.device)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grads = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, H, W)
    return (grads.square().sum(dim=1) + 1e-12).sqrt()


def region_cross_entropy(logits: Tensor, target: Tensor, size: int) -> Tensor:
    """L_region(R_i): mean per-pixel cross-entropy in each region, (B, N)."""
    return region_mean(F.cross_entropy(logits, target, reduction="none"), size)


# --- dynamic region sampling (3.4.1) ---------------------------------------------------------------


def region_importance(
    probs: Tensor, target: Tensor, class_freq: Tensor, size: int, weights: tuple[float, float, float]
) -> Tensor:
    """Imp(R) = a Freq~ + b Bnd~ + c Conf~ (each min-max normalised over the image's regions), (B, N).

    Freq = mean -log pi(y); Bnd = mean |Sobel(p_fg)|, p_fg = 1 - p_background; Conf = mean H(p) / log K.
    Uses p.detach().
    """
    probs = probs.detach()
    freq = region_mean((-class_freq.to(probs.device).log())[target], size)
    bnd = region_mean(sobel_magnitude(1 - probs[:, 0]), size)
    conf = region_mean(entropy(probs) / math.log(probs.shape[1]), size)
    a, b, c = (w / sum(weights) for w in weights)
    return a * minmax(freq) + b * minmax(bnd) + c * minmax(conf)


def sampling_probabilities(importance: Tensor, tau: float, eps: float) -> Tensor:
    """P(R_i) = (1 - eps) Imp_i^(1/tau) / sum_j Imp_j^(1/tau) + eps / N; rows sum to 1, each >= eps / N."""
    n = importance.shape[1]
    powered = importance.clamp_min(0) ** (1 / tau)
    total = powered.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, powered / total.clamp_min(1e-12), torch.full_like(powered, 1 / n))
    return (1 - eps) * share + eps / n


def sampled_region_loss(
    region_losses: Tensor, probabilities: Tensor, draws: int, generator: torch.Generator | None = None
) -> Tensor:
    """L_drs: mean over `draws` regions per image drawn from P with replacement (and over images).

    Its expectation is mean_b sum_i P_bi L_bi (`expected_region_loss`).
    """
    index = torch.multinomial(probabilities, draws, replacement=True, generator=generator)  # (B, draws)
    return region_losses.gather(1, index).mean()


def expected_region_loss(region_losses: Tensor, probabilities: Tensor) -> Tensor:
    """E[L_drs] = mean over images of sum_i P(R_i) L_region(R_i)."""
    return (probabilities * region_losses).sum(dim=1).mean()


# --- adaptive loss weighting (3.4.2) ---------------------------------------------------------------


def gamma(gamma0: float, confidence: float | Tensor) -> float | Tensor:
    """g = gamma0 (1 - c_t), c_t the moving average of the batches' mean max-probability (a float, or a
    0-dim tensor on the training device: then g is one too, and nothing waits for the device)."""
    return gamma0 * (1 - confidence)


def batch_confidence(probs: Tensor) -> Tensor:
    """The batch's mean max-probability, the quantity the loop averages into c_t; 0-dim, detached."""
    return probs.detach().amax(dim=1).mean()


def class_imbalance(target: Tensor, class_freq: Tensor, size: int, num_classes: int) -> Tensor:
    """CI(R) = min_c pi(c) / pi(c*), c* the most frequent ground-truth class in R (ties: lowest index), (B, N)."""
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    c_star = region_mean(onehot, size).argmax(dim=1)  # (B, N)
    class_freq = class_freq.to(target.device)
    return class_freq.min() / class_freq[c_star]


def adaptive_weights(
    probs: Tensor, target: Tensor, class_freq: Tensor, size: int, g: float | Tensor
) -> Tensor:
    """lambda_i = g U(R_i) + (1 - g) CI(R_i), rescaled so that each image's lambdas sum to N; (B, N)."""
    probs = probs.detach()
    k = probs.shape[1]
    uncertainty = region_mean(entropy(probs) / math.log(k), size)
    lam = g * uncertainty + (1 - g) * class_imbalance(target, class_freq, size, k)
    n = lam.shape[1]
    total = lam.sum(dim=1, keepdim=True)
    return torch.where(total > 0, n * lam / total.clamp_min(1e-12), torch.ones_like(lam))


def adaptive_loss(region_losses: Tensor, weights: Tensor) -> Tensor:
    """L_ada = (1/N) sum_i lambda_i L_region(R_i), averaged over images."""
    return (weights * region_losses).mean()


# --- boundary refinement (3.4.3) -------------------------------------------------------------------


def edge_map(target: Tensor) -> Tensor:
    """E(x) = 1 where y differs from one of its 4-neighbours: (B, H, W) int -> (B, H, W) float."""
    edges = torch.zeros_like(target, dtype=torch.bool)
    dx = target[..., :, 1:] != target[..., :, :-1]
    dy = target[..., 1:, :] != target[..., :-1, :]
    edges[..., :, 1:] |= dx
    edges[..., :, :-1] |= dx
    edges[..., 1:, :] |= dy
    edges[..., :-1, :] |= dy
    return edges.float()


def boundary_weights(distance: Tensor) -> Tensor:
    """w(x) = 1 / (1 + d(x))."""
    return 1 / (1 + distance)


def pair_loss(probs: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """L_pair over 4-neighbour pairs (i, j), w_ij = (w_i + w_j) / 2: (1/2) ||p_i - p_j||^2 where y_i = y_j,
    (1 - (1/2) ||p_i - p_j||_1)^2 where they differ; sum w_ij term / sum w_ij. 0 for a perfect one-hot
    prediction; 1 (the maximum) where every pair's relation is inverted."""
    numerator = probs.new_zeros(())
    denominator = probs.new_zeros(())
    for axis in (-1, -2):  # horizontal pairs, then vertical pairs
        n = probs.shape[axis]
        p_i, p_j = probs.narrow(axis, 1, n - 1), probs.narrow(axis, 0, n - 1)
        y_i, y_j = target.narrow(axis, 1, n - 1), target.narrow(axis, 0, n - 1)
        w_ij = (weights.narrow(axis, 1, n - 1) + weights.narrow(axis, 0, n - 1)) / 2
        diff = p_i - p_j  # (B, K, ...)
        term = torch.where(
            y_i == y_j, 0.5 * diff.square().sum(dim=1), (1 - 0.5 * diff.abs().sum(dim=1)).square()
        )
        numerator = numerator + (w_ij * term).sum()
        denominator = denominator + w_ij.sum()
    return numerator / denominator.clamp_min(1e-12)


def smoothness_loss(probs: Tensor, weights: Tensor) -> Tensor:
    """L_smooth = mean_x (1 - w(x)) |grad p(x)|_1 (forward differences, summed over classes and axes)."""
    gx = F.pad((probs[..., :, 1:] - probs[..., :, :-1]).abs().sum(dim=1), (0, 1))
    gy = F.pad((probs[..., 1:, :] - probs[..., :-1, :]).abs().sum(dim=1), (0, 0, 0, 1))
    return ((1 - weights) * (gx + gy)).mean()


def edge_consistency_loss(probs: Tensor, edges: Tensor) -> Tensor:
    """L_edge = BCE(E_hat, E), E_hat = clamp(|Sobel(p_fg)| / 4, 0, 1)."""
    e_hat = (sobel_magnitude(1 - probs[:, 0]) / 4).clamp(1e-6, 1 - 1e-6)
    return -(edges * e_hat.log() + (1 - edges) * (1 - e_hat).log()).mean()


def boundary_loss(probs: Tensor, target: Tensor, distance: Tensor, smooth_weight: float) -> dict[str, Tensor]:
    """L_bnd = L_pair + phi L_smooth + L_edge, with its parts."""
    weights = boundary_weights(distance)
    parts = {
        "pair": pair_loss(probs, target, weights),
        "smooth": smoothness_loss(probs, weights),
        "edge": edge_consistency_loss(probs, edge_map(target)),
    }
    parts["bnd"] = parts["pair"] + smooth_weight * parts["smooth"] + parts["edge"]
    return parts


# --- the objective ---------------------------------------------------------------------------------


def drgo_loss(
    logits: Tensor,
    target: Tensor,
    class_freq: Tensor,
    settings: DRGOSettings,
    confidence: float | Tensor,
    distance: Tensor | None = None,
    ce_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_seg + alpha L_ada + beta L_bnd + delta L_drs.

    Args:
        logits: (B, K, H, W), any dtype (computed in fp32).
        target: (B, H, W) int64.
        class_freq: (K,) pi(c) of the training split.
        settings: weights and switches.
        confidence: c_t, held by the training loop (a float, or a 0-dim tensor on the device).
        distance: (B, H, W) d(x) from the data side; required when use_boundary.
        ce_weight: L_seg's cross-entropy weight.
        generator: for the region draws.

    Returns:
        The loss and its terms as detached 0-dim tensors on the logits' device (seg, ada, bnd, drs,
        pair, smooth, edge, gamma, confidence: the batch's mean max-probability, for the loop's moving
        average). They stay on the device: reading one (`float(t)`) waits for the device, so the loop
        sums them there and reads the sums once per epoch.
    """
    logits = logits.float()
    probs = logits.softmax(dim=1)
    seg = segmentation_loss(logits, target, ce_weight)
    loss = seg
    terms = {"seg": seg.detach(), "confidence": batch_confidence(probs)}
    s = settings
    if s.use_adaptive or s.use_sampling:
        region_losses = region_cross_entropy(logits, target, s.region_size)
    if s.use_adaptive:
        g = gamma(s.gamma0, confidence)
        ada = adaptive_loss(region_losses, adaptive_weights(probs, target, class_freq, s.region_size, g))
        loss = loss + s.alpha * ada
        terms.update(ada=ada.detach(), gamma=torch.as_tensor(g, dtype=torch.float32, device=logits.device))
    if s.use_boundary:
        if distance is None:
            raise ValueError("DRGO boundary refinement needs the distance maps d(x) of the batch")
        parts = boundary_loss(probs, target, distance.float(), s.smooth_weight)
        loss = loss + s.beta * parts["bnd"]
        terms.update({k: v.detach() for k, v in parts.items()})
    if s.use_sampling:
        importance = region_importance(probs, target, class_freq, s.region_size, s.importance_weights)
        probabilities = sampling_probabilities(importance, s.tau, s.eps)
        drs = sampled_region_loss(region_losses, probabilities, s.regions_per_image, generator)
        loss = loss + s.delta * drs
        terms["drs"] = drs.detach()
    return loss, terms
