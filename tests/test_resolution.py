"""Scoring at the original resolution: hand-checkable cases through evaluate_run / evaluate_model, the
shared resampling, and evaluation memory that does not grow with the number of test cases."""

import tracemalloc

import numpy as np
import pytest
import torch
from conftest import fp32, replace, tiny_kwargs, tiny_raw_params, train_folds

import medfusion.evaluation as evaluation
from medfusion.config import params_from_dict
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import DataError, read_json, write_json, write_nifti, write_png
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.metrics import hd95
from medfusion.models import build_model
from medfusion.resample import labels_at, resize_probs

FP32 = fp32()


def _checkpoint(path, in_channels, num_classes, dataset="custom"):
    """A loadable checkpoint (its weights never matter: the tests fix the model's output)."""
    model = build_model("unet", in_channels, num_classes, **tiny_kwargs()["unet"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": "unet", "kwargs": tiny_kwargs()["unet"], "in_channels": in_channels, "dataset": dataset,
         "num_classes": num_classes, "state_dict": model.state_dict()},
        path,
    )  # fmt: skip


def _left_columns(columns: int):
    """A stand-in for predict_probs: foreground (class 1) with probability 1 in the left `columns`."""

    def predict(model, images, precision):
        b, _, s, _ = images.shape
        probs = torch.zeros(b, 2, s, s)
        probs[:, 1, :, :columns] = 1
        probs[:, 0] = 1 - probs[:, 1]
        return probs

    return predict


def _dice(rows, region="lesion"):
    return next(r["value"] for r in rows if r["metric"] == "dice" and r["class"] == region)


CUSTOM_2D = {"kind": "image", "modality": "gray", "class_names": ["background", "lesion"], "title": "t"}


def test_a_300x200_image_predicted_at_64x64_is_scored_at_300x200(tmp_path, monkeypatch):
    """Mask: the left 120 of 300 columns. Prediction at 64x64: the left 32 columns, i.e. the left half,
    150 columns at 300 wide. Dice at 300x200 = 2*120 / (120 + 150) = 0.8889; at 64x64 the resized
    mask holds 26 columns (nearest), Dice = 2*26 / (26 + 32) = 0.8966."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(0)
    write_png(raw / "images" / "case.png", rng.integers(0, 255, (200, 300), dtype=np.uint8))
    mask = np.zeros((200, 300), np.uint8)
    mask[:, :120] = 255
    write_png(raw / "masks" / "case.png", mask)
    preprocess_dataset("custom", raw, tmp_path / "proc", 64, custom=CUSTOM_2D)
    _checkpoint(tmp_path / "run" / "model.pt", 1, 2)
    monkeypatch.setattr(evaluation, "predict_probs", _left_columns(32))

    original = evaluation.evaluate_run(tmp_path / "run" / "model.pt", tmp_path / "proc", ["case"], 4, FP32)
    assert _dice(original) == pytest.approx(2 * 120 / (120 + 150))
    processed = evaluation.evaluate_run(
        tmp_path / "run" / "model.pt", tmp_path / "proc", ["case"], 4, FP32, resolution="processed"
    )
    assert _dice(processed) == pytest.approx(2 * 26 / (26 + 32))
    # HD95 in original pixels: each mask's right edge is 30 columns from the other's
    assert 0 < next(r["value"] for r in original if r["metric"] == "hd95") <= 30

    # the ground truth comes from the raw copy: without it, a clear error names the file and the way out
    (raw / "masks" / "case.png").unlink()
    with pytest.raises(
        DataError, match=r"case.png: the ground truth of case 'case' is not there.*resolution=processed"
    ):
        evaluation.evaluate_run(tmp_path / "run" / "model.pt", tmp_path / "proc", ["case"], 4, FP32)


def test_a_volume_with_anisotropic_spacing_is_scored_in_mm_at_its_shape(tmp_path, monkeypatch):
    """A 6x40x30 CT volume, spacing (z, y, x) = (5, 1, 0.5) mm, predicted at 16x16. Target: a box in
    slices 1-3, rows 10-29, columns 6-23 (1080 voxels). Prediction: the left 8 of 16 columns, i.e.
    columns 0-14 of 30 in every slice (3600 voxels); overlap 3 x 20 x 9 = 540: Dice = 1080 / 4680."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    rng = np.random.default_rng(1)
    write_nifti(
        raw / "images" / "v.nii.gz", rng.normal(50, 30, (6, 40, 30)).astype(np.float32), (5.0, 1.0, 0.5)
    )
    label = np.zeros((6, 40, 30), np.uint8)
    label[1:4, 10:30, 6:24] = 1
    write_nifti(raw / "labels" / "v.nii.gz", label, (5.0, 1.0, 0.5))
    custom = {"kind": "volume", "modality": "ct", "class_names": ["background", "lesion"], "title": "v"}
    preprocess_dataset("custom", raw, tmp_path / "proc", 16, custom=custom)
    _checkpoint(tmp_path / "run" / "model.pt", 1, 2)
    monkeypatch.setattr(evaluation, "predict_probs", _left_columns(8))

    rows = evaluation.evaluate_run(tmp_path / "run" / "model.pt", tmp_path / "proc", ["v"], 4, FP32)
    assert _dice(rows) == pytest.approx(1080 / 4680)
    expected = np.zeros_like(label)
    expected[:, :, :15] = 1
    mm = next(r["value"] for r in rows if r["metric"] == "hd95")
    assert mm == pytest.approx(hd95(expected, label, (5.0, 1.0, 0.5)))
    assert mm != pytest.approx(hd95(expected, label))  # the spacing counts: not voxels


