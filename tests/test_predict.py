"""`medfusion predict`: I/O contract on randomly initialised tiny U-Nets saved as run_fold saves them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_raw_params
from PIL import Image
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.config import params_from_dict
from medfusion.data.dataset import SegDataset
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import write_json
from medfusion.data.preprocess import case_refs, preprocess_dataset
from medfusion.data.registry import dataset_spec
from medfusion.hardware import Precision
from medfusion.models import build_model
from medfusion.predict import (
    ensemble_probs,
    find_checkpoints,
    load_ensemble,
    model_inputs,
    preprocessing_from_meta,
    read_input,
)

runner = CliRunner()
CPU = Precision(torch.device("cpu"), None, False)
SIZE = 32


def save_checkpoint(path: Path, dataset: str, in_channels: int, num_classes: int, seed: int, **extra) -> None:
    """A checkpoint in run_fold's format (medfusion/training/cv.py) with random weights."""
    torch.manual_seed(seed)
    model = build_model("unet", in_channels, num_classes, base_channels=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": "unet",
            "architecture": "unet",
            "kwargs": {"base_channels": 4},
            "in_channels": in_channels,
            "num_classes": num_classes,
            "image_size": SIZE,
            "dataset": dataset,
            "fold": 0,
            "seed": seed,
            "epoch": 0,
            "state_dict": model.state_dict(),
            **extra,
        },
        path,
    )


@pytest.fixture
def rgb_run(tmp_path) -> Path:
    """data/runs/synthetic/unet with two folds (RGB: needs no preprocessing record)."""
    run = tmp_path / "data" / "runs" / "synthetic" / "unet"
    for fold in (0, 1):
        save_checkpoint(run / f"fold{fold}_seed0" / "model.pt", "synthetic", 3, 2, seed=fold)
    return run


@pytest.fixture
def ct_run(tmp_path) -> Path:
    """data/runs/synthetic_volumes/unet (CT, 3 classes) with its processed meta.json beside it."""
    run = tmp_path / "data" / "runs" / "synthetic_volumes" / "unet"
    save_checkpoint(run / "fold0_seed0" / "model.pt", "synthetic_volumes", 1, 3, seed=0)
    meta = {
        "dataset": "synthetic_volumes",
        "kind": "volume",
        "image_size": SIZE,
        "in_channels": 1,
        "modality": "ct",
        "intensity": {"n4": False, "ct_window": [-100.0, 400.0], "clahe_clip": 2.0},
    }
    write_json(tmp_path / "data" / "processed" / "synthetic_volumes" / "meta.json", meta)
    return run


