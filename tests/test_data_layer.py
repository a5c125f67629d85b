"""The data layer end to end: real copies in ../shared/datasets, generated files for every failure mode."""

import dataclasses
import hashlib
import io
import re
import tarfile

import numpy as np
import pytest
from conftest import SHARED_DATASETS, range_server, tiny_raw_params
from PIL import Image

from medfusion.config import ConfigError, params_from_dict
from medfusion.data.dataset import SegDataset
from medfusion.data.fetch import (
    FINGERPRINTS,
    FetchError,
    download,
    fetch_dataset,
    safe_extract_tar,
    verify_checksum,
)
from medfusion.data.io import DataError, read_json, write_nifti
from medfusion.data.preprocess import PreprocessSettings, preprocess_dataset, rebuild_volume
from medfusion.data.registry import DATASETS
from medfusion.data.splits import make_split
from medfusion.entries import resolve_entry

PARAMS = params_from_dict(tiny_raw_params())
SYNTH = PARAMS.data.synthetic
KVASIR, CHASE = SHARED_DATASETS / "kvasir_seg", SHARED_DATASETS / "chase_db1"
LIVER = SHARED_DATASETS / "liver" / "msd_task03_liver_2d_256_flipmirror"


def custom(**changes) -> dict:
    return {**dataclasses.asdict(PARAMS.data.custom), **changes}


def split_of(proc, name, n_folds=5, seed=0, fraction=0.2):
    groups = {c["case_id"]: c["group"] for c in read_json(proc / "cases.json")}
    return groups, make_split(
        groups, DATASETS[name].test_rule if name in DATASETS else "fraction", n_folds, seed, fraction
    )


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} not present (real-data test)")
def test_real_kvasir_fetch_verify_preprocess_split(tmp_path):
    record = fetch_dataset("kvasir_seg", tmp_path / "raw", KVASIR, SYNTH)
    assert record["files"] == 2000 and record["fingerprint"] == FINGERPRINTS["kvasir_seg"]
    assert record["cases"] == 1000
    meta = preprocess_dataset("kvasir_seg", tmp_path / "raw", tmp_path / "proc", 32, workers=2)
    assert meta["num_cases"] == meta["num_samples"] == 1000 and meta["in_channels"] == 3
    masks = np.load(tmp_path / "proc" / "masks.npy", mmap_mode="r")
    assert masks.shape == (1000, 32, 32) and set(np.unique(masks)) == {0, 1}
    groups, split = split_of(tmp_path / "proc", "kvasir_seg")
    assert len(split["test"]) == 200 and sum(len(f["val"]) for f in split["folds"]) == 800
    assert {len(f["val"]) for f in split["folds"]} == {160}


@pytest.mark.skipif(not CHASE.is_dir(), reason=f"{CHASE} not present (real-data test)")
def test_real_chase_db1_keeps_each_childs_eyes_together(tmp_path):
    fetch_dataset("chase_db1", tmp_path / "raw", CHASE, SYNTH)
    meta = preprocess_dataset("chase_db1", tmp_path / "raw", tmp_path / "proc", 64)
    assert meta["num_cases"] == 28 and meta["num_groups"] == 14
    assert np.load(tmp_path / "proc" / "observer2.npy").shape == (28, 64, 64)
    assert 0.5 < meta["inter_observer_dice"] < 0.95  # two humans agree, not perfectly
    groups, split = split_of(tmp_path / "proc", "chase_db1")
    assert split["test"] == [f"Image_{k}{eye}" for k in range(11, 15) for eye in "LR"]
    train = [c for f in split["folds"] for c in f["val"]]
    assert len(train) == 20
    for fold in split["folds"]:
        children = {groups[c] for c in fold["val"]}
        assert all(f"Image_{k}{eye}" in fold["val"] for k in children for eye in "LR")
        assert not children & {groups[c] for c in fold["train"]}


@pytest.mark.skipif(not LIVER.is_dir(), reason=f"{LIVER} not present (real-data test)")
def test_real_liver_ct_slices_load_as_single_channel_custom_data(tmp_path):
    spec = custom(kind="image", modality="gray", class_names=["background", "liver"],
                  group_pattern=r"^(?:flipped|mirrored)_(\d+)_", title="liver CT slices")  # fmt: skip
    fetch_dataset("custom", tmp_path / "raw", LIVER, SYNTH, spec)
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 256, spec, workers=2)
    assert meta["num_cases"] == 643 and meta["in_channels"] == 1 and meta["num_groups"] == 122
    assert meta["empty_samples"] == 0  # at their native 256x256 (at 64x64, 3 tiny livers vanish)
    ds = SegDataset(tmp_path / "proc", ["flipped_10001_103"])
    assert ds[0]["image"].shape == (1, 256, 256) and set(ds[0]["mask"].unique().tolist()) == {0, 1}
    groups, split = split_of(tmp_path / "proc", "custom")
    test_volumes = {groups[c] for c in split["test"]}
    assert not test_volumes & {groups[c] for f in split["folds"] for c in f["val"]}


