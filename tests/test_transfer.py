"""eval.transfer: models trained on `synthetic` scored on all cases of a second, named custom dataset
with other image sizes and a field of view, without retraining (pipeline/transfer.py as the stage
runs it), its statistics against CASNet and the report's generalisation table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_raw_params, train_folds
from PIL import Image

from medfusion.config import ConfigError, model_sections, params_from_dict
from medfusion.data.fetch import fetch_dataset
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.generalisation import generalisation_table, load_results


def _clinic(raw_synthetic: Path, dest: Path) -> dict[str, tuple[int, int]]:
    """The synthetic images resized to other sizes (masks nearest), each with an elliptic field of view."""
    for d in ("images", "masks", "fov"):
        (dest / d).mkdir(parents=True)
    sizes = {}
    images = sorted((raw_synthetic / "images").iterdir())[:6]
    for k, path in enumerate(images):
        w, h = 40 + 8 * k, 56 - 4 * k
        Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR).save(dest / "images" / f"c{k}.png")
        mask = np.asarray(
            Image.open(raw_synthetic / "masks" / f"{path.stem}.png").resize((w, h), Image.NEAREST)
        )
        Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(dest / "masks" / f"c{k}.png")
        yy, xx = np.mgrid[:h, :w]
        fov = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1
        Image.fromarray(fov.astype(np.uint8) * 255).save(dest / "fov" / f"c{k}.png")
        sizes[f"c{k}"] = (h, w)
    return sizes


def _params(tmp_path: Path) -> dict:
    raw = tiny_raw_params()
    raw["model"].update(model_sections()["model"].TINY)
    raw["models"] = {"casnet": ["casnet"], "baselines": ["unet"]}
    raw["train"]["epochs"] = 1
    clinic = {**raw["data"]["custom"], "title": "Clinic (other sizes, FOV)"}
    raw["data"]["custom"] = {"clinic": clinic}
    raw["data"]["sources"]["clinic"] = str(tmp_path / "clinic_src")
    raw["eval"]["transfer"] = {"synthetic": ["clinic"]}
    return raw


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """data/{raw,processed,runs}/synthetic in a repository-like folder: casnet and unet, 2 folds."""
    root = tmp_path_factory.mktemp("transfer")
    raw = _params(root)
    params = params_from_dict(raw)
    data = root / "data"
    fetch_dataset("synthetic", data / "raw" / "synthetic", None, params.data.synthetic)
    meta = preprocess_dataset("synthetic", data / "raw" / "synthetic", data / "processed" / "synthetic", 32)
    assert meta["num_cases"] == 24
    from medfusion.data.io import read_json

    groups = {c["case_id"]: c["group"] for c in read_json(data / "processed" / "synthetic" / "cases.json")}
    split = make_split(groups, "fraction", 2, 0, 0.2)
    for entry in ("casnet", "unet"):
        train_folds(
            params,
            "synthetic",
            entry,
            data / "processed" / "synthetic",
            split,
            data / "runs" / "synthetic" / entry,
        )
    sizes = _clinic(data / "raw" / "synthetic", root / "clinic_src")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root, sizes


def test_transfer_stage_scores_every_run_on_the_other_dataset(trained, monkeypatch):
    root, sizes = trained
    monkeypatch.chdir(root)
    out = Path("data/eval/transfer/synthetic")
    cmd = [sys.executable, "-m", "pipeline.transfer", "--dataset", "synthetic", "--runs-dir", "data/runs/synthetic",
           "--processed-dir", "data/processed/synthetic", "--raw-root", "data/raw", "--out-dir", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "transfer synthetic -> clinic, unet: 6 cases" in result.stdout
    for entry in ("casnet", "unet"):
        per_case = pd.read_csv(out / "clinic" / entry / "per_case.csv")
        assert set(per_case["run"]) == {"fold0_seed0", "fold1_seed0", "ensemble"}
        assert sorted(set(per_case["case_id"])) == sorted(sizes)  # all cases, by the target's case ids
        assert set(per_case["roi"]) == {"fov"} and set(per_case["postprocess"]) == {"raw"}
        dice = per_case.query("metric == 'dice'")["value"]
        assert dice.between(0, 1).all() and len(dice) == 3 * len(sizes)
    stats = pd.read_csv(out / "clinic" / "stats.csv")
    assert list(stats.query("metric == 'dice'")["model"]) == ["unet"]
    assert (stats.query("metric == 'dice'")["n_cases"] == len(sizes)).all()
    markdown, frame = generalisation_table(load_results(Path("data/eval/transfer")), ["casnet", "unet"])
    assert "`synthetic` → `clinic` (FOV)" in markdown and "| `unet` |" in markdown
    assert set(frame["model"]) == {"casnet", "unet"} and (frame["cases"] == len(sizes)).all()
    ens = pd.read_csv(out / "clinic" / "unet" / "per_case.csv").query(
        "run == 'ensemble' and metric == 'dice'"
    )
    row = frame[frame["model"] == "unet"].iloc[0]
    assert row["ensemble_dice"] == pytest.approx(ens["value"].mean())


def test_transfer_targets_are_checked(tmp_path):
    raw = _params(tmp_path)
    raw["eval"]["transfer"] = {"kvasir_seg": ["clinic"]}
    with pytest.raises(
        ConfigError,
        match=r"eval.transfer.kvasir_seg = \['clinic'\]; expected a key that is one of `datasets`",
    ):
        params_from_dict(raw)
    raw = _params(tmp_path)
    raw["eval"]["transfer"] = {"synthetic": ["synthetic"]}
    with pytest.raises(ConfigError, match=r"expected targets other than 'synthetic'"):
        params_from_dict(raw)
    raw = _params(tmp_path)
    raw["data"]["custom"]["clinic"]["class_names"] = ["background", "a", "b"]
    params = params_from_dict(raw)
    from medfusion.transfer import TransferError, check_target

    with pytest.raises(TransferError, match=r"target 'clinic' has classes \['background', 'a', 'b'\]"):
        check_target("clinic", params.spec("clinic"), params.spec("synthetic"))
