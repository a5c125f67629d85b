"""DRGO (METHOD.md section 2) on tiny hand-checkable cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medfusion.data.distance import distance_map, label_edges
from medfusion.losses import drgo
from medfusion.losses.drgo import DRGOSettings


def onehot_logits(labels: torch.Tensor, k: int, scale: float = 20.0) -> torch.Tensor:
    """Logits whose softmax is (nearly) the one-hot of labels (B, H, W) -> (B, K, H, W)."""
    return scale * F.one_hot(labels, k).permute(0, 3, 1, 2).float()


def test_region_mean_is_row_major_and_refuses_partial_regions():
    x = torch.arange(16.0).reshape(1, 4, 4)
    assert drgo.region_mean(x, 2).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    with pytest.raises(ValueError, match="6x6 is not a whole number of 4x4 regions"):
        drgo.region_mean(torch.zeros(1, 6, 6), 4)


def test_class_frequencies_are_smoothed():
    masks = np.array([[[0, 0], [0, 1]]])
    assert drgo.class_frequencies(masks, 3).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_importance_ranks_rare_class_boundary_and_entropy_regions_first():
    # 4x4 image, 2x2 regions: region 0 holds the rare class, region 1 a boundary, region 2 high entropy
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0:2, 0:2] = 1
    freq = torch.tensor([0.9, 0.1])
    probs = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert drgo.region_importance(probs, target, freq, 2, (1, 0, 0)).argmax().item() == 0  # rare class
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, 0] = 1
    probs[0, :, 0:2, 2] = torch.tensor([0.0, 1.0])[:, None]  # a foreground column inside region 1
    importance = drgo.region_importance(probs, torch.zeros_like(target), freq, 2, (0, 1, 0))
    assert importance[0, 1] == importance.max() and importance[0, 2] == 0  # boundary first; farthest region 0
    probs = torch.zeros(1, 2, 4, 4)
    probs[:, 0] = 1
    probs[0, :, 2:4, 0:2] = 0.5  # maximal entropy in region 2
    importance = drgo.region_importance(probs, torch.zeros_like(target), freq, 2, (0, 0, 1))
    assert importance.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_sampling_probabilities_sum_to_one_and_respect_the_floor():
    importance = torch.tensor([[0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    p = drgo.sampling_probabilities(importance, tau=1.0, eps=0.1)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert (p >= 0.1 / 4 - 1e-7).all()
    assert p[0].tolist() == pytest.approx([0.025, 0.025, 0.9 / 4 + 0.025, 0.9 * 3 / 4 + 0.025])
    assert p[1].tolist() == pytest.approx([0.25] * 4)  # no importance anywhere: uniform
    sharp = drgo.sampling_probabilities(importance[:1], tau=0.5, eps=0.1)
    assert sharp[0, 3] > p[0, 3]  # tau < 1 sharpens


def test_sampled_region_loss_averages_to_its_expectation():
    torch.manual_seed(0)
    losses = torch.rand(3, 16)
    probs = drgo.sampling_probabilities(torch.rand(3, 16), 1.0, 0.1)
    generator = torch.Generator().manual_seed(0)
    draws = [drgo.sampled_region_loss(losses, probs, 8, generator) for _ in range(4000)]
    mean = torch.stack(draws).mean()
    expected = drgo.expected_region_loss(losses, probs)
    assert expected == pytest.approx(float((probs * losses).sum(1).mean()))
    assert float(mean) == pytest.approx(float(expected), abs=3e-3)


def test_adaptive_weights_sum_to_n_and_follow_gamma():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 0:2, 0:2] = 1
    freq = torch.tensor([0.8, 0.2])
    probs = torch.rand(2, 2, 4, 4).softmax(1)
    for g in (0.0, 0.3, 1.0):
        lam = drgo.adaptive_weights(probs, target, freq, 2, g)
        assert torch.allclose(lam.sum(1), torch.full((2,), 4.0))
    ci = drgo.class_imbalance(target, freq, 2, 2)
    assert ci[0].tolist() == pytest.approx([1.0, 0.25, 0.25, 0.25])  # rare class region: 1; others 0.2/0.8
    lam = drgo.adaptive_weights(probs, target, freq, 2, 0.0)  # pure class imbalance
    assert lam[0].tolist() == pytest.approx([4 * 1 / 1.75, 4 * 0.25 / 1.75, 4 * 0.25 / 1.75, 4 * 0.25 / 1.75])
    assert drgo.gamma(0.8, 0.25) == pytest.approx(0.6)


def test_edge_map_of_a_square_and_its_distance_weights():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    edges = drgo.edge_map(torch.from_numpy(mask).long()[None])[0]
    ring_in = np.zeros((8, 8), bool)
    ring_in[2:6, 2:6] = True
    ring_in[3:5, 3:5] = False  # the square's inner border
    ring_out = np.zeros((8, 8), bool)
    ring_out[1:7, 1:7] = True
    ring_out[2:6, 2:6] = False
    ring_out[[1, 1, 6, 6], [1, 6, 1, 6]] = False  # corners touch the square only diagonally
    assert (edges.numpy().astype(bool) == (ring_in | ring_out)).all()
    assert (label_edges(mask) == edges.numpy().astype(bool)).all()  # the data side marks the same pixels
    d = distance_map(mask)
    assert d[3, 3] == 1 and d[2, 2] == 0 and d[0, 0] == pytest.approx(math.sqrt(5))  # to (1, 2)
    w = drgo.boundary_weights(torch.from_numpy(d))
    assert w[2, 2] == 1 and w[3, 3] == 0.5
    assert (distance_map(np.zeros((4, 6))) == 10).all()  # no edge: H + W


def test_pair_term_is_zero_for_a_perfect_prediction_and_one_when_relations_are_inverted():
    target = torch.tensor([[[0, 1, 0, 1]] * 4])  # vertical stripes: horizontal pairs differ, vertical agree
    weights = torch.ones(1, 4, 4)
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    inverted = (
        F.one_hot(torch.tensor([[[0] * 4, [1] * 4] * 2]), 2).permute(0, 3, 1, 2).float()
    )  # horizontal stripes
    assert drgo.pair_loss(perfect, target, weights) == 0
    assert drgo.pair_loss(inverted, target, weights) == pytest.approx(1.0)
    random = torch.rand(1, 2, 4, 4).softmax(1)
    assert 0 < drgo.pair_loss(random, target, weights) < 1


def test_edge_consistency_is_low_for_a_sharp_correct_prediction():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :, 4:] = 1
    edges = drgo.edge_map(target)
    sharp = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    blurred = torch.full_like(sharp, 0.5)
    assert drgo.edge_consistency_loss(sharp, edges) < 0.3 < drgo.edge_consistency_loss(blurred, edges)
    assert drgo.smoothness_loss(sharp, torch.ones(1, 8, 8)) == 0  # w = 1 everywhere: no smoothing


SETTINGS = DRGOSettings(region_size=4, regions_per_image=4)


def _batch(k=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (2, size, size), generator=g)
    distance = torch.from_numpy(np.stack([distance_map(t.numpy()) for t in target]))
    logits = torch.randn(2, k, size, size, generator=g, requires_grad=True)
    return logits, target, distance


@pytest.mark.parametrize("k", [2, 3])
def test_objective_gradients_reach_the_logits_and_are_finite(k):
    logits, target, distance = _batch(k)
    freq = drgo.class_frequencies(target.numpy(), k)
    loss, terms = drgo.drgo_loss(logits, target, freq, SETTINGS, 0.3, distance)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    assert set(terms) >= {"seg", "ada", "bnd", "drs", "pair", "smooth", "edge", "gamma", "confidence"}
    assert float(terms["gamma"]) == pytest.approx(0.7)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in terms.values())


@pytest.mark.parametrize(
    ("switch", "term", "weight"),
    [("use_adaptive", "ada", "alpha"), ("use_boundary", "bnd", "beta"), ("use_sampling", "drs", "delta")],
)
def test_each_switch_removes_exactly_its_term(switch, term, weight):
    logits, target, distance = _batch()
    freq = drgo.class_frequencies(target.numpy(), 2)
    full, terms = drgo.drgo_loss(
        logits, target, freq, SETTINGS, 0.0, distance, generator=torch.Generator().manual_seed(1)
    )
    off = DRGOSettings(**{**SETTINGS.__dict__, switch: False})
    ablated, ablated_terms = drgo.drgo_loss(
        logits, target, freq, off, 0.0, distance, generator=torch.Generator().manual_seed(1)
    )
    assert term not in ablated_terms
    assert float((full - ablated).detach()) == pytest.approx(
        getattr(SETTINGS, weight) * float(terms[term]), rel=1e-5
    )
    plain, _ = drgo.drgo_loss(
        logits, target, freq, DRGOSettings(use_sampling=False, use_adaptive=False, use_boundary=False, region_size=4),
        0.0, distance,
    )  # fmt: skip
    from medfusion.losses import segmentation_loss

    assert float(plain) == pytest.approx(float(segmentation_loss(logits, target)))


@pytest.mark.parametrize("fill", [0, 1])
def test_empty_and_all_foreground_masks_give_finite_losses(fill):
    target = torch.full((2, 8, 8), fill, dtype=torch.long)
    distance = torch.from_numpy(np.stack([distance_map(t.numpy()) for t in target]))
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss, _ = drgo.drgo_loss(logits, target, torch.tensor([0.5, 0.5]), SETTINGS, 0.9, distance)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bf16_logits_are_computed_in_fp32():
    logits, target, distance = _batch()
    freq = drgo.class_frequencies(target.numpy(), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = drgo.drgo_loss(logits.bfloat16(), target, freq, SETTINGS, 0.5, distance)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_boundary_needs_distance_maps():
    logits, target, _ = _batch()
    with pytest.raises(ValueError, match="needs the distance maps"):
        drgo.drgo_loss(logits, target, torch.tensor([0.5, 0.5]), SETTINGS, 0.0, None)


def test_objective_holds_the_confidence_average():
    from medfusion.training.loop import DRGOObjective

    logits, target, distance = _batch()
    objective = DRGOObjective(SETTINGS, torch.tensor([0.5, 0.5]), 0.0, seed=0)
    objective(logits, target, {"distance": distance})
    c1 = float(objective.confidence)
    assert c1 == pytest.approx(0.1 * float(objective.last_terms["confidence"]))
    objective(logits, target, {"distance": distance})
    assert float(objective.confidence) == pytest.approx(
        0.9 * c1 + 0.1 * float(objective.last_terms["confidence"])
    )
    means = objective.epoch_terms()  # the sums stay on the device until here
    assert set(means) >= {"drgo_seg", "drgo_confidence"} and all(isinstance(v, float) for v in means.values())
