"""Cases given as several channel files, as nnU-Net's raw layout stores multi-modal data
(imagesTr/<case>_0000<ending>, <case>_0001<ending>, ...; data.custom.channels).

Known answers: every channel of a multi-channel dataset is preprocessed exactly as the same file is
when it is a dataset's only channel; `predict.read_input` stacks the files as preprocessing does; a
model trained on such data predicts and is scored from folders of channel files, its per-case Dice
equal to the one counted here from the masks `medfusion predict` wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_raw_params, train_fold
from PIL import Image
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.config import ConfigError, params_from_dict
from medfusion.data.fetch import FetchError, fetch_dataset
from medfusion.data.io import DataError, read_json, read_nifti, write_nifti
from medfusion.data.preprocess import preprocess_dataset

runner = CliRunner()
PARAMS = params_from_dict(tiny_raw_params())
SHAPE_2D, SHAPE_3D = (40, 52), (5, 24, 28)


def _custom(kind: str = "image", channels: int = 2, **changes) -> dict:
    modality = "gray" if kind == "image" else "ct"
    base = dataclasses.asdict(PARAMS.data.custom)
    return {**base, "kind": kind, "modality": modality, "class_names": ["background", "lesion"],
            "channels": channels, **changes}  # fmt: skip


def _planes(k: int, kind: str, channels: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Case k: `channels` different images (grey uint8, or CT HU) with a square lesion, and its label."""
    rng = np.random.default_rng(k)
    shape = SHAPE_2D if kind == "image" else SHAPE_3D
    label = np.zeros(shape, np.uint8)
    label[..., 8 : 18 + k % 4, 10:22] = 1
    planes = []
    for c in range(channels):
        if kind == "image":
            planes.append((rng.integers(0, 90, shape) + 100 * (c + 1) * label).clip(0, 255).astype(np.uint8))
        else:
            planes.append((rng.normal(0, 30, shape) + (60 + 80 * c) * label - 20 * c).astype(np.float32))
    return planes, label


def _dataset(root: Path, kind: str = "image", n: int = 8, channels: int = 2, only: int | None = None) -> Path:
    """DatasetNNN_Name/ in nnU-Net's raw layout, `channels` files per case; `only` c: the same cases with
    channel c alone as their _0000 file (a 1-channel dataset)."""
    raw = root / "Dataset007_Channels"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    ending = ".png" if kind == "image" else ".nii.gz"
    names = ["T2", "ADC", "DWI"][:channels] if only is None else ["T2"]
    desc = {"channel_names": {str(k): v for k, v in enumerate(names)}, "file_ending": ending,
            "labels": {"background": 0, "lesion": 1}, "numTraining": n}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(desc))
    for k in range(n):
        planes, label = _planes(k, kind, channels)
        planes = planes if only is None else [planes[only]]
        for c, plane in enumerate(planes):
            path = raw / "imagesTr" / f"case_{k:03d}_{c:04d}{ending}"
            Image.fromarray(plane).save(path) if kind == "image" else write_nifti(
                path, plane, (2.5, 0.8, 0.8)
            )
        label_path = raw / "labelsTr" / f"case_{k:03d}{ending}"
        Image.fromarray(label).save(label_path) if kind == "image" else write_nifti(
            label_path, label, (2.5, 0.8, 0.8)
        )
    return raw


@pytest.mark.parametrize("kind", ["image", "volume"])
def test_each_channel_is_preprocessed_as_it_would_be_alone(tmp_path, kind):
    src = _dataset(tmp_path / "src", kind, n=3)
    fetch_dataset("custom", tmp_path / "raw", src, PARAMS.data.synthetic, _custom(kind))
    copied = sorted(p.name for p in (tmp_path / "raw" / "imagesTr").iterdir())
    assert len(copied) == 6 and "case_002_0001" in " ".join(copied)  # every channel is in the copy
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 16, _custom(kind))
    assert (meta["in_channels"], meta["modalities"], meta["channel_files"]) == (2, 2, 2)
    images = np.load(tmp_path / "proc" / "images.npy")
    assert images.shape == ((3 if kind == "image" else 15), 2, 16, 16)
    for c in (0, 1):
        alone = _dataset(tmp_path / f"alone{c}", kind, n=3, only=c)
        fetch_dataset("custom", tmp_path / f"raw{c}", alone, PARAMS.data.synthetic, _custom(kind, 1))
        preprocess_dataset("custom", tmp_path / f"raw{c}", tmp_path / f"proc{c}", 16, _custom(kind, 1))
        single = np.load(tmp_path / f"proc{c}" / "images.npy")
        assert single.shape[1] == 1 and np.array_equal(images[:, c], single[:, 0])
    assert not np.array_equal(images[:, 0], images[:, 1])


