import json
import math
import tracemalloc
from dataclasses import asdict

import numpy as np
import pytest
from scipy import ndimage

from medfusion import metrics
from medfusion.metrics import (
    assd,
    case_metrics,
    hd95,
    overlap_metrics,
    processed_spacing,
    surface,
    surface_distances,
)
from medfusion.postprocess import (
    PostProcess,
    apply,
    apply_binary,
    apply_thresholds,
    choose_binary,
    choose_postprocess,
    choose_thresholds,
    fill_holes,
    remove_small_components,
)

# ---------------------------------------------------------------- reference implementations


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face-neighbour, outside the image being background."""
    padded = np.pad(mask.astype(bool), 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    out = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            out |= ~np.roll(padded, shift, axis=axis)[inner]
    return out & mask.astype(bool)


def _brute_distances(pred: np.ndarray, target: np.ndarray, spacing) -> np.ndarray:
    """O(n^2) pairwise distances between the two surfaces, both directions pooled."""
    sp = np.argwhere(_brute_surface(pred)) * np.asarray(spacing, float)
    st = np.argwhere(_brute_surface(target)) * np.asarray(spacing, float)
    d = np.sqrt(((sp[:, None, :] - st[None, :, :]) ** 2).sum(-1))
    return np.concatenate([d.min(1), d.min(0)])


def _full_transform_distances(pred: np.ndarray, target: np.ndarray, spacing) -> np.ndarray:
    """The same distances with the distance transforms on the whole image (no bounding box)."""
    s_pred, s_target = surface(pred), surface(target)
    to_target = ndimage.distance_transform_edt(~s_target, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)
    return np.concatenate([to_target[s_pred], to_pred[s_target]])


def _square(shift: int = 0, axis: int = 1) -> np.ndarray:
    a = np.zeros((32, 32), bool)
    a[8:20, 8:20] = True  # a 12 x 12 square
    return np.roll(a, shift, axis=axis)


# ---------------------------------------------------------------- metrics: empty-mask rule


EMPTY = np.zeros((8, 8), bool)
BLOB = np.zeros((8, 8), bool)
BLOB[2:5, 3:6] = True


@pytest.mark.parametrize(
    ("pred", "target", "overlap", "distance"),
    [
        # shape: (8, 8) each; overlap = dice, iou, precision, recall, f1; distance = hd95, assd
        (EMPTY, EMPTY, 1.0, 0.0),  # both empty: perfect
        (BLOB, EMPTY, 0.0, "diagonal"),  # foreground predicted on an empty target: the worst distance
        (EMPTY, BLOB, 0.0, "diagonal"),  # target missed: the worst distance
    ],
)
def test_empty_rule_for_every_metric(pred, target, overlap, distance):
    m = case_metrics(pred.astype(np.uint8), target.astype(np.uint8), 2, spacing=(0.5, 0.5), distances=True)[1]
    assert set(m) == {"dice", "iou", "precision", "recall", "f1", "hd95", "assd"}
    for name in ("dice", "iou", "precision", "recall", "f1"):
        assert m[name] == overlap, name
    # the diagonal of the 8 x 8 case: in mm at 0.5 mm (sqrt(2) * 4), in pixels without a spacing
    in_mm, in_px = (8 * 2**0.5 / 2, 8 * 2**0.5) if distance == "diagonal" else (distance, distance)
    for name, fn in (("hd95", hd95), ("assd", assd)):
        assert m[name] == pytest.approx(in_mm), name
        assert fn(pred, target) == pytest.approx(in_px), name
    assert overlap_metrics(pred, target) == {k: m[k] for k in ("dice", "iou", "precision", "recall", "f1")}


def test_identical_masks_score_perfectly_in_2d_and_3d():
    rng = np.random.default_rng(1)
    for shape, spacing in (((16, 16), (0.7, 1.3)), ((6, 10, 12), (3.0, 0.8, 0.8))):
        mask = rng.random(shape) > 0.6
        m = case_metrics(mask.astype(np.uint8), mask.astype(np.uint8), 2, spacing, distances=True)[1]
        assert m == {
            "dice": 1.0,
            "iou": 1.0,
            "precision": 1.0,
            "recall": 1.0,
            "f1": 1.0,
            "hd95": 0.0,
            "assd": 0.0,
        }


def test_f1_is_stored_and_equals_dice():
    pred, target = np.array([1, 1, 1, 0, 0]), np.array([1, 0, 1, 1, 0])
    m = overlap_metrics(pred, target)
    p, r = m["precision"], m["recall"]
    assert m["f1"] == m["dice"] == pytest.approx(2 * p * r / (p + r)) == pytest.approx(2 / 3)


def test_case_metrics_computes_distances_only_when_asked(monkeypatch):
    pred, target = np.array([[0, 1], [2, 2]]), np.array([[0, 1], [2, 0]])
    calls = []
    monkeypatch.setattr(metrics, "surface_distances", lambda *a: calls.append(a))
    m = case_metrics(pred, target, 3)  # the training validation call
    assert set(m) == {1, 2} and set(m[2]) == {"dice", "iou", "precision", "recall", "f1"} and not calls
    assert m[2]["dice"] == pytest.approx(2 / 3)


def test_wrong_spacing_or_shape_raises():
    with pytest.raises(ValueError, match="2 values for a 3-D mask"):
        hd95(np.ones((2, 3, 3)), np.ones((2, 3, 3)), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="differs from target shape"):
        assd(np.ones((3, 3)), np.ones((3, 4)))


# ---------------------------------------------------------------- metrics: known distances


@pytest.mark.parametrize(
    ("shift", "axis", "spacing", "expected_hd95", "expected_assd"),
    [
        # 12 x 12 square vs the same square shifted by `shift` pixels (surface: 44 pixels each).
        # shift 1: per direction 22 distances 0 (shared rows/columns) and 22 distances 1 -> 95th pct 1, mean 0.5
        (1, 1, None, 1.0, 0.5),
        # shift 3: per direction 18 x 0, 4 x 1, 4 x 2, 18 x 3 (sum 66) -> 95th pct 3, mean 66/44
        (3, 1, None, 3.0, 1.5),
        # shift 3 along x with x spacing 2: 18 x 0; the 3 left corners of the top and bottom rows 2, 4, 6;
        # 10 x 6 on the trailing side; 1, 2, 3, 4, 5, 5, 4, 3, 2, 1 on the leading side (vertical, y spacing 1)
        # -> sum 114, mean 114/44 = 57/22; 24 of the 88 pooled values are 6 -> 95th pct 6
        (3, 1, (1.0, 2.0), 6.0, 57 / 22),
        (3, 0, (2.0, 1.0), 6.0, 57 / 22),  # the same along y
    ],
)
def test_shifted_square_known_values(shift, axis, spacing, expected_hd95, expected_assd):
    a, b = _square(), _square(shift, axis)
    assert hd95(a, b, spacing) == pytest.approx(expected_hd95)
    assert assd(a, b, spacing) == pytest.approx(expected_assd)
    assert assd(b, a, spacing) == pytest.approx(expected_assd)  # symmetric
    assert hd95(a, a, spacing) == 0.0 and assd(a, a, spacing) == 0.0


def test_two_voxels_far_apart_in_a_large_anisotropic_volume():
    pred, target = np.zeros((40, 256, 256), bool), np.zeros((40, 256, 256), bool)
    pred[5, 10, 200] = True
    target[8, 14, 200] = True  # 3 slices and 4 rows away
    expected = math.hypot(3 * 2.5, 4 * 0.7)
    assert hd95(pred, target, (2.5, 0.7, 0.7)) == pytest.approx(expected)
    assert assd(pred, target, (2.5, 0.7, 0.7)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [
        ((20, 20), (1.0, 1.0), 0),
        ((24, 17), (0.6, 1.7), 1),
        ((7, 9, 11), (2.5, 0.8, 0.6), 2),
        ((9, 8, 8), (1.0, 3.0, 1.0), 3),
    ],
)
def test_hd95_and_assd_against_brute_force(shape, spacing, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.random(shape) > 0.7, rng.random(shape) > 0.6
    assert np.array_equal(surface(pred), _brute_surface(pred))
    brute = _brute_distances(pred, target, spacing)
    assert hd95(pred, target, spacing) == pytest.approx(np.percentile(brute, 95))
    assert assd(pred, target, spacing) == pytest.approx(brute.mean())


@pytest.mark.parametrize("seed", range(6))
def test_bounding_box_gives_the_full_transform_values(seed):
    rng = np.random.default_rng(seed)
    ndim = 2 + seed % 2
    shape = (48, 40) if ndim == 2 else (20, 30, 26)
    spacing = tuple(rng.uniform(0.5, 3.0, ndim))
    pred, target = np.zeros(shape, bool), np.zeros(shape, bool)
    for mask, size in ((pred, 8), (target, 10)):
        # blobs anywhere, some touching the image border (seed 0, 1) so the crop is clipped there
        corner = [0 if seed < 2 else rng.integers(0, s - size) for s in shape]
        box = tuple(slice(c, c + size) for c in corner)
        mask[box] = rng.random((size,) * ndim) > 0.4
    got = surface_distances(pred, target, spacing)
    assert np.allclose(np.sort(got), np.sort(_full_transform_distances(pred, target, spacing)))


def test_surfaces_are_found_on_the_bounding_box_only(monkeypatch):
    pred, target = np.zeros((60, 128, 128), bool), np.zeros((60, 128, 128), bool)
    pred[30:33, 40:45, 50:54] = True
    target[31:35, 42:47, 51:56] = True
    shapes = []
    real = metrics.surface
    monkeypatch.setattr(metrics, "surface", lambda x: shapes.append(x.shape) or real(x))
    hd95(pred, target, (2.0, 1.0, 1.0))
    assert shapes == [(7, 9, 8)] * 2  # union box (5, 7, 6) plus a one-voxel margin on each side


def test_surface_distances_equal_those_of_a_distance_transform():
    """The distances are those of scipy's Euclidean distance transform of each surface (medpy's way), in mm."""
    rng = np.random.default_rng(3)
    spacing = (2.5, 0.8, 0.6)
    pred = ndimage.binary_dilation(rng.random((12, 30, 40)) > 0.97, iterations=2)
    target = ndimage.binary_dilation(rng.random((12, 30, 40)) > 0.97, iterations=2)
    s_pred, s_target = metrics.surface(pred), metrics.surface(target)
    to_target = ndimage.distance_transform_edt(~s_target, sampling=spacing)[s_pred]
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_target]
    found = metrics.surface_distances(pred, target, spacing)
    assert np.allclose(np.sort(found), np.sort(np.concatenate([to_target, to_pred])))


def test_surface_distances_do_not_depend_on_the_transform_threads(monkeypatch):
    """The distance transform runs on every core; one thread gives the same distances, bit for bit."""
    rng = np.random.default_rng(5)
    pred = ndimage.binary_dilation(rng.random((9, 64, 48)) > 0.98, iterations=2)
    target = ndimage.binary_dilation(rng.random((9, 64, 48)) > 0.98, iterations=2)
    found = {}
    for threads in (1, 4):
        monkeypatch.setattr(metrics, "_cores", lambda n=threads: n)
        found[threads] = metrics.surface_distances(pred, target, (3.0, 0.7, 0.9))
    assert found[1].size > 100 and np.array_equal(found[1], found[4])


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_label_mask_is_isin_and_holds_one_byte_per_voxel(dtype):
    """label_mask gives np.isin's mask; on a volume it allocates the mask and little more (np.isin
    allocates about 9 bytes per voxel)."""
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 4, (80, 128, 128)).astype(dtype)
    for labels in ([1], [1, 2], [2, 3], [7]):
        assert np.array_equal(metrics.label_mask(volume, labels), np.isin(volume, labels))
    assert np.array_equal(metrics.label_mask(volume[0], [1, 3]), np.isin(volume[0], [1, 3]))  # 2-D
    tracemalloc.start()
    try:
        mask = metrics.label_mask(volume, [1, 2])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    chunk = 32 * 128 * 128  # the comparisons of 32 slices (int64); a lookup table's buffers (uint8)
    assert mask.sum() > 0 and peak < volume.size + chunk + (1 << 17)


def test_surface_distances_of_a_volume_beyond_one_chunk_with_packed_surfaces():
    """Over 32 slices with planes of an odd size (13 x 11 = 143 pixels, so slabs start inside a byte
    unless they start at multiples of 32 slices): the bit-packed surface reads back exactly."""
    rng = np.random.default_rng(8)
    pred = ndimage.binary_dilation(rng.random((70, 13, 11)) > 0.97, iterations=1)
    target = ndimage.binary_dilation(rng.random((70, 13, 11)) > 0.97, iterations=1)
    spacing = (2.0, 0.7, 0.9)
    found = metrics.surface_distances(pred, target, spacing)
    expected = _full_transform_distances(pred, target, spacing)
    assert found.size == expected.size > 100
    assert np.allclose(np.sort(found), np.sort(expected), atol=1e-5)
    bits = metrics._Bits(pred)
    assert np.array_equal(bits.unpack(), pred) and np.array_equal(bits.slab(32, 64), pred[32:64])
    assert np.array_equal(bits.slab(64, 70), pred[64:])


def test_processed_spacing():
    # volume: (D, H, W) = (40, 512, 400) at (2.5, 0.8, 0.7) mm, resized in-plane to 256 x 256
    assert processed_spacing((40, 512, 400), (2.5, 0.8, 0.7), 256) == pytest.approx((2.5, 1.6, 1.09375))
    assert processed_spacing((100, 200), (0.1, 0.2), 50) == pytest.approx((0.2, 0.8))  # 2-D, known spacing
    assert processed_spacing((576, 720), None, 256) is None  # 2-D image, spacing unknown
    with pytest.raises(ValueError, match="do not match"):
        processed_spacing((40, 512, 400), (0.8, 0.7), 256)


# ---------------------------------------------------------------- post-processing: rules


def test_remove_small_components_removes_exactly_those_below_the_size():
    mask = np.zeros((12, 12), bool)
    mask[0, 0] = True  # size 1
    mask[3, 3] = mask[4, 4] = True  # size 2: diagonal neighbours are one component (8-connectivity)
    mask[8:10, 0:2] = True  # size 4
    mask[6:9, 6:9] = True  # size 9
    sizes = {1: (0, 0), 2: (3, 3), 4: (8, 0), 9: (6, 6)}
    for min_size in (0, 1, 2, 3, 4, 5, 9, 10):
        out = remove_small_components(mask, min_size)
        for size, pixel in sizes.items():
            assert out[pixel] == (size >= min_size), (min_size, size)
        assert out.sum() == sum(s for s in sizes if s >= min_size)
    volume = np.zeros((4, 4, 4), bool)
    volume[0, 0, 0] = volume[1, 1, 1] = True  # corner neighbours: one component (26-connectivity)
    assert remove_small_components(volume, 2).sum() == 2


def test_fill_holes_fills_an_enclosed_hole_not_an_open_notch():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # enclosed hole
    notch = ring.copy()
    notch[4, 4:7] = False  # the same hole opened to the right
    assert fill_holes(ring).sum() == 25
    assert np.array_equal(fill_holes(notch), notch)
    tube = np.stack([ring] * 4)  # a tube along z, open at both ends: filled slice by slice
    assert fill_holes(tube).sum() == 100
    assert ndimage.binary_fill_holes(tube).sum() == 96  # which a 3-D fill would not do


def test_apply_binary_removes_components_then_fills():
    mask = np.zeros((12, 12), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # hole
    mask[10, 10] = True  # speck
    out = apply_binary(mask, 2, True)
    assert out.sum() == 25 and not out[10, 10]
    assert np.array_equal(apply_binary(mask, 0, False), mask)


PROBS = np.array(
    [  # shape: (3, 2, 2), classes background, 1, 2
        [[0.6, 0.2], [0.5, 0.1]],
        [[0.3, 0.45], [0.1, 0.2]],
        [[0.1, 0.35], [0.4, 0.7]],
    ]
)


@pytest.mark.parametrize(
    ("thresholds", "expected"),
    [
        (None, [[0, 1], [0, 2]]),  # plain argmax
        ((None, None), [[0, 1], [0, 2]]),  # the argmax rule per class: the same
        ((0.4, 0.5), [[0, 1], [0, 2]]),  # 0.3 < 0.4 and 0.4 < 0.5 -> background
        ((0.3, 0.4), [[1, 1], [2, 2]]),  # low thresholds take pixels where background is the argmax
        ((0.5, 0.4), [[0, 0], [2, 2]]),  # (0, 1): candidate class 1 at 0.45 < 0.5 -> background, not class 2
        ((None, 0.4), [[0, 1], [2, 2]]),
    ],
)
def test_threshold_rule_by_hand(thresholds, expected):
    assert apply_thresholds(PROBS, thresholds).tolist() == expected
    assert apply(PostProcess(thresholds=thresholds), PROBS).tolist() == expected


def test_threshold_rule_all_none_is_argmax_and_lengths_are_checked():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(6, 7)).transpose(2, 0, 1)  # (4, 6, 7)
    assert np.array_equal(apply_thresholds(probs, (None,) * 3), probs.argmax(0))
    with pytest.raises(ValueError, match="2 thresholds for 3 foreground classes"):
        apply_thresholds(probs, (0.5, 0.5))
    with pytest.raises(ValueError, match="binary tasks"):
        apply(PostProcess(min_size=10), probs)


# ---------------------------------------------------------------- post-processing: selection


def _binary_probs(mask: np.ndarray) -> np.ndarray:
    p1 = np.where(mask, 0.9, 0.1)
    return np.stack([1 - p1, p1])  # (2, ...)


def _speckled_cases(n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    targets, preds = [], []
    for i in range(n):
        target = np.zeros((64, 64), np.uint8)
        target[16 + i : 40 + i, 20:44] = 1  # one 24 x 24 square, no small components
        noise = (rng.random((64, 64)) < 0.01) & ~ndimage.binary_dilation(target, iterations=3)
        targets.append(target)
        preds.append(_binary_probs(target.astype(bool) | noise))
    return preds, targets


def test_choose_binary_removes_speckle_noise():
    preds, targets = _speckled_cases()
    sel = choose_binary(preds, targets)
    assert sel.postprocess == PostProcess(min_size=10, fill_holes=False)  # the smallest size that helps
    assert sel.dice_before < 0.99 and sel.dice_after == pytest.approx(1.0)
    assert [apply(sel.postprocess, p).tolist() for p in preds] == [t.tolist() for t in targets]


def test_choose_binary_fills_holes_and_accepts_masks():
    targets = [np.pad(np.ones((10, 10), np.uint8), 3)] * 2
    holed = [t.copy() for t in targets]
    for h in holed:
        h[6:9, 6:9] = 0
    sel = choose_binary(holed, targets)  # masks, not probabilities
    assert sel.postprocess == PostProcess(min_size=0, fill_holes=True)
    assert sel.dice_after == 1.0 > sel.dice_before


def test_choose_binary_keeps_no_change_when_nothing_helps():
    shifted = [np.roll(_square(), 3, axis=1).astype(np.uint8)]  # wrong, but no speck and no hole to fix
    sel = choose_binary(shifted, [_square().astype(np.uint8)])
    assert sel.postprocess == PostProcess() and sel.dice_before == sel.dice_after < 1.0
    perfect = choose_binary([_binary_probs(_square())], [_square()])
    assert perfect.postprocess == PostProcess() and perfect.dice_before == perfect.dice_after == 1.0


def _three_class_cases() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Class 1 under-confident (p1 = 0.45 where it is true), class 2 calibrated."""
    targets, probs = [], []
    for i in range(3):
        target = np.zeros((20, 20), np.uint8)
        target[2 + i : 8 + i, 2:8] = 1
        target[12:18, 10 + i : 16 + i] = 2
        p = np.zeros((3, 20, 20))
        p[1] = np.where(target == 1, 0.45, 0.05)
        p[2] = np.where(target == 2, 0.8, 0.05)
        p[0] = 1 - p[1] - p[2]
        targets.append(target)
        probs.append(p)
    return probs, targets


