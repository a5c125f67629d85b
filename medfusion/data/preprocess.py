"""data/raw/<name> -> data/processed/<name>: every 2-D sample resized to image_size, stored as arrays.

Output (memory-mappable, read by `SegDataset`):
    images.npy  (N, C, S, S) uint8      masks.npy (N, S, S) uint8 class indices
    cases.json  per sample: case_id (the test case: an image, or the volume a slice came from),
                group (the patient: folds and the test split never divide a group), slice index
    meta.json   dataset facts, per-case spacing and original shape, and a content hash

Intensity (METHOD.md section 3): RGB is kept as is; CT is clipped to the Hounsfield window
[-100, 400] and scaled to [0, 255]; MRI is clipped to its 0.5-99.5 percentiles per volume and
scaled. CLAHE (clip 2.0, 8x8 tiles) is applied to grayscale slices. The z-score per image happens
at load time in `SegDataset`. N4 bias-field correction for MRI is not applied here (it needs
SimpleITK, which the data layer adds with the real PROMISE12 reader).
Geometry: every 2-D image or slice is resized to S x S (area interpolation for images, nearest
for labels), ignoring the aspect ratio, as the paper's fixed 256x256 input implies. Evaluation in
this pipeline is at that resolution and says so.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from medfusion.data.fetch import dataset_files, mask_path
from medfusion.data.io import DataError, read_image, read_mask, read_metaimage, read_nifti, write_json
from medfusion.data.registry import DATASETS, DatasetSpec

CT_WINDOW = (-100.0, 400.0)


@dataclass
class RawCase:
    case_id: str
    group: str
    image: np.ndarray  # (H, W, 3) uint8 for 2-D, (D, H, W) float32 for volumes
    label: np.ndarray  # (H, W) or (D, H, W) integer classes
    spacing: tuple[float, ...]


def iter_raw_cases(spec: DatasetSpec, raw_dir: Path) -> Iterator[RawCase]:
    """Yield the cases of a fetched dataset in sorted order."""
    root, files = dataset_files(spec, raw_dir)
    if spec.name in ("kvasir_seg", "synthetic"):
        for image_path in [f for f in files if f.parent.name == "images"]:
            # no patient ids are published for Kvasir-SEG: each image is its own group
            yield _pair_2d(image_path, mask_path(spec, root, image_path), image_path.stem, image_path.stem)
    elif spec.name == "chase_db1":
        for image_path in [f for f in files if re.fullmatch(r"Image_\d+[LR]\.jpg", f.name)]:
            child = re.fullmatch(r"Image_(\d+)[LR]", image_path.stem).group(1)
            yield _pair_2d(
                image_path, image_path.with_name(image_path.stem + "_1stHO.png"), image_path.stem, child
            )
    elif spec.name == "promise12":
        for header in [f for f in files if re.fullmatch(r"Case\d\d\.mhd", f.name)]:
            volume, spacing = read_metaimage(header)
            label, _ = read_metaimage(header.with_name(header.stem + "_segmentation.mhd"))
            yield _volume_case(header, header.stem, volume, label, spacing, spec)
    elif spec.name in ("lits17", "synthetic_volumes"):
        for path in [f for f in files if f.name.startswith("volume-")]:
            case_id = path.name.split(".")[0]
            volume, spacing = read_nifti(path)
            label, _ = read_nifti(path.with_name(path.name.replace("volume-", "segmentation-")))
            yield _volume_case(path, case_id, volume, label, spacing, spec)
    else:
        raise DataError(f"dataset {spec.name!r} has no reader")


def _pair_2d(image_path: Path, mask_path: Path, case_id: str, group: str) -> RawCase:
    image, mask = read_image(image_path), read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"{mask_path}: mask size {mask.shape} differs from image {image_path.name} {image.shape[:2]}"
        )
    return RawCase(case_id, group, image, mask, (1.0, 1.0))


def _volume_case(
    path: Path,
    case_id: str,
    volume: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, ...],
    spec: DatasetSpec,
) -> RawCase:
    if volume.shape != label.shape:
        raise DataError(f"{path}: volume shape {volume.shape} differs from its label's {label.shape}")
    if not np.isfinite(volume).all():
        raise DataError(f"{path}: volume has NaN or infinite voxels")
    label = np.rint(label).astype(np.int64)
    bad = np.setdiff1d(np.unique(label), np.arange(spec.num_classes))
    if bad.size:
        raise DataError(
            f"{path}: label values {bad.tolist()}; expected 0..{spec.num_classes - 1} ({spec.class_names})"
        )
    return RawCase(case_id, case_id, volume, label.astype(np.uint8), spacing)


def to_uint8(volume: np.ndarray, modality: str) -> np.ndarray:
    """Intensity window of a CT or MRI volume, scaled to uint8."""
    if modality == "ct":
        lo, hi = CT_WINDOW
    else:
        lo, hi = np.percentile(volume, [0.5, 99.5])
    scaled = (np.clip(volume, lo, hi) - lo) / max(hi - lo, 1e-6)
    return np.rint(scaled * 255).astype(np.uint8)


_CLAHE = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def case_samples(case: RawCase, spec: DatasetSpec, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resized samples of one case: images (n, C, S, S) uint8 and masks (n, S, S) uint8."""
    if spec.kind == "image":
        image = _resize(case.image, size, nearest=False)  # (S, S, 3)
        return image.transpose(2, 0, 1)[None], _resize(case.label, size, nearest=True)[None]
    slices = to_uint8(case.image, spec.modality)
    images = np.stack([_CLAHE.apply(_resize(s, size, nearest=False)) for s in slices])[
        :, None
    ]  # (D, 1, S, S)
    masks = np.stack([_resize(s, size, nearest=True) for s in case.label])  # (D, S, S)
    return images, masks


def preprocess_dataset(name: str, raw_dir: Path, out_dir: Path, image_size: int) -> dict:
    """Write data/processed/<name> from data/raw/<name>; returns meta.json's content."""
    spec = DATASETS[name]
    out_dir = Path(out_dir)
    images, masks, cases, per_case = [], [], [], {}
    for case in tqdm(iter_raw_cases(spec, Path(raw_dir)), desc=f"preprocess {name}", unit="case"):
        imgs, msks = case_samples(case, spec, image_size)
        images.append(imgs)
        masks.append(msks)
        for k in range(len(imgs)):
            cases.append(
                {"case_id": case.case_id, "group": case.group, "slice": k if spec.kind == "volume" else None}
            )
        per_case[case.case_id] = {"shape": list(case.label.shape), "spacing": list(case.spacing)}
    if not cases:
        raise DataError(f"{raw_dir}: no cases found for {name}")
    image_array, mask_array = np.concatenate(images), np.concatenate(masks)
    digest = hashlib.sha256(image_array.tobytes() + mask_array.tobytes()).hexdigest()
    meta = {
        "dataset": name,
        "kind": spec.kind,
        "image_size": image_size,
        "in_channels": spec.in_channels,
        "class_names": list(spec.class_names),
        "num_samples": len(cases),
        "num_cases": len(per_case),
        "cases": per_case,
        "sha256": digest,
    }
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", image_array)
    np.save(tmp / "masks.npy", mask_array)
    write_json(tmp / "cases.json", cases)
    write_json(tmp / "meta.json", meta)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return meta
