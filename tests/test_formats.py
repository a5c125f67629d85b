"""Every common 2-D format read to the right pixels, and grey masks with data.custom.mask_threshold.

Each test writes its own files (Pillow, tifffile) and checks the pixels `read_image` /
`read_label_image` return against the array that was written.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile
from conftest import tiny_raw_params
from PIL import Image

from medfusion.config import ConfigError, params_from_dict
from medfusion.data.fetch import custom_pairs, fetch_dataset
from medfusion.data.io import DataError, read_image, read_json, read_label_image
from medfusion.data.preprocess import preprocess_dataset, read_label, read_label_2d

PARAMS = params_from_dict(tiny_raw_params())
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (20, 30), dtype=np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L (ITU-R 601-2, rounded)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".ppm", ".tif"])
def test_lossless_rgb_formats_read_exactly(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(RGB).save(path)
    assert np.array_equal(read_image(path), RGB)
    assert np.array_equal(read_image(path, gray=True), luma(RGB))


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".tif", ".gif"])
def test_lossless_grey_formats_read_exactly(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(GREY).save(path)
    assert np.array_equal(read_image(path, gray=True), GREY)
    assert np.array_equal(read_image(path), np.repeat(GREY[..., None], 3, axis=2))


def test_pbm_and_lzw_tiff(tmp_path):
    bits = GREY > 127
    Image.fromarray(bits).save(tmp_path / "b.pbm")
    assert np.array_equal(read_label_image(tmp_path / "b.pbm"), bits.astype(np.uint8) * 255)
    Image.fromarray(RGB).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    assert np.array_equal(read_image(tmp_path / "lzw.tif"), RGB)


def test_three_sample_minisblack_tiff_is_read_as_rgb(tmp_path):
    """Three 8-bit samples under photometric MinIsBlack: Pillow cannot identify it, OpenCV returns one
    channel; it is read through tifffile as the RGB it holds."""
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, RGB, photometric="minisblack", planarconfig="contig")
    with tifffile.TiffFile(path) as tif:  # the file is what the case is about
        assert (
            tif.pages[0].samplesperpixel == 3 and tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        )
    with pytest.raises(OSError):
        Image.open(path)
    assert np.array_equal(read_image(path), RGB)
    assert np.array_equal(read_image(path, gray=True), luma(RGB))


def test_sixteen_bit_tiffs_are_scaled_by_their_maximum(tmp_path):
    rgb16 = RGB.astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "c.tif", rgb16, photometric="rgb")
    expected = np.rint(rgb16 / rgb16.max() * 255).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "c.tif"), expected)
    grey16 = GREY.astype(np.uint16) * 100
    tifffile.imwrite(tmp_path / "g.tif", grey16)
    assert np.array_equal(
        read_image(tmp_path / "g.tif", gray=True), np.rint(grey16 / grey16.max() * 255).astype(np.uint8)
    )
    tifffile.imwrite(tmp_path / "m.tif", np.where(GREY > 127, 2, 0).astype(np.uint16))
    assert np.array_equal(read_label_image(tmp_path / "m.tif"), np.where(GREY > 127, 2, 0))
    tifffile.imwrite(tmp_path / "bad.tif", np.full((4, 4), 1000, np.uint16))
    with pytest.raises(DataError, match=r"bad.tif: 16-bit label values up to 1000"):
        read_label_image(tmp_path / "bad.tif")


def test_alpha_is_dropped_and_palettes_expand(tmp_path):
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), RGB)
    tifffile.imwrite(
        tmp_path / "a.tif", rgba, photometric="minisblack", planarconfig="contig", extrasamples=[0, 0, 2]
    )
    assert np.array_equal(read_image(tmp_path / "a.tif"), RGB)
    palette_img = Image.fromarray(RGB).quantize(16)
    palette_img.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(palette_img.convert("RGB")))


def test_palette_masks_keep_their_indices(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:9], labels[10:15, 10:20] = 1, 2
    for suffix in (".png", ".gif"):
        img = Image.fromarray(labels, "P")
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        img.save(tmp_path / f"m{suffix}")
        assert np.array_equal(read_label_image(tmp_path / f"m{suffix}"), labels)
        # a threshold binarises grey masks, never palette indices
        assert np.array_equal(read_label_2d(tmp_path / f"m{suffix}", 3), labels)
    # a grey GIF is a palette of greys: read as its grey levels, not the palette's indices
    grey = np.array([0, 127, 255], np.uint8)[labels]
    Image.fromarray(grey).save(tmp_path / "grey.gif")
    assert Image.open(tmp_path / "grey.gif").mode == "P"
    assert np.array_equal(read_label_image(tmp_path / "grey.gif"), grey)
    assert np.array_equal(read_label_2d(tmp_path / "grey.gif", 2, mask_threshold=100), labels > 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(RGB)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    img.save(tmp_path / "o.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "o.png"), np.rot90(RGB, k=-1))


def test_multi_frame_files_are_refused_by_name(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([GREY, GREY, GREY]), photometric="minisblack")
    with pytest.raises(DataError, match=r"stack.tif: a multi-page TIFF \(3 pages\); expected one 2-D image"):
        read_image(tmp_path / "stack.tif")
    frames = [Image.fromarray(GREY), Image.fromarray(255 - GREY)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"anim.gif: 2 frames"):
        read_image(tmp_path / "anim.gif")
    (tmp_path / "junk.ppm").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk.ppm: cannot read image"):
        read_image(tmp_path / "junk.ppm")


def test_custom_folder_accepts_every_format(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k, (image_suffix, mask_suffix) in enumerate([(".ppm", ".pgm"), (".tif", ".gif"), (".bmp", ".pbm")]):
        Image.fromarray(RGB).save(tmp_path / "images" / f"c{k}{image_suffix}")
        Image.fromarray(GREY > 127).save(tmp_path / "masks" / f"c{k}{mask_suffix}")
    pairs = custom_pairs(tmp_path, "image")
    assert [(i.suffix, m.suffix) for i, m in pairs] == [(".ppm", ".pgm"), (".tif", ".gif"), (".bmp", ".pbm")]


# ------------------------------------------------------------------ grey masks and mask_threshold


def _stray_grey(mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask as a lossy tool exports it: a few pixels at values between 8 and 30."""
    out = mask.copy()
    out[0, :6] = [8, 12, 30, 17, 9, 25]
    return out


