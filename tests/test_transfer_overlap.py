"""eval.transfer refuses a target that holds training cases, before any model is loaded: byte-identical
image files (sha256) for a custom target, the registry's source collection for lits17 -> msd_liver
(the Decathlon's liver_N is LiTS volume-N); a target without shared cases is still scored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, tiny_raw_params
from PIL import Image

from medfusion.config import params_from_dict
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import write_nifti
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.registry import DATASETS
from medfusion.models import build_model

SYNTH = params_from_dict(tiny_raw_params()).data.synthetic


def _params(root: Path, datasets: list[str], transfer: dict, **sources) -> Path:
    """root/params.yaml: tiny settings, one `unet` entry, data.custom.clinic (RGB, 2 classes)."""
    raw = tiny_raw_params()
    raw["datasets"] = datasets
    raw["models"] = {"casnet": [], "baselines": ["unet"]}
    raw["data"]["custom"] = {"clinic": {**raw["data"]["custom"], "title": "Clinic"}}
    raw["data"]["sources"].update(clinic=str(root / "clinic_src"), **{k: str(v) for k, v in sources.items()})
    raw["eval"]["transfer"] = transfer
    params_from_dict(raw)  # valid as written
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def stage(monkeypatch):
    """pipeline/transfer.py, imported from the repository (the stage's module)."""
    monkeypatch.syspath_prepend(str(REPO))
    import pipeline.transfer

    return pipeline.transfer


def _run(stage, root: Path, dataset: str, params_file: Path) -> None:
    """The stage transfer@<dataset> in this process, as dvc.yaml runs it."""
    stage.main(
        dataset=dataset, runs_dir=root / "data" / "runs" / dataset,
        processed_dir=root / "data" / "processed" / dataset, raw_root=root / "data" / "raw",
        out_dir=root / "data" / "eval" / "transfer" / dataset, params_file=params_file,
    )  # fmt: skip


@pytest.fixture
def no_models(stage, monkeypatch):
    """The stage, failing the test where a model would be loaded: the refusal comes first."""

    def loaded(runs_dir, *args, **kwargs):
        raise AssertionError(f"{runs_dir}: models loaded for a target that shares training cases")

    monkeypatch.setattr(stage, "transfer_entry", loaded)
    return stage


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """tmp_path/data/raw/synthetic: 24 generated RGB images and masks."""
    fetch_dataset("synthetic", tmp_path / "data" / "raw" / "synthetic", None, SYNTH)
    return tmp_path / "data" / "raw" / "synthetic"


def _clinic(dest: Path, copied: list[Path], new: int) -> None:
    """A custom 2-D dataset: `copied` training images byte for byte as c<kk> (their masks as c<kk>.png),
    then `new` images of its own (n<k>.png), each with a mask."""
    for d in ("images", "masks"):
        (dest / d).mkdir(parents=True)
    for k, image in enumerate(copied):
        shutil.copyfile(image, dest / "images" / f"c{k:02d}{image.suffix}")
        shutil.copyfile(image.parent.parent / "masks" / f"{image.stem}.png", dest / "masks" / f"c{k:02d}.png")
    rng = np.random.default_rng(7)
    for k in range(new):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(dest / "images" / f"n{k}.png")
        mask = np.zeros((40, 48), np.uint8)
        mask[10:20, 12:30] = 255
        Image.fromarray(mask).save(dest / "masks" / f"n{k}.png")


def test_custom_target_with_training_images_is_refused_naming_them(tmp_path, synthetic, no_models):
    images = sorted((synthetic / "images").iterdir())
    _clinic(tmp_path / "clinic_src", images[:12], new=2)
    params = _params(tmp_path, ["synthetic"], {"synthetic": ["clinic"]})
    with pytest.raises(SystemExit) as err:
        _run(no_models, tmp_path, "synthetic", params)
    message = str(err.value)
    assert "target 'clinic' shares 12 case(s) with the training data" in message
    assert "byte-identical image files, sha256" in message and "(first 10 of 12)" in message
    for k in range(10):
        assert f"c{k:02d} = synthetic's {images[k].stem}" in message
    assert "c10 =" not in message and "n0" not in message
    assert "remove 'clinic' from eval.transfer.synthetic" in message and "data.sources.clinic" in message
    assert not (tmp_path / "data" / "eval").exists()


def _lits(dest: Path, numbers: list[int], seed: int) -> None:
    """LiTS's layout: volume-N.nii + segmentation-N.nii."""
    dest.mkdir(parents=True)
    for n in numbers:
        rng = np.random.default_rng(seed + n)
        image = rng.normal(0, 100, (4, 16, 16)).astype(np.float32)
        write_nifti(dest / f"volume-{n}.nii", image, (2.0, 1.0, 1.0))
        label = np.zeros((4, 16, 16), np.float32)
        label[1:3, 4:10, 4:10] = 1
        write_nifti(dest / f"segmentation-{n}.nii", label, (2.0, 1.0, 1.0))


def _msd_liver(dest: Path, names: list[str], seed: int) -> None:
    """The Decathlon's layout: Task03_Liver/imagesTr/<name>.nii.gz + labelsTr/<name>.nii.gz."""
    for d in ("imagesTr", "labelsTr"):
        (dest / "Task03_Liver" / d).mkdir(parents=True)
    for k, name in enumerate(names):
        rng = np.random.default_rng(seed + k)
        image = rng.normal(0, 100, (4, 16, 16)).astype(np.float32)  # other bytes than the LiTS copies
        write_nifti(dest / "Task03_Liver" / "imagesTr" / f"{name}.nii.gz", image, (2.0, 1.0, 1.0))
        label = np.zeros((4, 16, 16), np.float32)
        label[1:3, 5:11, 5:11] = 2
        write_nifti(dest / "Task03_Liver" / "labelsTr" / f"{name}.nii.gz", label, (2.0, 1.0, 1.0))


def test_lits17_to_msd_liver_is_refused_by_source_identity(tmp_path, no_models):
    _lits(tmp_path / "lits_src", [0, 1, 2, 7], seed=0)
    fetch_dataset("lits17", tmp_path / "data" / "raw" / "lits17", tmp_path / "lits_src", SYNTH)
    _msd_liver(tmp_path / "msd_src", ["liver_1", "liver_2", "liver_5"], seed=100)  # not fetched: data.sources
    params = _params(tmp_path, ["lits17"], {"lits17": ["msd_liver"]}, msd_liver=tmp_path / "msd_src")
    with pytest.raises(SystemExit) as err:
        _run(no_models, tmp_path, "lits17", params)
    message = str(err.value)
    assert "target 'msd_liver' shares 2 case(s)" in message and "both are LiTS: the same cases" in message
    assert "liver_1 = lits17's volume-1, liver_2 = lits17's volume-2." in message
    assert "remove 'msd_liver' from eval.transfer.lits17" in message
    assert not (tmp_path / "data" / "eval").exists()


def test_same_collection_ids_that_do_not_map_refuse_the_whole_target(tmp_path):
    from medfusion.transfer import TransferError, check_overlap

    _lits(tmp_path / "lits17", [0, 1], seed=0)
    _msd_liver(tmp_path / "msd_liver", ["liver_5", "liver_x"], seed=100)
    lits, msd = DATASETS["lits17"], DATASETS["msd_liver"]
    with pytest.raises(
        TransferError, match=r"both drawn from LiTS, and msd_liver's case 'liver_x' is not named as expected"
    ):
        check_overlap("msd_liver", msd, tmp_path / "msd_liver", lits, tmp_path / "lits17")
    shutil.rmtree(tmp_path / "msd_liver")
    _msd_liver(tmp_path / "msd_liver", ["liver_5", "liver_6"], seed=100)  # other LiTS volumes than these
    check_overlap("msd_liver", msd, tmp_path / "msd_liver", lits, tmp_path / "lits17")


def test_volumes_of_equal_size_are_compared_by_content(tmp_path):
    """Uncompressed NIfTI of one shape: every file has the same size, so all are hashed; only the
    byte-identical copy is a shared case."""
    from medfusion.data.registry import custom_spec
    from medfusion.transfer import TransferError, check_overlap

    _lits(tmp_path / "train", [0, 1, 2], seed=0)  # synthetic_volumes reads LiTS's layout
    target = tmp_path / "target"
    for d in ("images", "masks"):
        (target / d).mkdir(parents=True)
    _lits(tmp_path / "other", [0, 1], seed=50)
    for n in (0, 1):
        shutil.copyfile(tmp_path / "other" / f"volume-{n}.nii", target / "images" / f"ct{n}.nii")
        shutil.copyfile(tmp_path / "other" / f"segmentation-{n}.nii", target / "masks" / f"ct{n}.nii")
    spec = custom_spec(
        {"kind": "volume", "modality": "ct", "class_names": ["background", "organ", "lesion"]}, "ct"
    )
    trained = DATASETS["synthetic_volumes"]
    files = [*(tmp_path / "train").iterdir(), *target.rglob("*.nii")]
    assert len({f.stat().st_size for f in files}) == 1
    # same sizes, other bytes; the masks are byte-identical to the training labels: labels are not compared
    check_overlap("ct", spec, target, trained, tmp_path / "train")
    shutil.copyfile(tmp_path / "train" / "volume-2.nii", target / "images" / "ct1.nii")
    with pytest.raises(
        TransferError, match=r"target 'ct' shares 1 case\(s\) .*: ct1 = synthetic_volumes's volume-2\. "
    ):
        check_overlap("ct", spec, target, trained, tmp_path / "train")


def test_target_without_shared_files_is_scored(tmp_path, synthetic, stage, capsys):
    data = tmp_path / "data"
    preprocess_dataset("synthetic", synthetic, data / "processed" / "synthetic", 32)
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4)
    checkpoint = data / "runs" / "synthetic" / "unet" / "fold0_seed0" / "model.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(
        {"model": "unet", "architecture": "unet", "kwargs": {"base_channels": 4}, "in_channels": 3,
         "num_classes": 2, "image_size": 32, "dataset": "synthetic", "fold": 0, "seed": 0, "epoch": 0,
         "state_dict": model.state_dict()},
        checkpoint,
    )  # fmt: skip
    _clinic(tmp_path / "clinic_src", [], new=3)
    params = _params(tmp_path, ["synthetic"], {"synthetic": ["clinic"]})
    _run(stage, tmp_path, "synthetic", params)
    assert "transfer synthetic -> clinic, unet: 3 cases" in capsys.readouterr().out
    per_case = pd.read_csv(data / "eval" / "transfer" / "synthetic" / "clinic" / "unet" / "per_case.csv")
    assert sorted(set(per_case["case_id"])) == ["n0", "n1", "n2"]
