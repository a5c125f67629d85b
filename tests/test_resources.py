"""Settings that cannot change a result retrain nothing (config.RESOURCE_KEYS): they are in no run's
hash and in no train stage's params, and they really do not change the numbers. Every other `train`
key is in both. (That a changed resource leaves `dvc status` without a train stage and a forced
stage skips every finished run is checked on the quickstart's repository, tests/test_pipeline_e2e.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import REPO, fp32, replace

from medfusion.config import RESOURCE_KEYS, ExecutorParams, TrainParams
from medfusion.data.io import read_history
from medfusion.entries import Recipe, Resources, hashed_train_keys, resolve_entry
from medfusion.training.cv import run_hash
from medfusion.training.fold import run_fold


def _stage_params(stage: str) -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]


@pytest.mark.parametrize("stage", ["train", "train_casnet"])
def test_train_stages_list_exactly_the_hashed_train_keys(stage):
    listed = _stage_params(stage)
    assert sorted(k for k in listed if k.startswith("train")) == sorted(hashed_train_keys())
    assert not [k for k in listed if any(k == r or k.startswith(r + ".") for r in RESOURCE_KEYS)]
    assert {"augment", "loss", "drgo", "cv.n_folds", "cv.seeds", "data.image_size"} <= set(listed)


def test_every_train_key_is_either_hashed_or_a_resource():
    """A new key in `train` must be classified: it changes results (Recipe) or it does not."""
    keys = {f"train.{f.name}" for f in dataclasses.fields(TrainParams)}
    resources = {k for k in RESOURCE_KEYS if k.startswith("train.")}
    assert keys == set(hashed_train_keys()) | resources and not set(hashed_train_keys()) & resources
    assert {f.name for f in dataclasses.fields(Recipe)} | {"augment", "num_workers"} == {
        f.name for f in dataclasses.fields(TrainParams)
    }


def test_resources_are_in_no_runs_hash_and_every_recipe_key_is(tiny_params, synthetic_processed):
    processed, split = synthetic_processed

    def digest(params):
        return run_hash(resolve_entry(params, "synthetic", "unet"), processed, split, 0, 0)

    reference = digest(tiny_params)
    for section, changes in (
        ("eval", {"batch_size": 2}),
        ("train", {"num_workers": 3}),
    ):
        assert digest(replace(tiny_params, section, **changes)) == reference, (section, changes)
    assert digest(dataclasses.replace(tiny_params, executor=ExecutorParams(processes=4))) == reference
    for key, value in {
        "lr": 1e-2, "compile": "regions", "cpu_bf16": True, "channels_last": False, "batch_size": 2,
        "epochs": 3, "patience": 1, "optimizer": "adamw", "scheduler": "constant", "weight_decay": 0.1,
        "device": "cpu", "augment": False,
    }.items():  # fmt: skip
        assert digest(replace(tiny_params, "train", **{key: value})) != reference, key


def test_loader_workers_and_the_evaluation_batch_change_no_number(tiny_params, synthetic_processed, tmp_path):
    """Validation losses and Dice are means over samples and augmentation is a function of (seed, epoch,
    sample): a run with 1 loader worker and validation batches of 2 equals one with none and batches of 8."""
    processed, split = synthetic_processed
    entry = resolve_entry(replace(tiny_params, "train", epochs=2), "synthetic", "unet")
    runs = {}
    for name, resources in (("a", Resources(num_workers=0, eval_batch_size=8)), ("b", Resources(1, 2))):
        run_fold(entry, processed, split, 0, 0, tmp_path / name, lambda m, s: None, resources, fp32())
        runs[name] = (
            [
                {k: v for k, v in r.items() if k != "seconds"}
                for r in read_history(tmp_path / name / "history.json")
            ],
            torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"],
        )
    (history_a, weights_a), (history_b, weights_b) = runs["a"], runs["b"]
    for row_a, row_b in zip(history_a, history_b, strict=True):
        assert row_a["train_loss"] == row_b["train_loss"]  # the same batches, the same steps
        assert row_a["val_loss"] == pytest.approx(row_b["val_loss"], rel=1e-6, abs=1e-7)
        assert row_a["val_dice"] == pytest.approx(row_b["val_dice"], rel=1e-6, abs=1e-7)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