# ---------------------------------------------------------------- volumes


def _label_volume(shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    d, h, w = shape
    for c in range(1, classes):
        z, y, x = rng.integers(1, d - 1), rng.integers(2, h - 9), rng.integers(2, w - 9)
        label[max(z - 2, 0) : z + 2, y : y + 8, x : x + 8] = c
    return label


def test_nifti_volumes_round_trip_through_slicing_and_rebuild(tmp_path):
    root = tmp_path / "lits"
    root.mkdir()
    labels = {}
    for k in range(4):
        label = _label_volume((6, 32, 32), 3, seed=k)
        image = np.random.default_rng(k).normal(50, 100, label.shape).astype(np.float32)
        write_nifti(root / f"volume-{k}.nii.gz", image, (2.5, 0.8, 0.8))
        write_nifti(root / f"segmentation-{k}.nii.gz", label.astype(np.float32), (2.5, 0.8, 0.8))
        labels[f"volume-{k}"] = label
    fetch_dataset("lits17", tmp_path / "raw", root, SYNTH)
    meta = preprocess_dataset("lits17", tmp_path / "raw", tmp_path / "proc", 32)
    masks, cases = np.load(tmp_path / "proc" / "masks.npy"), read_json(tmp_path / "proc" / "cases.json")
    for case_id, label in labels.items():
        rows = [i for i, c in enumerate(cases) if c["case_id"] == case_id]
        assert [cases[i]["slice"] for i in rows] == list(range(6))
        info = meta["cases"][case_id]
        assert info["shape"] == [6, 32, 32] and info["spacing"] == pytest.approx([2.5, 0.8, 0.8])
        assert np.array_equal(rebuild_volume(masks[rows], tuple(info["shape"])), label)
        assert np.allclose(np.asarray(info["affine"]), np.diag([0.8, 0.8, 2.5, 1.0]))


def test_metaimage_volumes_round_trip_and_n4_runs(tmp_path):
    root = tmp_path / "promise"
    root.mkdir()
    labels = {}
    for k in range(3):
        label = _label_volume((5, 32, 32), 2, seed=k)
        yy = np.linspace(0.5, 1.5, 32, dtype=np.float32)[None, :, None]  # a smooth bias field
        image = (200 + 300 * (label > 0)) * yy + np.random.default_rng(k).normal(0, 5, label.shape)
        for name, arr, etype in ((f"Case{k:02d}", image.astype(np.int16), "MET_SHORT"),
                                 (f"Case{k:02d}_segmentation", label, "MET_UCHAR")):  # fmt: skip
            arr.tofile(root / f"{name}.raw")
            (root / f"{name}.mhd").write_text(
                f"ObjectType = Image\nNDims = 3\nDimSize = 32 32 5\nElementType = {etype}\n"
                f"ElementSpacing = 0.6 0.6 3.6\nElementDataFile = {name}.raw\n"
            )
        labels[f"Case{k:02d}"] = label
    fetch_dataset("promise12", tmp_path / "raw", root, SYNTH)
    meta = preprocess_dataset(
        "promise12", tmp_path / "raw", tmp_path / "proc", PreprocessSettings(32, n4=True)
    )
    assert meta["intensity"]["n4"] and meta["num_cases"] == 3
    masks, cases = np.load(tmp_path / "proc" / "masks.npy"), read_json(tmp_path / "proc" / "cases.json")
    for case_id, label in labels.items():
        rows = [i for i, c in enumerate(cases) if c["case_id"] == case_id]
        assert np.array_equal(rebuild_volume(masks[rows], (5, 32, 32)), label)


def test_msd_prostate_is_two_modalities_with_the_whole_gland(tmp_path):
    task = tmp_path / "Task05_Prostate"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    for k in range(2):
        label = _label_volume((4, 32, 32), 3, seed=k)  # 1 = peripheral zone, 2 = transition zone
        rng = np.random.default_rng(k)
        image = np.stack([rng.normal(300, 50, label.shape), rng.normal(1000, 200, label.shape)]).astype(
            np.float32
        )
        write_nifti(task / "imagesTr" / f"prostate_{k:02d}.nii.gz", image, (3.0, 0.6, 0.6))
        write_nifti(task / "labelsTr" / f"prostate_{k:02d}.nii.gz", label.astype(np.float32), (3.0, 0.6, 0.6))
        (task / "imagesTr" / f"._prostate_{k:02d}.nii.gz").write_bytes(b"macOS resource fork")
    fetch_dataset("msd_prostate", tmp_path / "raw", task, SYNTH)
    meta = preprocess_dataset("msd_prostate", tmp_path / "raw", tmp_path / "proc", 32)
    images = np.load(tmp_path / "proc" / "images.npy")
    assert images.shape == (8, 2, 32, 32) and meta["modalities"] == 2
    assert set(np.unique(np.load(tmp_path / "proc" / "masks.npy"))) == {0, 1}  # PZ + TZ = gland
    assert resolve_entry(PARAMS, "msd_prostate", "casnet").model.kwargs["modalities"] == 2


# ---------------------------------------------------------------- archives and downloads


def _tar_with(path, members):
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)


