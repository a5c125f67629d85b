"""Shared fixtures: tiny params, a processed synthetic dataset, telemetry off."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

os.environ.update(
    {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1"}
)

from medfusion.config import Params, params_from_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_raw_params() -> dict:
    raw = raw_params()
    raw["datasets"] = ["synthetic"]
    raw["data"]["image_size"] = 32
    raw["data"]["synthetic"].update(num_images=24, num_volumes=6, slices_per_volume=8)
    raw["unet"]["base_channels"] = 4
    raw["train"].update(epochs=2, batch_size=4, lr=3e-3, num_workers=0, patience=5, compile="off")
    raw["cv"].update(n_folds=2, seeds=[0])
    raw["eval"]["batch_size"] = 8
    return raw


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_raw_params())


def replace(params: Params, section: str, **changes) -> Params:
    return dataclasses.replace(params, **{section: dataclasses.replace(getattr(params, section), **changes)})


@pytest.fixture(scope="session")
def synthetic_processed(tmp_path_factory) -> tuple[Path, dict]:
    """data/processed/synthetic at 32x32 from 24 generated images, and its split (2 folds)."""
    from medfusion.data.fetch import fetch_dataset
    from medfusion.data.io import read_json
    from medfusion.data.preprocess import preprocess_dataset
    from medfusion.data.splits import make_split

    params = params_from_dict(tiny_raw_params())
    root = tmp_path_factory.mktemp("synthetic")
    fetch_dataset("synthetic", root / "raw", None, params.data.synthetic)
    preprocess_dataset("synthetic", root / "raw", root / "processed", 32)
    groups = {c["case_id"]: c["group"] for c in read_json(root / "processed" / "cases.json")}
    split = make_split(groups, "fraction", 2, 0, 0.2)
    return root / "processed", split