def test_stray_grey_values_are_refused_with_the_way_out(tmp_path):
    mask = np.where(GREY > 127, 255, 0).astype(np.uint8)
    stray = _stray_grey(mask)
    Image.fromarray(stray).save(tmp_path / "m.png")
    with pytest.raises(DataError) as err:
        read_label_2d(tmp_path / "m.png", 2)
    assert "m.png: mask values [0, 8, 9, 12, 17, 25, 30, 255]" in str(err.value)
    assert "data.custom.mask_threshold" in str(err.value)
    labels = read_label_2d(tmp_path / "m.png", 2, mask_threshold=127)
    assert np.array_equal(labels, (stray > 127).astype(np.uint8))
    assert np.array_equal(read_label(tmp_path / "m.png", "image", "custom", ["bg", "fg"], 127), labels)
    # masks of class indices are not thresholded away
    Image.fromarray(labels).save(tmp_path / "i.png")
    assert np.array_equal(read_label_2d(tmp_path / "i.png", 2, mask_threshold=127), labels)


def test_mask_threshold_is_recorded_in_meta(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 255
    for k in range(3):
        Image.fromarray(RGB).save(src / "images" / f"c{k}.tif")
        Image.fromarray(_stray_grey(mask) if k else mask).save(src / "masks" / f"c{k}.png")
    custom = {**dataclasses.asdict(PARAMS.data.custom), "mask_threshold": 127}
    fetch_dataset("custom", tmp_path / "raw", src, PARAMS.data.synthetic, custom)
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 16, custom)
    assert meta["mask_threshold"] == 127
    assert [meta["cases"][c]["mask_grey_fraction"] for c in ("c0", "c1", "c2")] == [0.0, 6 / 600, 6 / 600]
    assert meta["mask_grey_fraction"] == pytest.approx(12 / 1800)
    assert read_json(tmp_path / "proc" / "meta.json")["mask_threshold"] == 127
    without = {**custom, "mask_threshold": None}
    with pytest.raises(DataError, match=r"c1.png: mask values .*data.custom.mask_threshold"):
        preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc2", 16, without)


