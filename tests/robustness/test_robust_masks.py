"""Masks that read as nothing: 30 real Kvasir-SEG pairs whose masks were saved as JPEG holding 0/1
(a common export) become empty under the > 127 binarisation of JPEG masks. Preprocessing and
`medfusion evaluate` refuse such a dataset, naming the likely cause and the setting of the command
that fixes it (`data.custom.mask_threshold`, `--mask-threshold`), instead of training and scoring
Dice 0. The rule (`preprocess.empty_masks_error`): more than 90% of the cases empty."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATASETS, tiny_raw_params
from PIL import Image

from medfusion.config import params_from_dict
from medfusion.data.io import DataError
from medfusion.data.preprocess import empty_masks_error, label_2d, preprocess_dataset

KVASIR = SHARED_DATASETS / "kvasir_seg"
CUSTOM = dataclasses.asdict(params_from_dict(tiny_raw_params()).data.custom)
N = 30

pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} not present (real-data test)")


def _zero_one_jpeg_masks(root: Path, n: int = N) -> Path:
    """root/images (the real JPEGs) + root/masks (their masks as 0/1 JPEGs)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for image in sorted((KVASIR / "images").iterdir())[:n]:
        shutil.copy(image, root / "images" / image.name)
        mask = np.asarray(Image.open(KVASIR / "masks" / image.name).convert("L")) > 127
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / image.name, quality=90)
    return root


def test_zero_one_jpeg_masks_are_refused_with_the_threshold_that_reads_them(tmp_path):
    raw = _zero_one_jpeg_masks(tmp_path / "raw")
    with pytest.raises(DataError) as refused:
        preprocess_dataset("custom", raw, tmp_path / "processed", 32, CUSTOM)
    said = str(refused.value)
    assert "20 of 20 cases have an empty mask" in said  # stopped at the 20th case, not after all
    assert "JPEG masks binarised at > 127" in said and "data.custom.mask_threshold 0" in said
    assert not (tmp_path / "processed").exists()
    meta = preprocess_dataset("custom", raw, tmp_path / "processed", 32, {**CUSTOM, "mask_threshold": 0})
    assert meta["empty_cases"] == 0 and meta["num_cases"] == N
    truth = np.asarray(Image.open(KVASIR / "masks" / sorted((raw / "masks").iterdir())[0].name).convert("L"))
    read = label_2d(sorted((raw / "masks").iterdir())[0], 2, 0)[0]
    assert (read == (truth > 127)).mean() > 0.98  # the JPEG's 0/1 read back as the mask


def test_the_rule_allows_negative_cases_up_to_ninety_percent():
    assert empty_masks_error(27, 30, Path("m.png"), None) is None  # 90%: allowed
    refused = empty_masks_error(28, 30, Path("m.png"), None)
    assert refused is not None and "28 of 30" in str(refused) and "read as class indices" in str(refused)
    assert "--mask-threshold 0" in str(empty_masks_error(3, 3, Path("m.jpg"), 127, "--mask-threshold"))


def test_evaluate_refuses_before_predicting_and_names_its_own_option(tmp_path, monkeypatch):
    """`medfusion evaluate` on the 0/1 JPEG folder: refused by the mask check, which runs before any
    prediction; a grey-mask refusal names `--mask-threshold`, the command's option, not the params key."""
    from medfusion import folder_eval
    from medfusion.folder_eval import FolderCase, check_masks

    raw = _zero_one_jpeg_masks(tmp_path / "raw", n=5)
    cases = [FolderCase(p, raw / "masks" / p.name) for p in sorted((raw / "images").iterdir())]

    class Binary:  # what check_masks reads of an ensemble: its input kind and classes
        num_classes, dataset = 2, "custom"
        preprocessing = type("P", (), {"kind": "image"})()

    with pytest.raises(DataError, match=r"5 of 5 cases have an empty mask.*--mask-threshold 0"):
        check_masks(Binary(), cases)
    check_masks(Binary(), cases, mask_threshold=0)  # read with the threshold: no refusal
    grey = np.asarray(Image.open(cases[0].mask)).copy()
    grey[:4, :4] = [[0, 40, 90, 200]] * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(DataError, match=r"grey values from a lossy export\? --mask-threshold \(e\.g\. 127\)"):
        folder_eval._read_target(FolderCase(cases[0].image, tmp_path / "grey.png"), Binary(), None)
