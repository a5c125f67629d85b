"""eval.roi_loss: the training loss and validation inside a field of view (medfusion.training.loop.inside_roi)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import replace, tiny_raw_params, train_fold
from PIL import Image

from medfusion.config import params_from_dict
from medfusion.data.dataset import SegDataset
from medfusion.data.distance import OUTSIDE_ROI, distance_map
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import read_json
from medfusion.data.preprocess import preprocess_dataset
from medfusion.entries import resolve_entry
from medfusion.losses import drgo
from medfusion.losses.dice import segmentation_loss
from medfusion.training.loop import DRGOObjective, inside_roi

SETTINGS = drgo.DRGOSettings(region_size=4, regions_per_image=4)


def _params():
    return params_from_dict(tiny_raw_params())


def _masked_batch(k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, k, 8, 8) with gradients, labels with the right three columns outside the region."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, (2, 8, 8), generator=g)
    target[:, :, 5:] = OUTSIDE_ROI
    logits = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    return logits, target, target[:, :, 5:] == OUTSIDE_ROI


def test_inside_roi_makes_the_outside_certain_background():
    logits, target, _ = _masked_batch(3)
    scores, labels = inside_roi(logits, target)
    assert (labels[:, :, 5:] == 0).all() and torch.equal(labels[:, :, :5], target[:, :, :5])
    probs = scores.softmax(1)
    assert torch.equal(probs[:, 0, :, 5:], torch.ones(2, 8, 3))  # exactly background in fp32
    assert torch.equal(scores[:, :, :, :5], logits[:, :, :, :5])  # inside untouched


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_l_seg_inside_the_roi_ignores_the_outside(ce_weight):
    logits, target, _ = _masked_batch()
    loss = segmentation_loss(*inside_roi(logits, target), ce_weight)
    loss.backward()
    assert (logits.grad[:, :, :, 5:] == 0).all() and (logits.grad[:, :, :, :5] != 0).any()
    other = logits.detach().clone()
    other[:, :, :, 5:] = torch.randn(2, 2, 8, 3) * 10  # anything outside
    assert float(segmentation_loss(*inside_roi(other, target), ce_weight)) == pytest.approx(loss.item())


def test_drgo_objective_with_roi_gives_no_gradient_outside():
    logits, target, _ = _masked_batch()
    distance = torch.from_numpy(np.stack([distance_map(t.numpy()) for t in target]))
    objective = DRGOObjective(SETTINGS, torch.tensor([0.5, 0.5]), 1.0, seed=0, roi=True)
    objective(logits, target, {"distance": distance}).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, :, :, 5:] == 0).all() and (logits.grad[:, :, :, :5] != 0).any()


def test_distance_map_treats_the_outside_as_background():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = OUTSIDE_ROI
    assert np.array_equal(distance_map(mask), distance_map(np.zeros((8, 8), np.uint8)))  # no edge at the FOV


def _fov_dataset(tmp_path, cases: int = 4):
    """A custom dataset of 16x24 images whose field of view is the left half; processed at 16."""
    src = tmp_path / "src"
    for d in ("images", "masks", "fov"):
        (src / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    fov = np.zeros((16, 24), np.uint8)
    fov[:, :12] = 255
    for k in range(cases):
        mask = np.zeros((16, 24), np.uint8)
        mask[3:12, 2 + k : 20 - k] = 255  # crosses the FOV's edge
        image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
        image[mask > 0] = 220
        Image.fromarray(image).save(src / "images" / f"c{k}.png")
        Image.fromarray(mask).save(src / "masks" / f"c{k}.png")
        Image.fromarray(fov).save(src / "fov" / f"c{k}.png")
    params = _params()
    custom = dataclasses.asdict(params.data.custom)
    fetch_dataset("custom", tmp_path / "raw", src, params.data.synthetic, custom)
    preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 16, custom)
    return tmp_path / "proc", [f"c{k}" for k in range(cases)]


def test_dataset_marks_the_outside_and_augmentation_moves_it(tmp_path):
    proc, ids = _fov_dataset(tmp_path)
    plain, inside = SegDataset(proc, ids), SegDataset(proc, ids, roi=True)
    fov = np.load(proc / "fov.npy")[0] > 0
    assert fov[:, :8].all() and not fov[:, 8:].any()  # the left half at 16x16
    a, b = plain[0]["mask"].numpy(), inside[0]["mask"].numpy()
    assert (b[~fov] == OUTSIDE_ROI).all() and np.array_equal(b[fov], a[fov])
    flip = dataclasses.replace(_params().augment, hflip_p=1.0, vflip_p=0.0, rotate_p=0.0, scale_p=0.0,
                               elastic_p=0.0, brightness_contrast_p=0.0, gamma_p=0.0)  # fmt: skip
    flipped = SegDataset(proc, ids, augment=flip, roi=True)[0]["mask"].numpy()
    assert np.array_equal(flipped, b[:, ::-1])  # the region moved with the image


def test_roi_loss_changes_the_run_hash_only_when_set():
    params = _params()
    off = resolve_entry(params, "synthetic", "unet")
    on = resolve_entry(replace(params, "eval", roi_loss=True), "synthetic", "unet")
    assert "roi_loss" not in off.config() and on.config()["roi_loss"] is True
    split = {"train": ["a"], "val": ["b"]}
    assert off.run_hash("sha", split, 0, 0) != on.run_hash("sha", split, 0, 0)


def test_a_run_trains_and_validates_inside_the_fov(tmp_path):
    proc, ids = _fov_dataset(tmp_path)
    split = {"test": [], "folds": [{"train": ids[:3], "val": ids[3:]}]}
    params = replace(replace(_params(), "eval", roi_loss=True), "train", epochs=1)
    record = train_fold(params, "custom", "unet", proc, split, 0, 0, tmp_path / "run")
    history = read_json(tmp_path / "run" / "history.json")["epochs"]
    assert record and np.isfinite(history[0]["val_loss"]) and 0.0 <= history[0]["val_dice"] <= 1.0