def test_choose_thresholds_picks_the_known_best_per_class():
    probs, targets = _three_class_cases()
    sel = choose_thresholds(probs, targets)
    # class 1: 0.3 and 0.4 both recover it; the tie goes to 0.4, closer to 0.5. Class 2: argmax is already right.
    assert sel.postprocess == PostProcess(thresholds=(0.4, None))
    assert sel.dice_before == pytest.approx(0.5) and sel.dice_after == pytest.approx(1.0)
    assert [apply(sel.postprocess, p).tolist() for p in probs] == [t.tolist() for t in targets]
    assert choose_postprocess(probs, targets) == sel
    record = json.loads(json.dumps(asdict(sel)))
    assert record["postprocess"] == {"min_size": 0, "fill_holes": False, "thresholds": [0.4, None],
                                     "min_fraction": 0.0, "largest": False, "parents": None}  # fmt: skip
    assert apply(PostProcess(**record["postprocess"]), probs[0]).tolist() == targets[0].tolist()


def test_choose_thresholds_keeps_argmax_when_nothing_helps():
    probs, targets = _three_class_cases()
    calibrated = [np.where(np.arange(3)[:, None, None] == t, 0.9, 0.05) for t in targets]
    sel = choose_thresholds(calibrated, targets)
    assert sel.postprocess == PostProcess() and sel.dice_before == sel.dice_after == 1.0


