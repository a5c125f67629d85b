import hashlib
import zipfile

import numpy as np
import pytest
from conftest import SHARED_DATASETS, tiny_raw_params

from medfusion.config import params_from_dict
from medfusion.data.dataset import SegDataset
from medfusion.data.fetch import FetchError, fetch_dataset, safe_extract_zip
from medfusion.data.io import DataError, read_json, read_metaimage, read_nifti, write_nifti
from medfusion.data.preprocess import preprocess_dataset

SYNTH = params_from_dict(tiny_raw_params()).data.synthetic


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["synthetic", "synthetic_volumes"])
def test_synthetic_is_deterministic_and_atomic(tmp_path, name):
    fetch_dataset(name, tmp_path / "a", None, SYNTH)
    fetch_dataset(name, tmp_path / "b", None, SYNTH)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert not list(tmp_path.glob(".*partial"))  # nothing half-finished left behind


def test_synthetic_preprocess_shapes_and_classes(tmp_path):
    fetch_dataset("synthetic_volumes", tmp_path / "raw", None, SYNTH)
    meta = preprocess_dataset("synthetic_volumes", tmp_path / "raw", tmp_path / "proc", 32)
    images, masks = np.load(tmp_path / "proc" / "images.npy"), np.load(tmp_path / "proc" / "masks.npy")
    assert images.shape == (6 * 8, 1, 32, 32) and images.dtype == np.uint8
    assert masks.shape == (6 * 8, 32, 32) and set(np.unique(masks)) == {0, 1, 2}
    assert meta["num_cases"] == 6 and meta["class_names"] == ["background", "organ", "lesion"]
    cases = read_json(tmp_path / "proc" / "cases.json")
    assert [c["slice"] for c in cases[:8]] == list(range(8)) and cases[0]["group"] == cases[0]["case_id"]


def test_dataset_items_are_zscored(synthetic_processed):
    processed, split = synthetic_processed
    ds = SegDataset(processed, split["test"])
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].dtype.is_floating_point is False
    assert abs(float(item["image"].mean())) < 1e-4 and abs(float(item["image"].std()) - 1) < 1e-2
    with pytest.raises(KeyError, match="case ids not in the processed data"):
        SegDataset(processed, ["nope"])


def test_registration_only_dataset_says_what_to_do(tmp_path):
    with pytest.raises(FetchError) as err:
        fetch_dataset("promise12", tmp_path / "raw", None, SYNTH)
    message = str(err.value)
    assert "promise12" in message and "promise12.grand-challenge.org" in message
    assert "data.sources.promise12" in message and "--source" in message
    assert not (tmp_path / "raw").exists()


def test_download_failure_names_url_and_option(tmp_path, monkeypatch):
    import medfusion.data.fetch as fetch

    def offline(url, dest, retries=3, timeout=60.0):
        raise FetchError("network is unreachable")

    monkeypatch.setattr(fetch, "download", offline)
    with pytest.raises(FetchError) as err:
        fetch_dataset("kvasir_seg", tmp_path / "raw", None, SYNTH)
    message = str(err.value)
    assert "https://datasets.simula.no/downloads/kvasir-seg.zip" in message
    assert "data.sources.kvasir_seg" in message and "medfusion fetch kvasir_seg --source" in message


def test_local_copy_that_is_not_the_release_is_refused(tmp_path):
    src = tmp_path / "kvasir"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(src / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(src / "masks" / "a.jpg")
    with pytest.raises(FetchError, match="do not match the official release"):
        fetch_dataset("kvasir_seg", tmp_path / "raw", src, SYNTH)
    (src / "masks" / "a.jpg").unlink()
    with pytest.raises(FetchError, match="no mask masks/a.jpg"):
        fetch_dataset("kvasir_seg", tmp_path / "raw", src, SYNTH)


@pytest.mark.skipif(
    not (SHARED_DATASETS / "chase_db1").is_dir(), reason="../shared/datasets/chase_db1 not present"
)
def test_real_chase_db1_copy_verifies_and_preprocesses(tmp_path):
    record = fetch_dataset("chase_db1", tmp_path / "raw", SHARED_DATASETS / "chase_db1", SYNTH)
    assert record["files"] == 84
    meta = preprocess_dataset("chase_db1", tmp_path / "raw", tmp_path / "proc", 64)
    assert meta["num_cases"] == 28
    groups = {c["group"] for c in read_json(tmp_path / "proc" / "cases.json")}
    assert groups == {f"{k:02d}" for k in range(1, 15)}  # 14 children


def test_zip_slip_and_symlinks_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(FetchError, match="escapes the target folder"):
        safe_extract_zip(evil, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FetchError, match="is a symlink"):
        safe_extract_zip(link, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


def test_nifti_and_metaimage_readers(tmp_path):
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (D, H, W)
    write_nifti(tmp_path / "v.nii", vol, (2.5, 0.7, 0.8))
    back, spacing = read_nifti(tmp_path / "v.nii")
    assert np.array_equal(back, vol) and spacing == pytest.approx((2.5, 0.7, 0.8))
    vol.astype(np.int16).tofile(tmp_path / "c.raw")
    (tmp_path / "c.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_SHORT\n"
        "ElementSpacing = 0.8 0.7 2.5\nElementDataFile = c.raw\n"
    )
    back, spacing = read_metaimage(tmp_path / "c.mhd")
    assert np.array_equal(back, vol) and spacing == pytest.approx((2.5, 0.7, 0.8))
    (tmp_path / "c.mhd").write_text("DimSize = 5 3 2\nElementType = MET_SHORT\nElementDataFile = c.raw\n")
    with pytest.raises(
        DataError, match=r"c.raw: 48 bytes; header c.mhd says 60 \(DimSize \[5, 3, 2\], MET_SHORT\)"
    ):
        read_metaimage(tmp_path / "c.mhd")