def test_tar_slip_links_and_devices_are_refused(tmp_path):
    evil = tarfile.TarInfo("../escape.txt")
    evil.size = 1
    _tar_with(tmp_path / "slip.tar", [(evil, b"x")])
    with pytest.raises(FetchError, match="escapes the target folder"):
        safe_extract_tar(tmp_path / "slip.tar", tmp_path / "out")
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    good = tarfile.TarInfo("ok.txt")
    good.size = 2
    _tar_with(tmp_path / "link.tar", [(good, b"ok"), (link, None)])
    with pytest.raises(FetchError, match="is a link"):
        safe_extract_tar(tmp_path / "link.tar", tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out2" / "ok.txt").exists()
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    _tar_with(tmp_path / "dev.tar", [(dev, None)])
    with pytest.raises(FetchError, match="device or pipe"):
        safe_extract_tar(tmp_path / "dev.tar", tmp_path / "out3")


def test_archive_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path):
    info = tarfile.TarInfo("Task05_Prostate/imagesTr/prostate_00.nii.gz")
    info.size = 3
    _tar_with(tmp_path / "Task05_Prostate.tar", [(info, b"abc")])
    with pytest.raises(FetchError, match="md5 checksum .* expected 35138f08b1efaef89d7424d2bcc928db"):
        fetch_dataset("msd_prostate", tmp_path / "raw", tmp_path / "Task05_Prostate.tar", SYNTH)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task05_Prostate.tar"]


@pytest.fixture
def server():
    with range_server(np.random.default_rng(0).bytes(300_000), "data.tar") as served:
        yield served


def test_truncated_download_resumes_and_is_verified(tmp_path, server):
    url, handler = server
    md5 = "md5:" + hashlib.md5(handler.payload).hexdigest()
    handler.cut_after = 100_000  # the connection drops after 100 kB
    download(url, tmp_path / "data.tar", md5, retries=3, timeout=5)
    assert (tmp_path / "data.tar").read_bytes() == handler.payload
    assert handler.requests[0] is None and handler.requests[1] == "bytes=100000-"
    assert not (tmp_path / "data.tar.part").exists()


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, server):
    url, _ = server
    with pytest.raises(FetchError, match="md5 checksum"):
        download(url, tmp_path / "data.tar", "md5:" + "0" * 32, retries=1, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_names_url_checksum_and_local_copy(tmp_path, monkeypatch):
    import medfusion.data.fetch as fetch

    def offline(url, dest, checksum=None, retries=3, timeout=60.0):
        raise FetchError("network is unreachable")

    monkeypatch.setattr(fetch, "download", offline)
    with pytest.raises(FetchError) as err:
        fetch_dataset("msd_liver", tmp_path / "raw", None, SYNTH)
    message = str(err.value)
    assert "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task03_Liver.tar" in message
    assert (
        "md5:a90ec6c4aa7f6a3d087205e23d4e6397" in message and "medfusion fetch msd_liver --source" in message
    )
    with pytest.raises(FetchError) as err:
        fetch_dataset("chase_db1", tmp_path / "raw", None, SYNTH)
    assert "staffnet.kingston.ac.uk" in str(err.value)  # the mirror was tried too
    assert not (tmp_path / "raw").exists()


def test_verify_checksum(tmp_path):
    (tmp_path / "f").write_bytes(b"medfusion")
    verify_checksum(tmp_path / "f", "sha256:" + hashlib.sha256(b"medfusion").hexdigest())
    with pytest.raises(FetchError, match="sha256 checksum"):
        verify_checksum(tmp_path / "f", "sha256:" + "0" * 64)


# ---------------------------------------------------------------- bad input, named


def _custom_2d(root, n=4, size=(24, 32), mask_fn=None, suffix=".png"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        Image.fromarray(np.full((*size, 3), 40 * k, np.uint8)).save(root / "images" / f"p{k}_s0.png")
        mask = np.zeros(size, np.uint8)
        mask[4:12, 4:12] = 255 if k else 0  # the first mask is empty
        Image.fromarray(mask_fn(k, mask) if mask_fn else mask).save(root / "masks" / f"p{k}_s0{suffix}")
    return root


def _preprocess_custom(tmp_path, src, **changes):
    spec = custom(**changes)
    fetch_dataset("custom", tmp_path / "raw", src, SYNTH, spec)
    return preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 32, spec)


def test_empty_masks_are_allowed_and_counted(tmp_path):
    meta = _preprocess_custom(tmp_path, _custom_2d(tmp_path / "src"), group_pattern=r"^(p\d+)_")
    assert meta["empty_samples"] == 1 and meta["empty_cases"] == 1 and meta["num_groups"] == 4
    assert [c["empty"] for c in read_json(tmp_path / "proc" / "cases.json")] == [True, False, False, False]


def test_mask_of_the_wrong_size_is_named(tmp_path):
    src = _custom_2d(tmp_path / "src")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "masks" / "p2_s0.png")
    with pytest.raises(
        DataError, match=r"p2_s0.png: mask size \(10, 10\) differs from image p2_s0.png \(24, 32\)"
    ):
        _preprocess_custom(tmp_path, src)
    assert not (tmp_path / "proc").exists()