def test_mask_threshold_is_validated():
    for value, why in (
        (300, " = 300; expected null or an integer grey value 0..254"),
        (True, ": expected int, got bool"),
    ):
        raw = tiny_raw_params()
        raw["data"]["custom"]["mask_threshold"] = value
        with pytest.raises(ConfigError, match=rf"data.custom.mask_threshold{why}"):
            params_from_dict(raw)
    raw = tiny_raw_params()
    raw["data"]["custom"].update(mask_threshold=127, class_names=["bg", "a", "b"])
    with pytest.raises(ConfigError, match="a threshold binarises 2-D masks of a 2-class dataset"):
        params_from_dict(raw)
    raw = tiny_raw_params()
    raw["data"]["custom"]["mask_threshold"] = 127
    assert params_from_dict(raw).data.custom.mask_threshold == 127


# ------------------------------------------------------------------ nnU-Net's raw layout


def _nnunet(root, ending=".png", labels=None, n=3):
    """DatasetNNN_Name/ with dataset.json, imagesTr/<case>_0000<ending>, labelsTr/<case><ending>."""
    import json

    raw = root / "Dataset042_Polyps"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "imagesTs").mkdir()  # no labels: not read
    desc = {
        "channel_names": {"0": "R", "1": "G", "2": "B"} if ending != ".nii.gz" else {"0": "CT"},
        "labels": labels or {"background": 0, "polyp": 1},
        "numTraining": n,
        "file_ending": ending,
    }
    (raw / "dataset.json").write_text(json.dumps(desc))
    truth = {}
    for k in range(n):
        label = np.zeros((20, 30), np.uint8)
        label[3 : 8 + k, 4:12] = 1
        truth[f"case_{k:03d}"] = label
        if ending == ".nii.gz":
            from medfusion.data.io import write_nifti

            write_nifti(
                raw / "imagesTr" / f"case_{k:03d}_0000.nii.gz",
                np.stack([GREY.astype(np.float32)] * 4),
                (2.0, 1.0, 1.0),
            )
            write_nifti(raw / "labelsTr" / f"case_{k:03d}.nii.gz", np.stack([label] * 4), (2.0, 1.0, 1.0))
        else:
            Image.fromarray(RGB).save(raw / "imagesTr" / f"case_{k:03d}_0000{ending}")
            Image.fromarray(label).save(raw / "labelsTr" / f"case_{k:03d}{ending}")
    if ending != ".nii.gz":
        Image.fromarray(RGB).save(raw / "imagesTs" / f"test_000_0000{ending}")
    return raw, truth


def _custom_params(**changes) -> dict:
    return {**dataclasses.asdict(PARAMS.data.custom), "class_names": ["background", "polyp"], **changes}


def test_nnunet_raw_layout_2d(tmp_path):
    raw, truth = _nnunet(tmp_path / "src")
    custom = _custom_params(group_pattern=r"^(case)_")  # one patient: the pattern sees the case id
    fetch_dataset("custom", tmp_path / "raw", tmp_path / "src", PARAMS.data.synthetic, custom)
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 16, custom)
    assert sorted(meta["cases"]) == sorted(truth) and meta["num_groups"] == 1
    assert not (tmp_path / "raw" / "Dataset042_Polyps" / "imagesTs").exists()
    for case, label in truth.items():
        path = tmp_path / "raw" / meta["cases"][case]["label"]
        assert np.array_equal(read_label(path, "image", "custom", ["background", "polyp"]), label)


def test_nnunet_raw_layout_volumes(tmp_path):
    _nnunet(tmp_path / "src", ending=".nii.gz")
    custom = _custom_params(kind="volume", modality="ct")
    fetch_dataset(
        "custom", tmp_path / "raw", tmp_path / "src" / "Dataset042_Polyps", PARAMS.data.synthetic, custom
    )
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 16, custom)
    assert meta["num_cases"] == 3 and meta["num_samples"] == 12
    assert meta["cases"]["case_001"]["spacing"] == [2.0, 1.0, 1.0]


