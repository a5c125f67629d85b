"""Label maps are resized with pixel centres aligned, as the image's area resize is (METHOD.md section 3).

OpenCV's plain INTER_NEAREST samples source pixel floor(x * s): at 999 -> 256 the label map lands half a
processed pixel away from the image, and a perfect model of the stored labels loses Dice at the
original size. Every case here is a few arrays of at most 960 x 999; the file runs in well under a second.
"""

import numpy as np
import pytest

from medfusion.data.preprocess import PreprocessSettings, RawCase, case_samples, fov_sample, rebuild_volume
from medfusion.data.registry import dataset_spec
from medfusion.metrics import overlap_metrics
from medfusion.resample import labels_at

H, W, S = 960, 999, 256  # CHASE_DB1's size -> the paper's input


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def _to_processed(c: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Pixel-index coordinates of `src` mapped into `dst` with centres aligned: (c + 0.5) * dst/src - 0.5."""
    return (c + 0.5) * np.asarray(dst) / np.asarray(src) - 0.5


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float, value: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.uint8) * value


def _enlarge(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A processed-size label map drawn at `shape` as its pixel boxes (source pixel i lies in processed
    pixel floor((i + 0.5) * S / H)): a label a 256 x 256 map holds exactly, so a perfect model of it
    loses nothing but the rounding of the resizes."""
    rows = np.floor((np.arange(shape[0]) + 0.5) * small.shape[0] / shape[0]).astype(int)
    cols = np.floor((np.arange(shape[1]) + 0.5) * small.shape[1] / shape[1]).astype(int)
    return small[rows][:, cols]


def _thin_rings(size: int = S) -> np.ndarray:
    """Concentric square rings 2 processed pixels wide, 4 apart, plus a 1-pixel cross: vessels-thin."""
    small = np.zeros((size, size), np.uint8)
    for r in range(8, size // 2 - 4, 6):
        c0, c1 = size // 2 - r, size // 2 + r
        small[c0 : c1 + 1, c0 : c0 + 2] = small[c0 : c1 + 1, c1 - 1 : c1 + 1] = 1
        small[c0 : c0 + 2, c0 : c1 + 1] = small[c1 - 1 : c1 + 1, c0 : c1 + 1] = 1
    small[size // 2, :] = small[:, size // 2 + 3] = 1
    return small


def _image_samples(label: np.ndarray, observer2: np.ndarray | None = None, fov=None):
    case = RawCase("c", "c", np.zeros((*label.shape, 3), np.uint8), label, None, observer2=observer2, fov=fov)
    return case_samples(case, dataset_spec("chase_db1"), PreprocessSettings(S))


def _perfect_dice(label: np.ndarray) -> float:
    """Dice at the original size of a perfect model of the processed mask: its one-hot probabilities
    resized back by `resample.labels_at`, as evaluation scores."""
    _, masks, _ = _image_samples(label)
    probs = np.stack([masks[0] == 0, masks[0] == 1]).astype(np.float32)
    return overlap_metrics(labels_at(probs, label.shape), label)["dice"]


@pytest.mark.parametrize("shape", [(999, 999), (H, W)])
def test_downsized_label_keeps_its_centroid(shape):
    label = _disk(shape, (403.3, 611.7), 180)
    _, masks, second = _image_samples(label, observer2=label)
    expected = _to_processed(_centroid(label), shape, (S, S))
    assert masks.shape == (1, S, S) and np.abs(_centroid(masks[0]) - expected).max() < 0.1
    assert np.array_equal(second, masks)  # the second observer is resized the same way


def test_labels_above_one_and_the_fov_keep_their_centroids():
    label = _disk((H, W), (300.2, 280.9), 120, value=2) + _disk((H, W), (650.6, 700.4), 150, value=3)
    _, masks, _ = _image_samples(label)
    assert set(np.unique(masks)) == {0, 2, 3}
    for value in (2, 3):
        expected = _to_processed(_centroid(label == value), (H, W), (S, S))
        assert np.abs(_centroid(masks[0] == value) - expected).max() < 0.1
    fov = _disk((H, W), (470.4, 505.1), 440).astype(bool)
    stored = fov_sample(fov, PreprocessSettings(S))
    assert stored.shape == (1, S, S) and stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 1}
    expected = _to_processed(_centroid(fov), (H, W), (S, S))
    assert np.abs(_centroid(stored[0]) - expected).max() < 0.1


def test_perfect_model_of_thin_structures_scores_full_dice_at_the_original_size():
    label = _enlarge(_thin_rings(), (H, W))
    assert 0.1 < label.mean() < 0.4  # thin: every structure is 1-2 processed pixels wide
    assert _perfect_dice(label) >= 0.99  # plain nearest: about 0.75, rows of the rings dropped or doubled


def test_rebuild_volume_is_centre_aligned():
    small = np.stack([_thin_rings(), _disk((S, S), (90.3, 170.6), 40, value=2)])
    rebuilt = rebuild_volume(small, (2, H, W))
    assert rebuilt.shape == (2, H, W) and rebuilt.dtype == small.dtype
    # each processed pixel's box, no shift; where an original pixel's centre lies exactly on a box edge
    # (1 row in 32 at 256 -> 960) either neighbour is as near, and OpenCV takes the lower index
    rows, cols = ((np.arange(n) + 0.5) * S % n != 0 for n in (H, W))
    assert np.array_equal(rebuilt[0][rows][:, cols], _enlarge(small[0], (H, W))[rows][:, cols])
    expected = _to_processed(_centroid(small[1] == 2), (S, S), (H, W))
    assert np.abs(_centroid(rebuilt[1] == 2) - expected).max() < 0.2  # plain nearest: about 0.5


def test_volume_slices_round_trip_through_rebuild_in_place():
    label = np.stack([_disk((H, W), (400.5, 520.2), 200), _disk((H, W), (500.1, 300.8), 150, value=2)])
    case = RawCase("v", "v", np.zeros((1, *label.shape), np.float32), label, (1.0, 1.0, 1.0))
    _, masks, _ = case_samples(case, dataset_spec("lits17"), PreprocessSettings(S, n4=False))
    rebuilt = rebuild_volume(masks, label.shape)
    for k in range(2):
        shift = _centroid(rebuilt[k] > 0) - _centroid(label[k] > 0)
        assert np.abs(shift).max() < 0.5  # plain nearest, down and up: about 2.4 original pixels
        assert overlap_metrics(rebuilt[k], label[k])["dice"] > 0.99
