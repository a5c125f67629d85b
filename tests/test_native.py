"""data.image_size: native: images kept at their own size, training on patches (foreground-biased),
sliding-window inference with Gaussian weights, evaluation and predict at the image's size."""

import numpy as np
import pytest
import torch
from conftest import fp32, replace, tiny_raw_params, train_folds

from medfusion.config import ConfigError, params_from_dict
from medfusion.data.dataset import SegDataset, patch_box
from medfusion.data.io import read_json, write_png
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.evaluation import evaluate_model
from medfusion.inference.window import gaussian_weights, sliding_window_probs, window_starts

FP32 = fp32()
CUSTOM = {"kind": "image", "modality": "rgb", "class_names": ["background", "lesion"], "title": "sizes",
          "group_pattern": None}  # fmt: skip
SIZES = [
    (70, 90),
    (100, 64),
    (81, 120),
    (64, 64),
    (96, 110),
    (75, 75),
    (88, 100),
    (66, 130),
    (90, 90),
    (72, 84),
]


def _raw(tmp_path):
    """Ten RGB images of different sizes, each with a bright disc (the lesion) on a dark noisy field."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(8, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = np.clip(40 + 150 * disc[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        write_png(raw / "images" / f"c{i}.png", image)
        write_png(raw / "masks" / f"c{i}.png", (disc * 255).astype(np.uint8))
    return raw


def test_native_preprocessing_keeps_each_size_in_a_canvas(tmp_path):
    meta = preprocess_dataset("custom", _raw(tmp_path), tmp_path / "proc", "native", custom=CUSTOM)
    assert meta["image_size"] == "native" and meta["canvas"] == [112, 144]  # 100 -> 112, 130 -> 144
    assert meta["cases"]["c7"]["shape"] == [66, 130]
    images = np.load(tmp_path / "proc" / "images.npy", mmap_mode="r")
    assert images.shape == (10, 3, 112, 144) and not images[7, :, 66:, :].any()  # zero padding
    full = SegDataset(tmp_path / "proc", ["c7"])
    item = full[0]
    assert item["image"].shape == (3, 80, 144) and item["mask"].shape == (80, 144)  # padded to 16
    assert float(item["image"][:, 66:].abs().max()) == 0.0  # the padding is the z-scored mean
    patches = SegDataset(tmp_path / "proc", ["c7"], patch_size=32, seed=1)
    a, b = patches[(0, 0)], patches[(0, 0)]
    assert a["image"].shape == (3, 32, 32) and torch.equal(a["image"], b["image"])  # reproducible


def test_patches_favour_foreground_as_nnunet_does():
    mask = np.zeros((200, 300), np.uint8)
    mask[10:14, 280:284] = 1  # a speck in a corner: a uniform patch rarely holds it
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(600):
        y, x = patch_box(mask, 32, rng)
        assert 0 <= y <= 200 - 32 and 0 <= x <= 300 - 32
        hits += bool(mask[y : y + 32, x : x + 32].any())
    assert 0.3 < hits / 600 < 0.45  # a third centred on foreground, plus the uniform ones that catch it


def test_sliding_window_covers_every_pixel_and_weights_the_centre():
    assert window_starts(100, 32, 0.5) == [
        0,
        14,
        27,
        41,
        54,
        68,
    ]  # steps <= 16 and window_starts(20, 32, 0.5) == [0]
    g = gaussian_weights(32)
    assert (
        g.shape == (32, 32)
        and float(g.min()) > 0
        and float(g[15:17, 15:17].min()) == pytest.approx(float(g.max()), rel=1e-3)
    )

    class Constant(torch.nn.Module):  # logits from the input's first channel: a pixelwise model
        def forward(self, x):
            return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], dim=1)

    image = torch.randn(1, 3, 50, 77)
    probs = sliding_window_probs(Constant(), image, FP32, 32)
    expected = torch.softmax(torch.cat([torch.zeros_like(image[:, :1]), image[:, :1]], 1), 1)
    assert probs.shape == (1, 2, 50, 77) and torch.allclose(probs, expected, atol=1e-5)  # exact stitching


def test_native_params_are_checked():
    raw = tiny_raw_params()
    raw["data"]["image_size"] = "native"
    with pytest.raises(ConfigError, match="data.patch_size"):
        params_from_dict(raw)
    raw["data"]["patch_size"] = 32
    raw["datasets"] = ["synthetic", "synthetic_volumes"]
    with pytest.raises(ConfigError, match=r"volume datasets \['synthetic_volumes'\]"):
        params_from_dict(raw)
    raw["datasets"] = ["synthetic"]
    raw["drgo"]["region_size"] = 16
    assert params_from_dict(raw).data.model_size == 32
    raw["data"]["image_size"] = 64
    with pytest.raises(ConfigError, match="null unless data.image_size is native"):
        params_from_dict(raw)


def test_native_training_and_evaluation_at_each_images_size(tmp_path):
    preprocess_dataset("custom", _raw(tmp_path), tmp_path / "proc", "native", custom=CUSTOM)
    raw = tiny_raw_params()
    raw["datasets"] = ["custom"]
    raw["data"].update(image_size="native", patch_size=32, custom=CUSTOM)
    raw["data"]["sources"]["custom"] = str(tmp_path / "raw")
    raw["drgo"]["region_size"] = 16
    params = replace(params_from_dict(raw), "train", epochs=3)
    groups = {c["case_id"]: c["group"] for c in read_json(tmp_path / "proc" / "cases.json")}
    split = make_split(groups, "fraction", 2, 0, 0.2)
    runs = train_folds(params, "custom", "unet", tmp_path / "proc", split, tmp_path / "runs")
    checkpoint = torch.load(tmp_path / "runs" / "fold0_seed0" / "model.pt", weights_only=True)
    assert checkpoint["image_size"] == "native" and checkpoint["patch_size"] == 32
    per_case, info, examples = evaluate_model(runs, tmp_path / "runs", tmp_path / "proc", split, 4, FP32)
    assert set(per_case["case_id"]) == set(split["test"]) and (per_case["resolution"] == "original").all()
    assert "sliding window" in info["resolution_text"] and info["image_size"] == "native"
    dice = per_case[(per_case["metric"] == "dice") & (per_case["postprocess"] == "raw")]["value"]
    assert dice.between(0, 1).all()
    assert examples["images"].shape[1:] == (3, 256, 256)  # shown at one size

    from PIL import Image

    from medfusion.predict import load_ensemble, predict_files

    ensemble = load_ensemble(tmp_path / "runs", FP32, tmp_path / "proc" / "meta.json")
    assert ensemble.patch_size == 32 and ensemble.preprocessing.native
    assert predict_files(ensemble, [tmp_path / "raw" / "images" / "c7.png"], tmp_path / "out") == {}
    mask = np.asarray(Image.open(tmp_path / "out" / "c7_mask.png"))
    assert mask.shape == (66, 130) and set(np.unique(mask)) <= {0, 1}  # the input's own size
