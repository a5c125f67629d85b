"""Pairing images and masks by file stem, on real Kvasir-SEG pairs with one fault planted at a time:
duplicate stems are refused before anything is copied (they crashed the fetch, or paired silently),
a mask without an image is named (and refused when many are: a naming mismatch), and stems written
in another Unicode normal form (macOS' NFD) still pair."""

from __future__ import annotations

import dataclasses
import shutil
import unicodedata
from pathlib import Path

import pytest
from conftest import SHARED_DATASETS, tiny_raw_params

from medfusion.config import params_from_dict
from medfusion.data.fetch import FetchError, custom_pairs, fetch_dataset

KVASIR = SHARED_DATASETS / "kvasir_seg"
PARAMS = params_from_dict(tiny_raw_params())
CUSTOM = dataclasses.asdict(PARAMS.data.custom)

pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} not present (real-data test)")


def _copy(root: Path, n: int = 30) -> list[str]:
    """root/images + root/masks with the first `n` real pairs; -> their file names."""
    names = sorted(p.name for p in (KVASIR / "images").iterdir())[:n]
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(KVASIR / sub / name, root / sub / name)
    return names


def test_a_duplicate_image_stem_is_refused_before_anything_is_copied(tmp_path):
    src = tmp_path / "src"
    names = _copy(src)
    stem = Path(names[9]).stem
    shutil.copy(src / "images" / names[9], src / "images" / f"{stem}.png")  # img10.jpg + img10.png
    out = tmp_path / "raw" / "custom"
    with pytest.raises(FetchError) as refused:
        fetch_dataset("custom", out, src, PARAMS.data.synthetic, CUSTOM)
    assert f"{stem}.jpg and {stem}.png" in str(refused.value) and "one file per case" in str(refused.value)
    assert not out.exists() and not any(p.name.startswith(".custom") for p in out.parent.glob("*"))


def test_two_masks_with_one_stem_are_refused(tmp_path):
    names = _copy(tmp_path)
    stem = Path(names[3]).stem
    shutil.copy(tmp_path / "masks" / names[3], tmp_path / "masks" / f"{stem}.png")
    with pytest.raises(
        FetchError, match=rf"1 stem\(s\) name more than one of the masks \({stem}\.jpg and {stem}\.png\)"
    ):
        custom_pairs(tmp_path, "image")


def test_masks_without_an_image_are_named_and_many_are_refused(tmp_path, capsys):
    names = _copy(tmp_path, 31)
    (tmp_path / "images" / names[30]).unlink()  # one orphan mask of 31: said, and left out
    assert len(custom_pairs(tmp_path, "image")) == 30
    said = capsys.readouterr().err
    assert "1 of 31 masks" in said and names[30] in said and "not used" in said
    for name in names[25:30]:  # 6 of 31 (19%): a naming mismatch
        (tmp_path / "images" / name).unlink()
    with pytest.raises(FetchError, match=r"6 of 31 masks .* more than 10% unpaired"):
        custom_pairs(tmp_path, "image")


def test_stems_pair_across_unicode_normal_forms(tmp_path):
    names = _copy(tmp_path, 3)
    nfc, nfd = unicodedata.normalize("NFC", "pólipo7"), unicodedata.normalize("NFD", "pólipo7")
    assert nfc != nfd
    (tmp_path / "images" / names[0]).rename(tmp_path / "images" / f"{nfc}.jpg")
    (tmp_path / "masks" / names[0]).rename(tmp_path / "masks" / f"{nfd}.jpg")  # as macOS writes it
    pairs = custom_pairs(tmp_path, "image")
    assert (
        len(pairs) == 3 and (tmp_path / "images" / f"{nfc}.jpg", tmp_path / "masks" / f"{nfd}.jpg") in pairs
    )
