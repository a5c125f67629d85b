"""`medfusion evaluate`: a trained run scored on a folder of images and masks, without retraining.

Known answers: each run's and the ensemble's per-case Dice equals the Dice counted here between the
mask `medfusion predict` writes (the same checkpoints) and the ground truth, at the image's own size,
whatever the files' formats; with a field of view, counted inside it only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from test_predict import save_checkpoint
from typer.testing import CliRunner

from medfusion.cli import app

runner = CliRunner()
SIZES = {"a": (45, 70), "b": (32, 40), "c": (50, 36)}


@pytest.fixture
def rgb_run(tmp_path) -> Path:
    """data/runs/synthetic/unet, two folds of random tiny U-Nets whose head is scaled up (bias 0), so
    that each predicts a mixed foreground that differs between the folds (not all one class)."""
    run = tmp_path / "data" / "runs" / "synthetic" / "unet"
    for fold in (0, 1):
        path = run / f"fold{fold}_seed0" / "model.pt"
        save_checkpoint(path, "synthetic", 3, 2, seed=fold)
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["state_dict"]["head.weight"] *= 20
        checkpoint["state_dict"]["head.bias"].zero_()
        torch.save(checkpoint, path)
    return run


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    tp = np.count_nonzero(pred & target)
    return 2 * tp / (np.count_nonzero(pred) + np.count_nonzero(target))


def _folder(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """images/ in three formats (PNG, 3-sample MinIsBlack TIFF, PPM), masks/ with stray greys."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    truth = {}
    rng = np.random.default_rng(3)
    for stem, (h, w) in SIZES.items():
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if stem == "a":
            Image.fromarray(image).save(images / "a.png")
        elif stem == "b":
            tifffile.imwrite(images / "b.tif", image, photometric="minisblack", planarconfig="contig")
        else:
            Image.fromarray(image).save(images / "c.ppm")
        target = np.zeros((h, w), bool)
        target[h // 4 : 3 * h // 4, w // 5 : w // 2] = True
        grey = np.where(target, 255, 0).astype(np.uint8)
        grey[0, :3] = [9, 21, 30]  # a lossy tool's strays, all below the threshold
        Image.fromarray(grey).save(masks / f"{stem}.png")
        truth[stem] = target
    return images, masks, truth


def _predicted(run: Path, images: Path, tmp_path: Path, name: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"pred_{name}"
    files = sorted(str(p) for p in images.iterdir())
    result = runner.invoke(app, ["predict", "--run", str(run), *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {stem: np.asarray(Image.open(out / f"{stem}_mask.png")) == 1 for stem in SIZES}


def _evaluate(run: Path, images: Path, masks: Path, out: Path, *extra: str):
    args = ["evaluate", "--run", str(run), "--images", str(images), "--masks", str(masks), "--out", str(out)]
    return runner.invoke(app, [*args, *extra])


def test_per_case_dice_equals_the_predicted_masks_dice(rgb_run, tmp_path):
    images, masks, truth = _folder(tmp_path)
    refused = _evaluate(rgb_run, images, masks, tmp_path / "refused")
    assert (
        refused.exit_code == 1 and "--mask-threshold (e.g. 127)" in refused.output
    )  # the option of this command
    out = tmp_path / "scores"
    result = _evaluate(rgb_run, images, masks, out, "--mask-threshold", "127")
    assert result.exit_code == 0, result.output
    assert result.stdout == (out / "summary.md").read_text() + "\n"  # the data alone; the notice on stderr
    assert "cases scored" in result.stderr
    per_case = pd.read_csv(out / "per_case.csv")
    assert set(per_case["run"]) == {"fold0_seed0", "fold1_seed0", "ensemble"}
    assert set(per_case["postprocess"]) == {"raw"}  # no eval.json beside the run
    assert set(per_case["resolution"]) == {"original"} and set(per_case["roi"]) == {"image"}
    assert {"hd95", "assd", "iou", "precision", "recall"} <= set(per_case["metric"])
    seen = set()
    for run, path in (("ensemble", rgb_run), ("fold1_seed0", rgb_run / "fold1_seed0")):
        predicted = _predicted(path, images, tmp_path, run)
        assert all(0.02 < m.mean() < 0.98 for m in predicted.values())  # a mixed prediction
        seen |= {round(dice(predicted[s], truth[s]), 6) for s in SIZES}
        for stem, ext in (("a", ".png"), ("b", ".tif"), ("c", ".ppm")):
            row = per_case.query(f"run == @run and case_id == '{stem}{ext}' and metric == 'dice'")
            assert len(row) == 1
            assert row["value"].iloc[0] == pytest.approx(dice(predicted[stem], truth[stem]), abs=1e-9)
    assert len(seen) == 6  # six different Dice values: the check can tell runs and cases apart
    summary = pd.read_csv(out / "summary.csv")
    mean = summary.query("run == 'ensemble' and metric == 'dice' and postprocess == 'raw'")["mean"].iloc[0]
    assert mean == pytest.approx(per_case.query("run == 'ensemble' and metric == 'dice'")["value"].mean())
    assert "masks binarised at > 127" in (out / "summary.md").read_text()


def test_field_of_view_restricts_the_scored_pixels(rgb_run, tmp_path):
    images, masks, truth = _folder(tmp_path)
    fov_dir = tmp_path / "fov"
    fov_dir.mkdir()
    fovs = {}
    for stem, (h, w) in SIZES.items():
        fovs[stem] = np.zeros((h, w), bool)
        fovs[stem][:, : w // 3] = True  # the left third: part of the structure
        Image.fromarray(fovs[stem].astype(np.uint8) * 255).save(fov_dir / f"{stem}.gif")
    out = tmp_path / "scores"
    result = _evaluate(rgb_run, images, masks, out, "--mask-threshold", "127", "--fov", str(fov_dir))
    assert result.exit_code == 0, result.output
    per_case = pd.read_csv(out / "per_case.csv")
    assert set(per_case["roi"]) == {"fov"}
    predicted = _predicted(rgb_run, images, tmp_path, "fov")
    for stem, ext in (("a", ".png"), ("b", ".tif"), ("c", ".ppm")):
        row = per_case.query(f"run == 'ensemble' and case_id == '{stem}{ext}' and metric == 'dice'")
        inside = dice(predicted[stem] & fovs[stem], truth[stem] & fovs[stem])
        assert row["value"].iloc[0] == pytest.approx(inside, abs=1e-9)
    assert "inside the field of view only" in (out / "summary.md").read_text()
    Image.fromarray(np.ones((5, 5), np.uint8)).save(fov_dir / "a.gif")
    bad = _evaluate(
        rgb_run, images, masks, tmp_path / "bad", "--mask-threshold", "127", "--fov", str(fov_dir)
    )
    assert bad.exit_code == 1 and "a.gif: FOV mask of size (5, 5); its image a.png is (45, 70)" in bad.output


def test_post_processing_recorded_on_validation_is_applied(rgb_run, tmp_path):
    images, masks, _ = _folder(tmp_path)
    eval_dir = tmp_path / "data" / "eval" / "synthetic" / "unet"
    eval_dir.mkdir(parents=True)
    huge = {"min_size": 10**7, "fill_holes": False, "thresholds": None}  # removes every component
    keep = {"min_size": 0, "fill_holes": False, "thresholds": None}
    record = {"postprocess": {"fold0_seed0": keep, "fold1_seed0": keep, "ensemble": huge}}
    (eval_dir / "eval.json").write_text(json.dumps(record))
    out = tmp_path / "scores"
    assert _evaluate(rgb_run, images, masks, out, "--mask-threshold", "127").exit_code == 0
    per_case = pd.read_csv(out / "per_case.csv").query("metric == 'dice'")
    post = per_case.query("run == 'ensemble' and postprocess == 'post'")
    assert len(post) == 3 and (post["value"] == 0).all()  # nothing left: Dice 0 against a non-empty truth
    raw = per_case.query("run == 'fold0_seed0'").pivot(index="case_id", columns="postprocess", values="value")
    assert np.allclose(raw["raw"], raw["post"])


def test_bad_folders_are_named(rgb_run, tmp_path):
    images, masks, _ = _folder(tmp_path)
    (masks / "c.png").unlink()
    result = _evaluate(rgb_run, images, masks, tmp_path / "out", "--mask-threshold", "127")
    assert result.exit_code == 1 and "c.ppm: no mask with stem 'c' in" in result.output
    result = _evaluate(rgb_run, tmp_path / "nowhere", masks, tmp_path / "out")
    assert result.exit_code == 1 and "--images" in result.output and "no such folder" in result.output
    three = tmp_path / "three" / "fold0_seed0" / "model.pt"
    save_checkpoint(three, "synthetic", 3, 3, seed=0)
    result = _evaluate(three, images, masks, tmp_path / "out", "--mask-threshold", "127")
    assert result.exit_code == 1 and "--mask-threshold binarises masks" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the inputs were checked


# ------------------------------------------------------- medfusion predict gives what the tables report


def _predict(run: Path, out: Path, *args: str):
    result = runner.invoke(app, ["predict", "--run", str(run), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return result


def test_predict_applies_the_post_processing_chosen_on_validation(rgb_run, tmp_path):
    images, _, _ = _folder(tmp_path)
    raw = _predict(rgb_run, tmp_path / "raw", str(images), "--save-probabilities")
    assert "raw argmax" in raw.output and "3 of 3 inputs" in raw.output  # a folder gives its files
    probs = np.load(tmp_path / "raw" / "a_probs.npy")
    assert probs.shape == (2, *SIZES["a"]) and probs.dtype == np.float16
    mask = np.asarray(Image.open(tmp_path / "raw" / "a_mask.png"))
    assert (probs.argmax(0) == mask).mean() > 0.999  # float16 ties aside, the mask is their argmax
    eval_dir = tmp_path / "data" / "eval" / "synthetic" / "unet"
    eval_dir.mkdir(parents=True)
    big = {"min_size": 200, "fill_holes": True, "thresholds": None}
    none = {"min_size": 0, "fill_holes": False, "thresholds": None}
    record = {"postprocess": {"fold0_seed0": none, "fold1_seed0": none, "ensemble": big}}
    (eval_dir / "eval.json").write_text(json.dumps(record))
    post = _predict(rgb_run, tmp_path / "post", str(images))
    assert "min_size=200, fill_holes=True" in post.output
    from medfusion.postprocess import PostProcess, apply

    for stem in SIZES:
        expected = apply(
            PostProcess(200, True), np.load(tmp_path / "raw" / f"{stem}_probs.npy").astype(np.float32)
        )
        got = np.asarray(Image.open(tmp_path / "post" / f"{stem}_mask.png"))
        assert (got == expected).mean() > 0.999
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "post" / "a_mask.png")), mask)
    # the evaluation's "post" rows are these masks' scores
    _, masks, truth = _folder(tmp_path / "again")
    out = tmp_path / "scores"
    assert _evaluate(rgb_run, images, masks, out, "--mask-threshold", "127").exit_code == 0
    per_case = pd.read_csv(out / "per_case.csv").query(
        "run == 'ensemble' and postprocess == 'post' and metric == 'dice'"
    )
    got = np.asarray(Image.open(tmp_path / "post" / "a_mask.png")) == 1
    assert per_case.query("case_id == 'a.png'")["value"].iloc[0] == pytest.approx(
        dice(got, truth["a"]), abs=1e-3
    )
    assert "raw argmax" in _predict(rgb_run, tmp_path / "np", str(images), "--no-postprocess").output


def test_predict_tta_is_flip_equivariant_and_folds_select_runs(rgb_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(src / "x.png")
    Image.fromarray(image[:, ::-1].copy()).save(src / "xf.png")
    for tta in ("none", "flip"):
        out = tmp_path / tta
        _predict(rgb_run, out, str(src / "x.png"), str(src / "xf.png"), "--tta", tta, "--save-probabilities")
        p, pf = np.load(out / "x_probs.npy"), np.load(out / "xf_probs.npy")
        equivariant = np.allclose(p[..., ::-1], pf, atol=2e-3)
        # a CNN is not flip-equivariant; averaged over flips, its prediction is
        assert equivariant == (tta == "flip")
    _predict(rgb_run, tmp_path / "fold1", str(src / "x.png"), "--folds", "1", "--save-probabilities")
    _predict(rgb_run / "fold1_seed0", tmp_path / "alone", str(src / "x.png"), "--save-probabilities")
    assert np.array_equal(
        np.load(tmp_path / "fold1" / "x_probs.npy"), np.load(tmp_path / "alone" / "x_probs.npy")
    )
    missing = runner.invoke(
        app, ["predict", "--run", str(rgb_run), "--out", str(tmp_path / "m"), str(src), "--folds", "4"]
    )
    assert missing.exit_code == 1 and "has runs of folds [0, 1] only" in missing.output