def test_choose_postprocess_dispatches_binary():
    preds, targets = _speckled_cases(2)
    assert choose_postprocess(preds, targets) == choose_binary(preds, targets)


def test_lits_liver_is_scored_with_its_tumour_and_tumour_alone():
    """LiTS as the field scores it: liver = labels 1 and 2, tumour = label 2."""
    from medfusion.data.registry import DATASETS
    from medfusion.metrics import region_metrics

    regions = DATASETS["lits17"].scored_regions()
    assert regions == {"liver": [1, 2], "tumour": [2]}
    target = np.zeros((2, 4, 4), np.uint8)
    target[0, :2, :2] = 1  # 4 liver voxels
    target[1, :2, :2] = 2  # 4 tumour voxels inside the liver
    pred = np.zeros_like(target)
    pred[0, :2, :2] = 1
    pred[1, :2, :2] = 1  # the tumour predicted as liver: right for liver, a miss for tumour
    m = region_metrics(pred, target, regions, distances=False)
    assert m["liver"]["dice"] == 1.0  # label-1-only scoring would give 2*4/(8+4) = 0.667
    assert m["tumour"]["dice"] == 0.0 and (m["tumour"]["tp"], m["tumour"]["fn"]) == (0.0, 4.0)
    per_class = region_metrics(pred, target, {"liver": [1], "tumour": [2]}, distances=False)
    assert per_class["liver"]["dice"] == pytest.approx(8 / 12)


