"""The fold ensemble as an MLflow pyfunc model (medfusion/mlflow_model.py): registered, loaded by alias,
it returns the masks `medfusion predict` writes, post-processing included; its weights stay in DVC."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_folder_eval import _predict, rgb_run  # noqa: F401  (the fixture)

from medfusion.mlflow_model import log_ensemble_model, model_config


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "medfusion/synthetic", artifact_location=(tmp_path / "art").as_uri()
    )
    return uri, client, client.create_run(experiment, run_name="unet").info.run_id


def test_the_registered_ensemble_predicts_what_medfusion_predict_writes(rgb_run, store, tmp_path):  # noqa: F811
    import mlflow

    uri, client, parent = store
    eval_dir = tmp_path / "data" / "eval" / "synthetic" / "unet"
    eval_dir.mkdir(parents=True)
    record = {
        "min_size": 30,
        "fill_holes": True,
        "thresholds": None,
        "val_dice_before": 0.5,
        "val_dice_after": 0.6,
    }
    (eval_dir / "eval.json").write_text(json.dumps({"postprocess": {"ensemble": record}}))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
    config = model_config(rgb_run, eval_dir / "eval.json", tmp_path)
    assert config["run_dir"] == "data/runs/synthetic/unet" and len(config["checkpoints"]) == 2
    log_ensemble_model(parent, uri, config, images[:1], registered_name="medfusion_synthetic_unet")
    version = client.get_model_version_by_alias("medfusion_synthetic_unet", "newest")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # not the paper protocol: no champion
        client.get_model_version_by_alias("medfusion_synthetic_unet", "champion")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/medfusion_synthetic_unet@newest")
    masks = model.predict(images)
    assert masks.shape == (2, 40, 52) and masks.dtype == np.uint8
    src = tmp_path / "src"
    src.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(src / f"x{i}.png")
    out = _predict(rgb_run, tmp_path / "pred", str(src))
    assert "min_size=30, fill_holes=True" in out.output  # predict applied the recorded choice too
    for i in range(2):
        assert np.array_equal(masks[i], np.asarray(Image.open(tmp_path / "pred" / f"x{i}_mask.png")))
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1, -1)  # any size
    stored = {a.path for a in client.list_artifacts(version.run_id, "model")} if version.run_id else set()
    assert not any(p.endswith(".pt") for p in stored)  # the weights stay where DVC keeps them


def test_weights_that_changed_since_logging_are_refused(rgb_run, tmp_path):  # noqa: F811
    from medfusion.mlflow_model import find_run_dir

    config = model_config(rgb_run, None, tmp_path)
    assert find_run_dir(config) == rgb_run.resolve()
    (rgb_run / "fold1_seed0" / "model.pt").write_bytes(b"other weights")
    with pytest.raises(FileNotFoundError, match="dvc pull data/runs/synthetic/unet"):
        find_run_dir(config)