def test_channel_files_are_refused_by_name(tmp_path):
    src = _dataset(tmp_path / "a", "image", n=3)
    with pytest.raises(FetchError, match=r"channel files \['0000', '0001'\].*set data.custom.channels to 2"):
        fetch_dataset("custom", tmp_path / "r1", src, PARAMS.data.synthetic, _custom(channels=1))
    with pytest.raises(
        FetchError, match=r"channel_names \['T2', 'ADC'\] \(2\); .*set data.custom.channels to 2"
    ):
        fetch_dataset("custom", tmp_path / "r2", src, PARAMS.data.synthetic, _custom(channels=3))
    (src / "imagesTr" / "case_001_0001.png").unlink()
    with pytest.raises(
        FetchError, match=r"case 'case_001' has channel files \['0000'\]; .*expects \['0000', '0001'\]"
    ):
        fetch_dataset("custom", tmp_path / "r3", src, PARAMS.data.synthetic, _custom())
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "masks").mkdir()
    with pytest.raises(FetchError, match=r"data.custom.channels = 2 needs nnU-Net's raw layout"):
        fetch_dataset("custom", tmp_path / "r4", flat, PARAMS.data.synthetic, _custom())
    # a channel in another space than channel 0: refused when read, naming the file
    vol = _dataset(tmp_path / "v", "volume", n=2)
    fetch_dataset("custom", tmp_path / "r5", vol, PARAMS.data.synthetic, _custom("volume"))
    moved = tmp_path / "r5" / "imagesTr" / "case_001_0001.nii.gz"
    data, _, _ = read_nifti(moved, ndim=3, with_affine=True)
    moved.unlink()
    write_nifti(moved, data, (2.5, 0.8, 0.9))
    with pytest.raises(DataError, match=r"case_001_0001.nii.gz: a channel of shape .* one space"):
        preprocess_dataset("custom", tmp_path / "r5", tmp_path / "p5", 16, _custom("volume"))


def test_channels_option_is_checked():
    for value, why in ((0, "an integer >= 1"), (True, "expected int, got bool")):
        raw = tiny_raw_params()
        raw["data"]["custom"]["channels"] = value
        with pytest.raises(ConfigError, match=rf"data.custom.channels.*{why}"):
            params_from_dict(raw)
    raw = tiny_raw_params()
    raw["data"]["custom"].update(channels=2, modality="rgb")
    with pytest.raises(
        ConfigError, match=r"data.custom.modality = 'rgb'; expected gray with data.custom.channels = 2"
    ):
        params_from_dict(raw)
    raw = tiny_raw_params()
    raw["data"]["custom"].update(channels=4, modality="mri", kind="volume")
    spec = params_from_dict(raw).spec("custom")
    assert (spec.in_channels, spec.modalities, spec.channel_files) == (4, 4, 4)


def test_read_input_stacks_channel_files_as_preprocessing_reads_them(tmp_path):
    from medfusion.data.preprocess import read_channels_3d
    from medfusion.predict import Preprocessing, expand_inputs, output_stem, read_input

    src = _dataset(tmp_path, "volume", n=2)
    first = src / "imagesTr" / "case_001_0000.nii.gz"
    prep = Preprocessing(16, "ct", 2, (-100.0, 400.0), 2.0, False, "test")
    case = read_input(first, prep)
    volume, spacing, _ = read_channels_3d(first, 2, 2)
    assert case.image.shape == (2, *SHAPE_3D) and np.array_equal(case.image, volume)
    for c in (0, 1):
        alone, _, _ = read_nifti(src / "imagesTr" / f"case_001_{c:04d}.nii.gz", ndim=3, with_affine=True)
        assert np.allclose(case.image[c], alone)
    rgb = Preprocessing(16, "rgb", 3, None, None, False, "test")
    assert output_stem(first, rgb) == "case_001_0000"  # an RGB model's input is one file, whatever its name
    assert output_stem(first, prep) == "case_001" and [
        p.name for p in expand_inputs([src / "imagesTr"], prep)
    ] == [
        "case_000_0000.nii.gz",
        "case_001_0000.nii.gz",
    ]
    grey = Preprocessing(16, "gray", 2, None, 2.0, False, "test")
    lone = tmp_path / "lone.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(lone)
    with pytest.raises(DataError, match=r"lone.png: the model takes 2 grey channels, one file each"):
        read_input(lone, grey)
    from medfusion.predict import PredictError, array_case  # the MLflow model's input: (H, W, M)

    assert array_case(np.zeros((8, 9, 2), np.uint8), grey).image.shape == (8, 9, 2)
    with pytest.raises(PredictError, match=r"array: 3 channels; the model takes 2"):
        array_case(np.zeros((8, 9, 3), np.uint8), grey)


def test_a_model_trained_on_channel_files_predicts_and_is_scored_from_them(tmp_path):
    from medfusion.entries import resolve_entry

    src = _dataset(tmp_path / "src", "image", n=8)
    raw = tiny_raw_params()
    raw["datasets"] = ["custom"]
    raw["data"]["custom"] = _custom()
    raw["data"]["sources"]["custom"] = str(src)
    params = params_from_dict(raw)
    assert resolve_entry(params, "custom", "casnet").model.kwargs["modalities"] == 2  # one encoder each
    fetch_dataset("custom", tmp_path / "raw", src, params.data.synthetic, raw["data"]["custom"])
    preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 32, raw["data"]["custom"])
    cases = [c["case_id"] for c in read_json(tmp_path / "proc" / "cases.json")]
    split = {"test": cases[6:], "folds": [{"train": cases[:4], "val": cases[4:6]}]}
    runs = tmp_path / "data" / "runs" / "custom" / "unet"
    train_fold(params, "custom", "unet", tmp_path / "proc", split, 0, 0, runs / "fold0_seed0")

    folder = tmp_path / "new"
    shutil.copytree(src / "imagesTr", folder)
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", "--run", str(runs), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"case_{k:03d}_mask.png" for k in range(8)]
    result = runner.invoke(
        app,
        ["evaluate", "--run", str(runs), "--images", str(folder), "--masks", str(src / "labelsTr"),
         "--out", str(tmp_path / "scored")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "scored" / "per_case.csv")
    dice = rows[(rows.metric == "dice") & (rows.postprocess == "raw")].set_index("case_id")["value"]
    assert len(dice) == 8
    for k in range(8):
        mask = np.asarray(Image.open(out / f"case_{k:03d}_mask.png")) == 1
        truth = _planes(k, "image", 2)[1] == 1
        expected = 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())
        assert dice[f"case_{k:03d}.png"] == pytest.approx(expected, abs=1e-9)