def test_missing_mask_is_named(tmp_path):
    src = _custom_2d(tmp_path / "src")
    (src / "masks" / "p3_s0.png").unlink()
    with pytest.raises(FetchError, match="p3_s0.png: no mask with stem 'p3_s0'"):
        _preprocess_custom(tmp_path, src)


def test_non_binary_masks_are_refused(tmp_path):
    def grey(k, mask):
        mask[0:4, 0:4] = 128
        return mask

    with pytest.raises(
        DataError, match=r"p0_s0.png: mask values \[0, 128\]; expected \{0, 255\} or \{0, 1\}"
    ):
        _preprocess_custom(tmp_path, _custom_2d(tmp_path / "a", mask_fn=grey))

    def photo(k, mask):  # an image saved as a JPEG "mask"
        return np.tile(np.linspace(0, 255, mask.shape[1], dtype=np.uint8), (mask.shape[0], 1))

    with pytest.raises(DataError, match="p0_s0.jpg: not a binary mask"):
        _preprocess_custom(tmp_path, _custom_2d(tmp_path / "b", mask_fn=photo, suffix=".jpg"))


def test_class_index_masks_for_multi_class_custom_data(tmp_path):
    def three(k, mask):
        mask = (mask > 0).astype(np.uint8)
        mask[14:20, 14:20] = 2
        return mask

    meta = _preprocess_custom(tmp_path, _custom_2d(tmp_path / "src", mask_fn=three),
                              class_names=["background", "organ", "lesion"])  # fmt: skip
    assert set(np.unique(np.load(tmp_path / "proc" / "masks.npy"))) == {0, 1, 2}
    assert meta["class_names"] == ["background", "organ", "lesion"]


