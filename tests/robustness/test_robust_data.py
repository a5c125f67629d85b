"""Robustness of the fetch and preprocess stages: bad files, bad archives, bad downloads, a full disk.

Each case checks what the user gets: an error naming the file and what was expected, and that the
stage's output (data/raw/<name> or data/processed/<name>) is either absent or still the previous
version, with no temporary folder left behind.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import range_server, tiny_raw_params
from PIL import Image

from medfusion.config import params_from_dict
from medfusion.data.fetch import FetchError, download, fetch_dataset
from medfusion.data.io import DataError, read_json, write_nifti
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.registry import DATASETS

PARAMS = params_from_dict(tiny_raw_params())
SYNTH = PARAMS.data.synthetic
TEMPORARY = (".partial", ".unpacked", ".tmp", ".part")


def custom(**changes) -> dict:
    return {**dataclasses.asdict(PARAMS.data.custom), **changes}


IMAGES = custom()
VOLUMES = custom(kind="volume", modality="ct")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: equal snapshots = the folder is intact."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if any(t in p.name for t in TEMPORARY)]


def write_images(root: Path, n: int = 4, size: tuple[int, int] = (24, 32)) -> Path:
    """A custom 2-D dataset: images/p<k>_s0.png + masks/p<k>_s0.png (0/255), the first mask empty."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        Image.fromarray(np.full((*size, 3), 40 * k, np.uint8)).save(root / "images" / f"p{k}_s0.png")
        mask = np.zeros(size, np.uint8)
        mask[4:12, 4:12] = 255 if k else 0
        Image.fromarray(mask).save(root / "masks" / f"p{k}_s0.png")
    return root