def test_resampling_probabilities_keeps_a_smooth_boundary():
    """A probability ramp at 8 pixels enlarged to 80: the boundary (p = 0.5) lands where it should,
    which a nearest-neighbour resize of labels cannot place finer than 10 pixels."""
    probs = np.zeros((2, 8, 8), np.float32)
    probs[1] = np.linspace(0, 1, 8)[None, :]  # 0.5 between columns 3 and 4
    probs[0] = 1 - probs[1]
    up = resize_probs(probs, (80, 80))
    assert up.shape == (2, 80, 80) and np.allclose(up.sum(0), 1, atol=1e-5)
    labels = labels_at(probs, (80, 80))
    assert labels[0, 39] == 0 and labels[0, 40] == 1  # the middle, to the pixel
    # volumes: every slice in-plane, none in z; the wrong slice count is refused
    assert labels_at(np.stack([probs] * 3, axis=1), (3, 80, 80)).shape == (3, 80, 80)
    with pytest.raises(ValueError, match="3 slices of probabilities for a volume of shape"):
        labels_at(np.stack([probs] * 3, axis=1), (4, 80, 80))


def _peak_of_evaluation(tmp_path, volumes: int) -> tuple[int, int]:
    """tracemalloc peak (bytes) of evaluate_model on `volumes` generated volumes (half of them test)."""
    raw_params = tiny_raw_params()
    raw_params["data"]["synthetic"].update(num_volumes=volumes, slices_per_volume=24)
    params = replace(params_from_dict(raw_params), "train", epochs=1)
    fetch_dataset("synthetic_volumes", tmp_path / "raw", None, params.data.synthetic)
    preprocess_dataset("synthetic_volumes", tmp_path / "raw", tmp_path / "proc", 32)
    groups = {c["case_id"]: c["group"] for c in read_json(tmp_path / "proc" / "cases.json")}
    split = make_split(groups, "fraction", 2, 0, 0.5)
    write_json(tmp_path / "split.json", split)
    runs = train_folds(params, "synthetic_volumes", "unet", tmp_path / "proc", split, tmp_path / "runs")
    tracemalloc.start()
    try:
        evaluation.evaluate_model(runs, tmp_path / "runs", tmp_path / "proc", split, 8, FP32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, len(split["test"])


def test_evaluation_memory_does_not_grow_with_the_number_of_cases(tmp_path):
    """4x the test volumes, about the same peak: evaluation holds one case at a time (the metric rows,
    a few kB per case, are all that grows). Holding every test probability map, as evaluation once
    did, would grow by about 4x."""
    small, n_small = _peak_of_evaluation(tmp_path / "small", 6)
    large, n_large = _peak_of_evaluation(tmp_path / "large", 24)
    assert n_large >= 3 * n_small
    d, h, w = read_json(tmp_path / "large" / "proc" / "meta.json")["cases"]["volume-0"]["shape"]
    per_case = 3 * d * h * w * 4  # one volume's probabilities at its original size, float32 (~1 MB)
    # measured: about 5.9 MB for 3 and for 12 test volumes (the metric rows, ~90 kB a case, are what
    # grows); holding every probability map, the first design, grew by about one case's maps per case
    assert large - small < 0.5 * (n_large - n_small) * per_case, (small, large)
    assert large < 1.3 * small, (small, large)


def test_stored_rows_read_what_the_map_holds_without_mapping_it(synthetic_processed):
    """SegDataset reads samples with pread (StoredRows): the same bytes as the memory map, one row at a
    time, picklable for loader workers (which open their own file)."""
    import pickle

    from medfusion.data.dataset import SegDataset, StoredRows

    processed, split = synthetic_processed
    mapped = np.load(processed / "masks.npy", mmap_mode="r")
    rows = StoredRows(processed / "masks.npy")
    assert len(rows) == len(mapped) and rows.shape == mapped.shape
    assert np.array_equal(rows[3], mapped[3]) and np.array_equal(rows[[5, 1, 2]], mapped[[5, 1, 2]])
    again = pickle.loads(pickle.dumps(rows))
    assert again._fd is None and np.array_equal(again[0], mapped[0])
    dataset = SegDataset(processed, split["test"])
    item = dataset[0]
    j = dataset.indices[0]
    assert np.array_equal(item["mask"].numpy(), mapped[j])