def test_nnunet_layout_refusals_name_the_file_and_the_fix(tmp_path):
    import json

    from medfusion.data.fetch import FetchError

    raw, _ = _nnunet(tmp_path / "a", labels={"background": 0, "lesion": 1})
    with pytest.raises(
        FetchError, match=r"labels \['background', 'lesion'\]; .*set data.custom.class_names to"
    ):
        fetch_dataset("custom", tmp_path / "r1", tmp_path / "a", PARAMS.data.synthetic, _custom_params())
    raw, _ = _nnunet(tmp_path / "b")
    Image.fromarray(GREY).save(raw / "imagesTr" / "case_001_0001.png")
    with pytest.raises(FetchError, match=r"case 'case_001' has channel files \['0000', '0001'\]"):
        fetch_dataset("custom", tmp_path / "r2", tmp_path / "b", PARAMS.data.synthetic, _custom_params())
    raw, _ = _nnunet(tmp_path / "c")
    (raw / "labelsTr" / "case_002.png").unlink()
    with pytest.raises(FetchError, match=r"case_002_0000.png: no label labelsTr/case_002.png"):
        fetch_dataset("custom", tmp_path / "r3", tmp_path / "c", PARAMS.data.synthetic, _custom_params())
    raw, _ = _nnunet(tmp_path / "d")
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "polyp": 1}}))
    with pytest.raises(FetchError, match=r"dataset.json: not an nnU-Net dataset.json"):
        fetch_dataset("custom", tmp_path / "r4", tmp_path / "d", PARAMS.data.synthetic, _custom_params())
    raw, _ = _nnunet(tmp_path / "e")
    with pytest.raises(FetchError, match=r"file_ending '.png', but data.custom.kind = volume expects"):
        fetch_dataset(
            "custom",
            tmp_path / "r5",
            tmp_path / "e",
            PARAMS.data.synthetic,
            _custom_params(kind="volume", modality="ct"),
        )


# ------------------------------------------------------------------ volumes as they were acquired


def _reoriented(tmp_path, name: str, data_xyz: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data_xyz, affine), str(tmp_path / name))
    return tmp_path / name


def test_nifti_in_any_orientation_reads_the_same_canonical_volume(tmp_path):
    import nibabel as nib

    from medfusion.data.io import from_canonical, read_nifti

    ras = RNG.normal(size=(6, 5, 4)).astype(np.float32)  # (x, y, z), RAS+ axes
    ras_affine = np.diag([0.7, 0.8, 2.5, 1.0])
    ref, spacing = read_nifti(_reoriented(tmp_path, "ras.nii.gz", ras, ras_affine))
    # the same scan stored as (z, x, y) with x and z flipped: the affine says so
    stored = np.transpose(ras[::-1, :, ::-1], (2, 0, 1)).copy()
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -0.7, 0.8, -2.5, 1.0
    affine[:3, 3] = [0.7 * 5, 0.0, 2.5 * 3]  # the first voxel is the far corner of the flipped axes
    assert nib.aff2axcodes(affine) == ("I", "L", "A")  # array axes: z flipped, x flipped, y
    volume, moved, file_affine = read_nifti(
        _reoriented(tmp_path, "zxy.nii.gz", stored, affine), with_affine=True
    )
    assert np.array_equal(volume, ref)
    assert moved == pytest.approx(spacing) and spacing == pytest.approx((2.5, 0.8, 0.7))
    assert np.allclose(file_affine, affine)
    # back in the file's own axes: what write_nifti then stores with that affine
    assert np.array_equal(np.transpose(from_canonical(volume, file_affine), (2, 1, 0)), stored)


def test_label_in_another_space_is_refused_by_name(tmp_path):
    from medfusion.data.fetch import fetch_dataset as fetch
    from medfusion.data.io import write_nifti

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    write_nifti(src / "images" / "v1.nii.gz", RNG.normal(size=(4, 8, 8)).astype(np.float32), (2.0, 1.0, 1.0))
    write_nifti(
        src / "masks" / "v1.nii.gz",
        np.zeros((4, 8, 8), np.uint8),
        (2.0, 1.0, 1.0),
        np.diag([1.0, 1.0, 3.0, 1.0]).tolist(),
    )
    custom = {**dataclasses.asdict(PARAMS.data.custom), "kind": "volume", "modality": "ct"}
    fetch("custom", tmp_path / "raw", src, PARAMS.data.synthetic, custom)
    with pytest.raises(
        DataError,
        match=r"masks/v1.nii.gz: its affine .* differs from image v1.nii.gz's .*not in the image's space",
    ):
        preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 8, custom)