def write_volumes(root: Path, n: int = 2, shape: tuple[int, int, int] = (4, 16, 16)) -> Path:
    """A custom CT dataset: images/c<k>.nii.gz + labels/c<k>.nii.gz (0/1)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(n):
        image = np.random.default_rng(k).normal(0, 100, shape).astype(np.float32)
        label = np.zeros(shape, np.float32)
        label[1:3, 4:10, 4:10] = 1
        write_nifti(root / "images" / f"c{k}.nii.gz", image, (2.0, 1.0, 1.0))
        write_nifti(root / "labels" / f"c{k}.nii.gz", label, (2.0, 1.0, 1.0))
    return root


def fetched_and_processed(tmp_path: Path, spec: dict) -> tuple[Path, Path]:
    """A first, good fetch + preprocess of a custom source: data/raw and data/processed exist."""
    src = (write_images if spec["kind"] == "image" else write_volumes)(tmp_path / "src")
    fetch_dataset("custom", tmp_path / "raw", src, SYNTH, spec)
    preprocess_dataset("custom", tmp_path / "raw", tmp_path / "proc", 32, spec)
    return tmp_path / "raw", tmp_path / "proc"


# ---------------------------------------------------------------- bad files: preprocess stops, output intact


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def grey_mask(path: Path) -> None:
    mask = np.zeros((24, 32), np.uint8)
    mask[0:4, 0:4], mask[4:12, 4:12] = 128, 255
    Image.fromarray(mask).save(path)


def volume_with(change):
    def edit(path: Path) -> None:
        image = np.random.default_rng(0).normal(0, 100, (4, 16, 16)).astype(np.float32)
        write_nifti(path, change(image), (2.0, 1.0, 1.0))

    return edit


def set_nan(image: np.ndarray) -> np.ndarray:
    image[1, 2, 3] = np.nan
    return image


BAD_FILES = {
    # case: (dataset spec, file under data/raw, how it is broken, what the message must say besides the
    # file's path; a missing mask is named by its image's path)
    "truncated image": (IMAGES, "images/p1_s0.png", truncate, ("cannot read image",)),
    "mask of another size": (
        IMAGES,
        "masks/p2_s0.png",
        lambda p: Image.fromarray(np.zeros((10, 10), np.uint8)).save(p),
        ("mask size (10, 10) differs from image p2_s0.png (24, 32)",),
    ),
    "missing mask": (
        IMAGES,
        "masks/p3_s0.png",
        Path.unlink,
        ("images/p3_s0.png: no mask with stem 'p3_s0' in",),
    ),
    "non-binary mask": (
        IMAGES,
        "masks/p0_s0.png",
        grey_mask,
        ("mask values [0, 128, 255]", "expected {0, 255} or {0, 1}"),
    ),
    "NaN voxels": (VOLUMES, "images/c1.nii.gz", volume_with(set_nan), ("volume has NaN or infinite voxels",)),
    "4-D volume": (
        VOLUMES,
        "images/c0.nii.gz",
        volume_with(lambda v: np.stack([v, v])),
        ("expected a 3-D volume, got shape (16, 16, 4, 2)",),
    ),
    "label beyond the classes": (
        VOLUMES,
        "labels/c0.nii.gz",
        lambda p: write_nifti(p, np.full((4, 16, 16), 3, np.float32), (2.0, 1.0, 1.0)),
        ("label values [3]", "expected 0..1"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_file_is_named_and_the_processed_data_is_kept(case, tmp_path):
    spec, name, breaks, expected = BAD_FILES[case]
    raw, proc = fetched_and_processed(tmp_path, spec)
    before = snapshot(proc)
    bad = raw / name
    bad.unlink() if breaks is Path.unlink else breaks(bad)  # raw files may be hard links of src: fine here
    with pytest.raises(DataError) as err:
        preprocess_dataset("custom", raw, proc, 32, spec)
    message = str(err.value)
    named = bad if breaks is not Path.unlink else raw / "images" / bad.name
    assert message.startswith(f"{named}: "), message  # the full path of the file first
    for text in expected:
        assert text in message, message
    assert snapshot(proc) == before  # the previous data/processed is intact
    assert leftovers(tmp_path) == []


def test_empty_masks_are_allowed_and_counted_in_meta(tmp_path):
    _, proc = fetched_and_processed(tmp_path, IMAGES)
    meta = read_json(proc / "meta.json")
    assert (meta["num_samples"], meta["empty_samples"], meta["empty_cases"]) == (4, 1, 1)
    assert [c["case_id"] for c in read_json(proc / "cases.json") if c["empty"]] == ["p0_s0"]


def test_disk_full_while_writing_processed_data_keeps_the_previous_version(tmp_path, monkeypatch):
    import medfusion.data.preprocess as preprocess

    raw, proc = fetched_and_processed(tmp_path, IMAGES)
    before = snapshot(proc)
    real = preprocess._StackWriter.write

    def full_disk(self, block):
        if (
            self.path.name == "masks.npy"
        ):  # images.npy has its first case: the disk fills up on the second file
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, block)

    monkeypatch.setattr(preprocess._StackWriter, "write", full_disk)
    with pytest.raises(OSError, match=r"No space left on device.*masks\.npy") as err:
        preprocess_dataset("custom", raw, proc, 32, IMAGES)
    assert err.value.errno == errno.ENOSPC
    assert f"no space left writing {proc}" in str(err.value) and "nothing was replaced" in str(err.value)
    assert snapshot(proc) == before and leftovers(tmp_path) == []


def test_evaluate_stage_outputs_are_replaced_whole_or_not_at_all(tmp_path):
    """atomic_dir (fetch, preprocess, evaluate): an error midway keeps the previous folder untouched."""
    from medfusion.data.io import atomic_dir

    out = tmp_path / "eval" / "unet"
    with atomic_dir(out) as tmp:
        (tmp / "per_case.csv").write_text("old\n")
        (tmp / "summary.csv").write_text("old\n")
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="midway"), atomic_dir(out) as tmp:
        (tmp / "per_case.csv").write_text("new\n")
        raise RuntimeError("midway")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "per_case.csv").write_text("new\n")
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv"]  # no stale file from the old version


# ---------------------------------------------------------------- bad sources: fetch stops, data/raw intact


def test_missing_mask_and_missing_images_folder_at_fetch_keep_the_previous_raw_copy(tmp_path):
    raw, _ = fetched_and_processed(tmp_path, IMAGES)
    before = snapshot(raw)
    (tmp_path / "src" / "masks" / "p3_s0.png").unlink()  # raw holds its own link: it is unaffected
    with pytest.raises(FetchError) as err:
        fetch_dataset("custom", raw, tmp_path / "src", SYNTH, IMAGES)
    assert f"{tmp_path / 'src' / 'images' / 'p3_s0.png'}: no mask with stem 'p3_s0'" in str(err.value)
    no_images = tmp_path / "no_images"
    (no_images / "masks").mkdir(parents=True)
    with pytest.raises(FetchError) as err:
        fetch_dataset("custom", raw, no_images, SYNTH, IMAGES)
    assert f"{no_images}: expected images/ and masks/ (or labels/) folders" in str(err.value)
    assert snapshot(raw) == before and leftovers(tmp_path) == []


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


ARCHIVES = {
    "zip with ../": (
        lambda d: _zip(d / "data.zip", {"images/p0_s0.png": b"x", "../escape.txt": b"evil"}),
        "member '../escape.txt' escapes the target folder",
    ),
    "tar with ../": (
        lambda d: _tar(
            d / "data.tar",
            [(tarfile.TarInfo("images/a.png"), b"x"), (tarfile.TarInfo("../escape.txt"), b"e")],
        ),
        "member '../escape.txt' escapes the target folder",
    ),
    "tar with an absolute path": (
        lambda d: _tar(d / "abs.tar", [(tarfile.TarInfo(str(d.parent / "escape.txt")), b"e")]),
        "escapes the target folder",
    ),
    "tar with a symlink": (
        lambda d: _tar(
            d / "link.tar", [(tarfile.TarInfo("images/a.png"), b"x"), (_symlink("masks", "/etc"), None)]
        ),
        "member 'masks' is a link",
    ),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_path_traversal_in_an_archive_is_refused_before_anything_is_extracted(case, tmp_path):
    make, expected = ARCHIVES[case]
    (tmp_path / "archives").mkdir()
    archive = make(tmp_path / "archives")
    with pytest.raises(FetchError) as err:
        fetch_dataset("custom", tmp_path / "data" / "raw", archive, SYNTH, IMAGES)
    assert str(archive) in str(err.value) and expected in str(err.value) and "refusing" in str(err.value)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "data" / "escape.txt").exists()
    assert not (tmp_path / "data" / "raw").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- downloads


@pytest.fixture
def server():
    with range_server(np.random.default_rng(0).bytes(200_000), "Task05_Prostate.tar") as served:
        yield served


def test_checksum_mismatch_of_a_download_names_url_and_checksums_and_keeps_nothing(
    tmp_path, server, monkeypatch
):
    url, _ = server
    spec = DATASETS["msd_prostate"]
    monkeypatch.setitem(DATASETS, "msd_prostate", dataclasses.replace(spec, url=url, mirrors=()))
    with pytest.raises(FetchError) as err:
        fetch_dataset("msd_prostate", tmp_path / "raw", None, SYNTH)
    message = str(err.value)
    assert url in message and "md5 checksum" in message and spec.checksum.split(":")[1] in message
    assert "medfusion fetch msd_prostate --source" in message  # the way out: a local copy
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # no bad archive kept for reuse


def test_interrupted_download_keeps_its_bytes_and_the_next_attempt_resumes(tmp_path, server):
    url, handler = server
    md5 = "md5:" + hashlib.md5(handler.payload).hexdigest()
    dest = tmp_path / "Task05_Prostate.tar"
    handler.cut_after = 80_000  # the connection drops; one attempt only
    with pytest.raises(FetchError) as err:
        download(url, dest, md5, retries=1, timeout=5)
    message = str(err.value)
    assert url in message and "connection closed at 80000 of 200000 bytes" in message
    assert "resumed next time" in message
    assert not dest.exists() and dest.with_name(dest.name + ".part").stat().st_size == 80_000
    download(url, dest, md5, retries=1, timeout=5)  # the network is back
    assert handler.requests == [None, "bytes=80000-"]  # only the missing bytes were asked for
    assert dest.read_bytes() == handler.payload and leftovers(tmp_path) == []
