import math

import numpy as np
import pytest
import torch

from medfusion.losses import segmentation_loss, soft_dice_loss
from medfusion.metrics import case_metrics, overlap_metrics


def _logits_from(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


def test_soft_dice_perfect_is_zero_and_inverted_is_near_one():
    target = torch.tensor([[[0, 1], [1, 0]]])  # shape: (1, 2, 2)
    assert soft_dice_loss(_logits_from(target, 2), target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(_logits_from(1 - target, 2), target).item() == pytest.approx(1.0, abs=1e-6)


def test_soft_dice_half_overlap_by_hand():
    # probabilities exactly 0/1 for class 1 on [1, 1, 0, 0] vs target [1, 0, 1, 0]:
    # class 1: inter 1, denom 2 + 2 -> dice 1/2; class 0 the same -> loss 1/2
    target = torch.tensor([[[1, 0, 1, 0]]])  # shape: (1, 1, 4)
    pred = torch.tensor([[[1, 1, 0, 0]]])
    assert soft_dice_loss(_logits_from(pred, 2, 100.0), target).item() == pytest.approx(0.5, abs=1e-5)


def test_loss_gradients_are_finite_on_saturated_and_empty_inputs():
    target = torch.zeros(2, 8, 8, dtype=torch.long)  # empty foreground
    logits = (_logits_from(target, 3, 1e4)).requires_grad_()
    loss = segmentation_loss(logits, target, ce_weight=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()


def test_ce_weight_adds_cross_entropy():
    target = torch.tensor([[[0, 1], [1, 1]]])
    logits = torch.randn(1, 2, 2, 2)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert segmentation_loss(logits, target, 0.5) == pytest.approx(soft_dice_loss(logits, target) + 0.5 * ce)


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        # shape: (4,) each; dice, iou, precision, recall
        ([1, 1, 0, 0], [1, 1, 0, 0], (1.0, 1.0, 1.0, 1.0)),
        ([1, 1, 0, 0], [0, 0, 1, 1], (0.0, 0.0, 0.0, 0.0)),
        ([1, 1, 1, 1], [1, 1, 0, 0], (2 / 3, 0.5, 0.5, 1.0)),
        ([1, 0, 0, 0], [1, 1, 0, 0], (2 / 3, 0.5, 1.0, 0.5)),
        ([0, 0, 0, 0], [0, 0, 0, 0], (1.0, 1.0, 1.0, 1.0)),  # empty rule: both empty is perfect
        ([1, 0, 0, 0], [0, 0, 0, 0], (0.0, 0.0, 0.0, 0.0)),  # anything on an empty target scores 0
        ([0, 0, 0, 0], [1, 0, 0, 0], (0.0, 0.0, 0.0, 0.0)),  # missed everything
    ],
)
def test_overlap_metrics_by_hand(pred, target, expected):
    m = overlap_metrics(np.array(pred), np.array(target))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == pytest.approx(expected)


def test_case_metrics_per_foreground_class_and_shape_check():
    target = np.array([[0, 1], [2, 2]])
    pred = np.array([[0, 1], [2, 0]])
    m = case_metrics(pred, target, 3)
    assert set(m) == {1, 2}
    assert m[1]["dice"] == 1.0 and m[2]["dice"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differs from target shape"):
        overlap_metrics(np.zeros((2, 2)), np.zeros((2, 3)))


def test_hd95_of_a_shifted_square_and_against_brute_force():
    from medfusion.metrics import hd95, surface

    a = np.zeros((32, 32), bool)
    a[8:20, 8:20] = True
    b = np.roll(a, 3, axis=1)  # shifted by 3 pixels
    # the left/right sides are 3 apart, top/bottom surface points match or are within 3: 95th pct = 3
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0 and hd95(a, np.zeros_like(a)) == pytest.approx(32 * np.sqrt(2))  # the diagonal
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
    assert hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    rng = np.random.default_rng(0)
    p, t = rng.random((20, 20)) > 0.7, rng.random((20, 20)) > 0.6
    sp, st = np.argwhere(surface(p)), np.argwhere(surface(t))
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    brute = np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
    assert hd95(p, t) == pytest.approx(brute)