def test_global_dice_pools_the_counts_of_all_cases():
    from medfusion.metrics import pooled_dice

    # case A: tp 9, fp 1, fn 0 (Dice 18/19); case B: tp 1, fp 0, fn 9 (Dice 2/11)
    assert pooled_dice([9, 1], [1, 0], [0, 9]) == pytest.approx(20 / 30)  # 2*10 / (2*10 + 1 + 9)
    assert pooled_dice([0, 0], [0, 0], [0, 0]) == 1.0  # empty everywhere, predicted empty
    assert pooled_dice([0], [3], [0]) == 0.0


def test_surfaces_of_long_volumes_are_eroded_in_chunks_with_the_same_result():
    """Volumes longer than a chunk (metrics._SURFACE_CHUNK slices) are eroded chunk by chunk with a
    one-slice halo: the surface is the whole volume's, at the chunks' seams too."""
    rng = np.random.default_rng(5)
    mask = ndimage.binary_dilation(rng.random((metrics._SURFACE_CHUNK * 2 + 7, 20, 24)) > 0.9)
    assert np.array_equal(surface(mask), _brute_surface(mask))
    pred = ndimage.binary_dilation(rng.random(mask.shape) > 0.97, iterations=2)
    spacing = (2.5, 0.8, 0.6)
    got = metrics.region_metrics(pred.astype(np.uint8), mask.astype(np.uint8), {"fg": [1]}, spacing)["fg"]
    assert got["hd95"] == pytest.approx(hd95(pred, mask, spacing)) and got["assd"] == pytest.approx(
        assd(pred, mask, spacing)
    )