def test_metaimage_compressed_and_single_file_through_simpleitk(tmp_path):
    import SimpleITK as sitk

    from medfusion.data.io import read_metaimage

    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((0.8, 0.7, 2.5))
    for name, compress in (("a.mha", True), ("b.mhd", True), ("c.mha", False)):
        sitk.WriteImage(image, str(tmp_path / name), useCompression=compress)
        back, spacing = read_metaimage(tmp_path / name)
        assert (
            back.dtype == np.float32
            and np.array_equal(back, vol)
            and spacing == pytest.approx((2.5, 0.7, 0.8))
        )
        assert read_metaimage(tmp_path / name, integers=True)[0].dtype == np.int16
    (tmp_path / "bad.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    with pytest.raises(DataError, match=r"bad.mha: cannot read MetaImage"):
        read_metaimage(tmp_path / "bad.mha")


# ------------------------------------------------------------------ fields of view


def test_custom_fov_is_stored_and_scored_inside(tmp_path):
    from medfusion.evaluation import Targets, _restricted, _score_case, _Scores, _split_counts
    from medfusion.postprocess import PostProcess

    src = tmp_path / "src"
    for d in ("images", "masks", "fov"):
        (src / d).mkdir(parents=True)
    truth = np.zeros((20, 30), np.uint8)
    truth[4:16, 5:25] = 1
    fov = np.zeros((20, 30), bool)
    fov[:, :15] = True  # the left half
    for k in range(2):
        Image.fromarray(RGB).save(src / "images" / f"c{k}.png")
        Image.fromarray(truth * 255).save(src / "masks" / f"c{k}.png")
        Image.fromarray(fov.astype(np.uint8) * 255).save(src / "fov" / f"c{k}.png")
    custom = dataclasses.asdict(PARAMS.data.custom)
    fetch_dataset("custom", tmp_path / "raw", src, PARAMS.data.synthetic, custom)
    meta = preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 10, custom)
    assert meta["roi"] == "fov" and meta["cases"]["c0"]["fov"] == "fov/c0.png"
    assert np.load(tmp_path / "proc" / "fov.npy").shape == (2, 10, 10)
    targets = Targets(tmp_path / "proc", meta, "original")
    target, inside = targets.scored("c0", [0])
    assert np.array_equal(inside, fov) and np.array_equal(target, truth * fov)
    # a prediction covering the right 2/3 of the image: inside the FOV it overlaps cols 10..14 only
    probs = np.zeros((2, 20, 30), np.float32)
    probs[0], probs[1, :, 10:] = 1.0, 2.0
    scores = _Scores({"foreground": [1]})
    post = _score_case(scores, "r", "c0", probs, PostProcess(min_size=150), target, None, inside)
    rows, _ = _split_counts(scores.rows[("r", "raw")])
    dice = next(r["value"] for r in rows if r["metric"] == "dice")
    pred = np.zeros((20, 30), bool)
    pred[:, 10:15] = True  # what is left of it inside the FOV
    assert dice == pytest.approx(2 * np.count_nonzero(pred & (target == 1)) / (pred.sum() + target.sum()))
    # post-processing sees the FOV-restricted prediction: its 20 x 20 = 400-pixel component is cut to
    # 5 x 20 = 100 inside the FOV, below min_size 150, so it goes
    assert not post.any()
    assert np.array_equal(_restricted(np.ones((20, 30), np.uint8), inside), inside.astype(np.uint8))
    processed = Targets(tmp_path / "proc", meta, "processed")
    assert processed.scored("c1", [1])[1].shape == (10, 10)


def test_fov_folder_needs_every_image(tmp_path):
    from medfusion.data.fetch import FetchError

    src = tmp_path / "src"
    for d in ("images", "masks", "roi"):
        (src / d).mkdir(parents=True)
    for k in range(2):
        Image.fromarray(RGB).save(src / "images" / f"c{k}.png")
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(src / "masks" / f"c{k}.png")
    Image.fromarray(np.ones((20, 30), np.uint8)).save(src / "roi" / "c0.png")
    with pytest.raises(
        FetchError, match=r"c1.png: no field-of-view mask with stem 'c1' in .*roi; every image needs one"
    ):
        fetch_dataset(
            "custom", tmp_path / "raw", src, PARAMS.data.synthetic, dataclasses.asdict(PARAMS.data.custom)
        )