def test_truncated_image_is_named(tmp_path):
    src = _custom_2d(tmp_path / "src")
    data = (src / "images" / "p1_s0.png").read_bytes()
    (src / "images" / "p1_s0.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="p1_s0.png: cannot read image"):
        _preprocess_custom(tmp_path, src)


def _custom_volumes(root, image_fn=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(2):
        label = _label_volume((4, 16, 16), 2, seed=k)
        image = np.random.default_rng(k).normal(0, 100, label.shape).astype(np.float32)
        write_nifti(
            root / "images" / f"c{k}.nii.gz", image_fn(k, image) if image_fn else image, (2.0, 1.0, 1.0)
        )
        write_nifti(root / "labels" / f"c{k}.nii.gz", label.astype(np.float32), (2.0, 1.0, 1.0))
    return root


def test_custom_nifti_volumes(tmp_path):
    meta = _preprocess_custom(tmp_path, _custom_volumes(tmp_path / "src"), kind="volume", modality="ct")
    assert meta["kind"] == "volume" and meta["num_cases"] == 2 and meta["num_samples"] == 8


def test_nan_voxels_are_named(tmp_path):
    def nan(k, image):
        image[1, 2, 3] = np.nan if k == 1 else image[1, 2, 3]
        return image

    src = _custom_volumes(tmp_path / "src", nan)
    with pytest.raises(DataError, match="c1.nii.gz: volume has NaN or infinite voxels"):
        _preprocess_custom(tmp_path, src, kind="volume", modality="ct")


def test_4d_volume_where_3d_is_expected_is_named(tmp_path):
    src = _custom_volumes(tmp_path / "src", lambda k, image: np.stack([image, image]))
    with pytest.raises(DataError, match=r"c0.nii.gz: expected a 3-D volume, got shape \(16, 16, 4, 2\)"):
        _preprocess_custom(tmp_path, src, kind="volume", modality="ct")


def test_label_values_beyond_the_classes_are_named(tmp_path):
    src = _custom_volumes(tmp_path / "src")
    write_nifti(src / "labels" / "c0.nii.gz", np.full((4, 16, 16), 3, np.float32), (2.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"c0.nii.gz: label values \[3\]; expected 0..1"):
        _preprocess_custom(tmp_path, src, kind="volume", modality="ct")


def test_wrong_kind_of_file_and_group_pattern_are_named(tmp_path):
    src = _custom_2d(tmp_path / "src")
    with pytest.raises(FetchError, match="p0_s0.png: not a NIfTI volume"):
        _preprocess_custom(tmp_path, src, kind="volume", modality="ct")
    with pytest.raises(
        DataError, match=re.escape("group_pattern 'x(\\\\d)' does not match the file stem 'p0_s0'")
    ):
        _preprocess_custom(tmp_path, src, group_pattern=r"x(\d)")


def test_custom_params_are_validated():
    raw = tiny_raw_params()
    raw["data"]["custom"]["modality"] = "ct"
    with pytest.raises(ConfigError, match=r"data.custom.modality = 'ct'; expected one of \['rgb', 'gray'\]"):
        params_from_dict(raw)
    raw = tiny_raw_params()
    raw["datasets"] = ["custom"]
    with pytest.raises(ConfigError, match="data.sources.custom = None; expected the folder of your data"):
        params_from_dict(raw)
    raw = tiny_raw_params()
    raw["data"]["custom"]["group_pattern"] = "(a)(b)"
    with pytest.raises(ConfigError, match="exactly one"):
        params_from_dict(raw)


def test_worker_count_does_not_change_the_output(tmp_path):
    fetch_dataset("synthetic", tmp_path / "raw", None, SYNTH)
    one = preprocess_dataset("synthetic", tmp_path / "raw", tmp_path / "a", 32, workers=1)
    two = preprocess_dataset("synthetic", tmp_path / "raw", tmp_path / "b", 32, workers=2)
    assert one["sha256"] == two["sha256"]
    assert read_json(tmp_path / "a" / "cases.json") == read_json(tmp_path / "b" / "cases.json")


@pytest.mark.skipif(not CHASE.is_dir(), reason=f"{CHASE} not present (real-data test)")
def test_real_chase_db1_second_observer_scored_against_the_first_at_999x960(tmp_path):
    """The human reference row: each test image's 2nd-observer labels against the 1st's, at the
    original 999x960, equal to the Dice counted here from the PNGs themselves."""
    import cv2

    from medfusion.evaluation import score_second_observer

    fetch_dataset("chase_db1", tmp_path / "raw", CHASE, SYNTH)
    preprocess_dataset("chase_db1", tmp_path / "raw", tmp_path / "proc", 32)
    _, split = split_of(tmp_path / "proc", "chase_db1")
    frame = score_second_observer(tmp_path / "proc", split, "original", tmp_path / "raw")
    assert set(frame["run"]) == {"second_observer"} and set(frame["resolution"]) == {"original"}
    dice = frame[frame["metric"] == "dice"].set_index("case_id")["value"]
    assert list(dice.index) == split["test"]
    for case_id in ["Image_11L", "Image_14R"]:
        a = cv2.imread(str(CHASE / f"{case_id}_1stHO.png"), cv2.IMREAD_GRAYSCALE) > 127
        b = cv2.imread(str(CHASE / f"{case_id}_2ndHO.png"), cv2.IMREAD_GRAYSCALE) > 127
        assert a.shape == (960, 999)
        assert dice[case_id] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert 0.6 < dice.mean() < 0.95
    processed = score_second_observer(tmp_path / "proc", split, "processed")
    assert set(processed["resolution"]) == {"processed"} and len(processed) == len(frame)
    kvasir_like = tmp_path / "proc" / "observer2.npy"
    kvasir_like.unlink()  # a dataset without a second observer has no human row
    assert score_second_observer(tmp_path / "proc", split, "original", tmp_path / "raw") is None
