"""Soft Dice loss (the paper trains with Dice), optionally plus cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft Dice loss averaged over batch and classes (background included).

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, H, W) int64 in [0, C).
        eps: smoothing added to numerator and denominator, so an empty class predicted empty scores 1.

    Returns:
        Scalar; 0 for a perfect prediction. Computed in fp32 whatever the autocast dtype.
    """
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    inter = (probs * onehot).sum(dim=(2, 3))  # (B, C)
    denom = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))  # (B, C)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: Tensor, target: Tensor, ce_weight: float = 0.0) -> Tensor:
    """L_seg of METHOD.md section 2: soft Dice + ce_weight x cross-entropy."""
    loss = soft_dice_loss(logits, target)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits.float(), target)
    return loss


class DiceCELoss(nn.Module):
    """`segmentation_loss` as a module; stores only `ce_weight`."""

    def __init__(self, ce_weight: float = 0.0) -> None:
        super().__init__()
        self.ce_weight = ce_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return segmentation_loss(logits, target, self.ce_weight)