# ------------------------------------------------------------------ several datasets of your own


def _two_customs(tmp_path) -> dict:
    raw = tiny_raw_params()
    one = {**raw["data"]["custom"], "title": "Clinic A", "mask_threshold": 127}
    two = {**raw["data"]["custom"], "title": "Clinic B", "modality": "gray"}
    raw["data"]["custom"] = {"clinic_a": one, "clinic_b": two}
    raw["datasets"] = ["synthetic", "clinic_a", "clinic_b"]
    raw["data"]["sources"].update(clinic_a=str(tmp_path / "a"), clinic_b=str(tmp_path / "b"))
    return raw


def test_named_custom_datasets_each_a_dataset_of_its_own(tmp_path):
    params = params_from_dict(_two_customs(tmp_path))
    assert sorted(params.custom_datasets) == ["clinic_a", "clinic_b"]
    a, b = params.spec("clinic_a"), params.spec("clinic_b")
    assert (a.name, a.title, a.mask_threshold, a.custom, a.in_channels) == (
        "clinic_a",
        "Clinic A",
        127,
        True,
        3,
    )
    assert (b.name, b.in_channels, params.spec("synthetic").custom) == ("clinic_b", 1, False)
    assert (
        params.custom_key("clinic_b") == "data.custom.clinic_b"
        and params.custom_description("synthetic") is None
    )
    for name, grey in (("a", True), ("b", False)):
        src = tmp_path / name
        (src / "images").mkdir(parents=True)
        (src / "masks").mkdir()
        for k in range(2):
            Image.fromarray(RGB if name == "a" else GREY).save(src / "images" / f"{name}{k}.png")
            mask = np.where(GREY > 127, 255, 0).astype(np.uint8)
            Image.fromarray(_stray_grey(mask) if grey else mask).save(src / "masks" / f"{name}{k}.png")
        dataset = f"clinic_{name}"
        custom = params.custom_description(dataset)
        fetch_dataset(dataset, tmp_path / "raw" / dataset, src, params.data.synthetic, custom)
        meta = preprocess_dataset(
            dataset, tmp_path / "raw" / dataset, tmp_path / "proc" / dataset, 16, custom
        )
        assert meta["dataset"] == dataset and meta["in_channels"] == (3 if name == "a" else 1)
        assert ("mask_threshold" in meta) == grey


def test_named_custom_datasets_are_validated(tmp_path):
    raw = _two_customs(tmp_path)
    raw["data"]["custom"]["clinic_b"]["modality"] = "ct"
    with pytest.raises(
        ConfigError, match=r"data.custom.clinic_b.modality = 'ct'; expected one of \['rgb', 'gray'\]"
    ):
        params_from_dict(raw)
    raw = _two_customs(tmp_path)
    raw["data"]["custom"]["kvasir_seg"] = raw["data"]["custom"].pop("clinic_b")
    raw["data"]["sources"].pop("clinic_b")
    raw["datasets"] = ["clinic_a"]
    with pytest.raises(
        ConfigError, match=r"data.custom.kvasir_seg = 'kvasir_seg'; expected a new lower-case name"
    ):
        params_from_dict(raw)
    raw = _two_customs(tmp_path)
    raw["data"]["sources"]["clinic_b"] = None
    with pytest.raises(ConfigError, match=r"data.sources.clinic_b = None; expected the folder of your data"):
        params_from_dict(raw)
    raw = _two_customs(tmp_path)
    raw["datasets"] = ["custom"]  # no longer described: data.custom holds named entries
    with pytest.raises(ConfigError, match=r"datasets\[0\] = 'custom'; expected one of \[.*'clinic_a'"):
        params_from_dict(raw)
    raw = _two_customs(tmp_path)
    raw["data"]["custom"]["clinic_a"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['data.custom.clinic_a.colour'\]"):
        params_from_dict(raw)