def write_rgb_png(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def write_ct_nifti(path: Path, shape=(20, 24, 6), channels: int = 1) -> np.ndarray:
    """(x, y, z[, m]) HU-like volume with an oblique, anisotropic affine."""
    data = (
        np.random.default_rng(1)
        .normal(50, 120, shape + ((channels,) if channels > 1 else ()))
        .astype(np.float32)
    )
    affine = np.array([[0.7, 0.1, 0, -90], [0, 0.8, 0, 12], [0, 0, 2.5, 30], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return affine


def test_png_round_trip_size_and_class_indices(rgb_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_rgb_png(src / "a.png", 45, 70)
    write_rgb_png(src / "b.jpg", 32, 32, seed=1)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "predict",
            "--run",
            str(rgb_run),
            str(src / "a.png"),
            str(src / "b.jpg"),
            "--out",
            str(out),
            "--overlay",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 checkpoint(s)" in result.output and "registry (synthetic)" in result.output
    mask = np.asarray(Image.open(out / "a_mask.png"))
    assert mask.shape == (45, 70) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert np.asarray(Image.open(out / "b_mask.png")).shape == (32, 32)
    assert np.asarray(Image.open(out / "a_overlay.png")).shape == (45, 70, 3)


def test_nifti_keeps_shape_and_affine_and_finds_meta_beside_runs(ct_run, tmp_path):
    affine = write_ct_nifti(tmp_path / "vol.nii.gz")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", "--run", str(ct_run), str(tmp_path / "vol.nii.gz"), "--out", str(out), "--overlay"]
    )
    assert result.exit_code == 0, result.output
    assert "processed/synthetic_volumes/meta.json" in result.output
    pred = nib.load(str(out / "vol_mask.nii.gz"))
    assert pred.shape == (20, 24, 6)
    np.testing.assert_allclose(pred.affine, affine, atol=1e-6)
    np.testing.assert_allclose(
        pred.header.get_zooms(), nib.load(str(tmp_path / "vol.nii.gz")).header.get_zooms()
    )
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert len(list(out.glob("vol_overlay_slice*.png"))) == 1


def test_nifti_stored_in_another_orientation_gets_its_mask_in_its_own_axes(ct_run, tmp_path):
    """The same scan stored RAS and stored (y, x, z) with x flipped: read reoriented to RAS, both
    predict the same labels, each mask written back in its own file's voxel order and affine."""
    data = np.random.default_rng(1).normal(50, 120, (20, 24, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0])), str(tmp_path / "ras.nii.gz"))
    stored = np.transpose(data[::-1], (1, 0, 2)).copy()  # (y, x flipped, z)
    affine = np.array([[0, -0.7, 0, 0.7 * 19], [0.8, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(stored, affine), str(tmp_path / "yxz.nii.gz"))
    out = tmp_path / "out"
    args = ["predict", "--run", str(ct_run), str(tmp_path / "ras.nii.gz"), str(tmp_path / "yxz.nii.gz")]
    assert runner.invoke(app, [*args, "--out", str(out), "--save-probabilities"]).exit_code == 0
    ras = np.asarray(nib.load(str(out / "ras_mask.nii.gz")).dataobj)
    other = nib.load(str(out / "yxz_mask.nii.gz"))
    assert other.shape == stored.shape and np.allclose(other.affine, affine)
    assert np.array_equal(np.asarray(other.dataobj), np.transpose(ras[::-1], (1, 0, 2)))
    # the probabilities (which vary, unlike this random model's labels) follow the same axes
    p_ras, p_other = np.load(out / "ras_probs.npy"), np.load(out / "yxz_probs.npy")
    assert p_ras.shape == (3, 6, 24, 20) and p_other.shape == (3, 6, 20, 24)  # (K, z, y, x) of each file
    assert np.allclose(p_other, np.transpose(p_ras[..., ::-1], (0, 1, 3, 2)), atol=1e-3)
    assert p_ras.std() > 1e-3


def test_checkpoint_preprocess_record_and_explicit_meta(tmp_path):
    """No meta.json anywhere: the checkpoint's `preprocess` suffices; --processed-meta overrides it."""
    path = tmp_path / "model.pt"
    record = {
        "image_size": SIZE,
        "modality": "ct",
        "in_channels": 1,
        "ct_window": [0, 100],
        "clahe_clip": 3.0,
        "n4": False,
    }
    save_checkpoint(path, "synthetic_volumes", 1, 3, seed=0, preprocess=record)
    prep = load_ensemble(path, CPU).preprocessing
    assert (prep.modality, prep.ct_window, prep.clahe_clip) == ("ct", (0, 100), 3.0)
    meta = tmp_path / "meta.json"
    write_json(meta, {"dataset": "synthetic_volumes", "image_size": SIZE, "in_channels": 1, "modality": "ct",
                      "intensity": {"n4": False, "ct_window": [-100, 400], "clahe_clip": 2.0}})  # fmt: skip
    assert load_ensemble(path, CPU, meta).preprocessing.ct_window == [-100, 400]


def test_fold_ensemble_is_the_mean_of_the_checkpoints_probabilities(rgb_run, tmp_path):
    ensemble = load_ensemble(rgb_run, CPU)
    assert [p.parent.name for p in ensemble.paths] == ["fold0_seed0", "fold1_seed0"]
    write_rgb_png(tmp_path / "x.png", SIZE, SIZE)
    images = torch.from_numpy(
        model_inputs(read_input(tmp_path / "x.png", ensemble.preprocessing), ensemble.preprocessing)
    )
    by_hand = []
    for path in ensemble.paths:
        checkpoint = torch.load(path, weights_only=True)
        model = build_model("unet", 3, 2, base_channels=4)
        model.load_state_dict(checkpoint["state_dict"])
        by_hand.append(model.eval()(images).softmax(1).detach())
    assert not torch.allclose(by_hand[0], by_hand[1])  # two different models
    mean = (by_hand[0] + by_hand[1]) / 2
    torch.testing.assert_close(ensemble_probs(ensemble.models, images, CPU), mean)
    result = runner.invoke(
        app, ["predict", "--run", str(rgb_run), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "o" / "x_mask.png")), mean[0].argmax(0).numpy()
    )


def test_bad_inputs_are_named_and_the_good_ones_still_written(rgb_run, tmp_path):
    write_rgb_png(tmp_path / "good.png", 40, 40)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("hello")
    write_ct_nifti(tmp_path / "vol.nii")
    inputs = ["broken.png", "good.png", "notes.txt", "vol.nii", "missing.png"]
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", "--run", str(rgb_run), *(str(tmp_path / n) for n in inputs), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert (out / "good_mask.png").exists()
    assert f"{tmp_path / 'broken.png'}: cannot read image" in result.output
    assert f"{tmp_path / 'notes.txt'}: unsupported file type" in result.output
    assert (
        f"{tmp_path / 'vol.nii'}: a NIfTI volume, but the model was trained on rgb 2-D images"
        in result.output
    )
    assert f"{tmp_path / 'missing.png'}: no such file" in result.output
    assert "1 of 5 inputs predicted" in result.output


def test_channel_mismatch_and_run_without_checkpoints(ct_run, tmp_path):
    write_ct_nifti(tmp_path / "two.nii.gz", channels=2)
    result = runner.invoke(
        app, ["predict", "--run", str(ct_run), str(tmp_path / "two.nii.gz"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "two.nii.gz: expected a 3-D volume, got shape (20, 24, 6, 2)" in result.output
    gray = tmp_path / "gray_run" / "model.pt"
    save_checkpoint(gray, "custom", 1, 2, seed=0, preprocess={"image_size": SIZE, "modality": "gray", "in_channels": 1,
                                                              "ct_window": None, "clahe_clip": 2.0, "n4": False})  # fmt: skip
    write_rgb_png(tmp_path / "colour.png", 32, 32)
    result = runner.invoke(
        app, ["predict", "--run", str(gray), str(tmp_path / "colour.png"), "--out", str(tmp_path / "o")]
    )
    assert (
        result.exit_code == 1 and "colour.png: a colour image, but the model takes 1 channel" in result.output
    )
    empty = tmp_path / "data" / "runs" / "synthetic" / "segnet"
    empty.mkdir(parents=True)
    result = runner.invoke(
        app, ["predict", "--run", str(empty), str(tmp_path / "colour.png"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "no checkpoints; expected fold*/model.pt" in result.output
    with pytest.raises(ValueError, match="no such file or directory"):
        find_checkpoints(tmp_path / "nowhere")


def test_volume_without_any_preprocessing_record_asks_for_meta(tmp_path):
    path = tmp_path / "elsewhere" / "model.pt"
    save_checkpoint(path, "lits17", 1, 3, seed=0)
    write_ct_nifti(tmp_path / "v.nii.gz")
    result = runner.invoke(
        app, ["predict", "--run", str(path), str(tmp_path / "v.nii.gz"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "pass --processed-meta data/processed/lits17/meta.json" in result.output


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_volumes"])
def test_model_inputs_equal_the_training_samples(dataset, tmp_path):
    """A raw training file through predict's path gives exactly the tensors SegDataset gave training."""
    fetch_dataset(dataset, tmp_path / "raw", None, params_from_dict(tiny_raw_params()).data.synthetic)
    meta = preprocess_dataset(dataset, tmp_path / "raw", tmp_path / "processed", SIZE)
    ref = case_refs(dataset_spec(dataset), tmp_path / "raw")[0]
    checkpoint = {"dataset": dataset, "image_size": SIZE, "in_channels": meta["in_channels"]}
    prep = preprocessing_from_meta(tmp_path / "processed" / "meta.json", checkpoint)
    got = model_inputs(read_input(ref.image, prep), prep)  # (n, C, S, S)
    data = SegDataset(tmp_path / "processed", [ref.case_id])  # slices in slice order
    np.testing.assert_array_equal(got, np.stack([data[i]["image"].numpy() for i in range(len(data))]))
