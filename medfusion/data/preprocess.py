"""data/raw/<name> -> data/processed/<name>: every input validated, every 2-D sample resized and stored.

Output (memory-mapped by `SegDataset`; loading is a page-cache read, never a decode):
    images.npy    (N, C, S, S) uint8     masks.npy (N, S, S) uint8 class indices
    observer2.npy (N, S, S) uint8        CHASE_DB1 only: the second observer's labels
    cases.json    the index, one record per sample: case_id (the test case: an image, or the volume a
                  slice came from), group (the patient: folds and the test split never divide a group),
                  slice (index in the volume, None for 2-D), empty (no foreground)
    meta.json     dataset facts; per case the original shape, spacing (mm, None where unknown),
                  NIfTI affine and its ground-truth file (`label`, relative to `raw_dir`), so that
                  evaluation can score at the original geometry; a content hash of the arrays

Validation (before anything is written; the first bad file stops the stage with its path and the
problem): unreadable files, image/mask size mismatch, missing masks (see fetch.dataset_files),
mask values that are not labels (a lossless mask must hold class indices, or 0/255 for a binary
task; a JPEG mask is binarised at > 127 and refused when over 5% of its pixels are mid-grey, i.e. it
is not a mask), NaN or infinite voxels, volumes of the wrong dimension, label values beyond the
classes. Empty masks are allowed and counted in meta.json (`empty_samples`, `empty_cases`).

Intensity (METHOD.md section 3; the z-score per image happens at load time in `SegDataset`):
    rgb       kept as is.
    gray      2-D grayscale (custom): CLAHE.
    ct        clipped to data.ct_window (liver [-100, 400] HU), scaled to [0, 255], CLAHE per slice.
    mri       N4 bias-field correction (SimpleITK, data.n4) of the T2 volume, then clipped to its
              0.5-99.5 percentiles per volume and scaled, CLAHE per slice. For msd_prostate's second
              channel (ADC, a quantitative map) only the percentile scaling: neither N4 nor CLAHE, which
              would distort its values (our choice; METHOD.md names only T2-type corrections).
    CLAHE: clip data.clahe_clip, 8x8 tiles, on the resized slice.
Several channel files per case (nnU-Net's <case>_0000, _0001, ...; data.custom.channels): stacked as
channels in file order, each its own modality for CASNet, and each given the step of `modality` above
(our choice where METHOD.md names none: every channel of the user's data is taken to be a weighted
image, N4 and CLAHE included for MRI; only the registry's msd_prostate marks a channel, its ADC, as
quantitative, `DatasetSpec.quantitative_channels`).
N4 (our settings; METHOD.md names the method only): Otsu foreground mask, the fit on a copy shrunk 4x
in-plane, 4 levels x 50 iterations, the bias field then evaluated at full resolution.

Geometry (data.image_size native, 2-D only: each image keeps its size, with CLAHE for grayscale, and is
stored top-left in a zero-padded canvas of the largest size rounded up to a multiple of 16, meta.json
`canvas`; its own size is cases[c].shape). Otherwise: every 2-D image or slice is resized to S x S,
ignoring the aspect ratio, as the paper's fixed 256x256 input implies: images by area interpolation;
label maps (masks, the second observer's, FOV masks) by nearest neighbour with pixel centres aligned as
the area resize's are (`resize_labels`; METHOD.md: never OpenCV's plain nearest, half a pixel off).
Evaluation scores at each case's original geometry against the original ground truth (`read_label`),
or at this resolution with eval.resolution: processed. Volumes are sliced along their first array axis
(NIfTI z); every slice is kept, so no volume is resampled in z.

Memory: the arrays are written case by case as the workers deliver them (`_StackWriter`), so the stage
holds about one case per worker (a LiTS volume: its float32 voxels), never the dataset; cases.json
and meta.json hold a few hundred bytes per slice / case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from medfusion.data.fetch import (
    FetchError,
    channel_files,
    custom_fovs,
    custom_pairs,
    dataset_files,
    file_stem,
    mask_path,
    msd_pairs,
)
from medfusion.data.io import (
    MAX_PIXELS_HOW,
    DataError,
    atomic_dir,
    is_metaimage,
    nifti_affine,
    read_image,
    read_label_image,
    read_metaimage,
    read_nifti,
    write_json,
)
from medfusion.data.registry import DatasetSpec, dataset_spec

CT_WINDOW = (-100.0, 400.0)
JPEG_MASK_MAX_GREY = 0.05  # a JPEG "mask" with more mid-grey pixels than this is not a mask


@dataclass(frozen=True)
class PreprocessSettings:
    image_size: int | str  # S, or "native" (2-D images keep their size)
    n4: bool = True
    ct_window: tuple[float, float] = CT_WINDOW
    clahe_clip: float = 2.0
    group_pattern: str | None = None  # custom datasets: regex whose group 1 is the patient id
    canvas: tuple[int, int] | None = None  # native: the (H, W) every image is padded into (set by preprocess)

    @property
    def native(self) -> bool:
        return self.image_size == "native"


@dataclass(frozen=True)
class CaseRef:
    """Where one case's files are; cheap to pass to a worker process."""

    case_id: str
    group: str
    image: Path
    label: Path
    observer2: Path | None = None
    fov: Path | None = None  # custom 2-D data: the field-of-view mask (fov/ or roi/; non-zero = inside)


@dataclass
class RawCase:
    case_id: str
    group: str
    image: (
        np.ndarray
    )  # (H, W, C) uint8 for 2-D; (M, D, H, W) for volumes (M modalities): float32, or the integers stored
    label: np.ndarray  # (H, W) or (D, H, W) uint8 classes
    spacing: tuple[float, ...] | None  # mm, (z, y, x) for volumes; None where unknown
    affine: list | None = None
    observer2: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    fov: np.ndarray | None = None  # (H, W) bool, True inside the field of view


def case_refs(spec: DatasetSpec, raw_dir: Path, group_pattern: str | None = None) -> list[CaseRef]:
    """The cases of a fetched dataset in sorted order, as file references (nothing is read)."""
    root, files = dataset_files(spec, raw_dir)
    if spec.name in ("kvasir_seg", "synthetic"):
        # no patient ids are published for Kvasir-SEG: each image is its own group
        return [
            CaseRef(f.stem, f.stem, f, mask_path(spec, root, f)) for f in files if f.parent.name == "images"
        ]
    if spec.name == "chase_db1":
        refs = []
        for f in files:
            m = re.fullmatch(r"Image_(\d+)[LR]\.jpg", f.name)
            if m:  # the child is the group: both eyes stay together
                second = f.with_name(f.stem + "_2ndHO.png")
                refs.append(
                    CaseRef(
                        f.stem,
                        m.group(1),
                        f,
                        f.with_name(f.stem + "_1stHO.png"),
                        second if second.exists() else None,
                    )
                )
        return refs
    if spec.name == "promise12":
        return [
            CaseRef(f.stem, f.stem, f, f.with_name(f.stem + "_segmentation.mhd"))
            for f in files
            if re.fullmatch(r"Case\d\d\.mhd", f.name)
        ]
    if spec.name in ("lits17", "synthetic_volumes"):
        return [
            CaseRef(
                f.name.split(".")[0],
                f.name.split(".")[0],
                f,
                f.with_name(f.name.replace("volume-", "segmentation-")),
            )
            for f in files
            if f.name.startswith("volume-")
        ]
    if spec.name in ("msd_prostate", "msd_liver"):
        pairs = msd_pairs(root, spec.name.removeprefix("msd_"))
        return [CaseRef(file_stem(i), file_stem(i), i, label) for i, label in pairs]
    if spec.custom:
        refs = []
        pairs = custom_pairs(root, spec.kind, spec.channel_files)
        fovs = custom_fovs(root, spec.kind, pairs)
        for image, label in pairs:
            stem = file_stem(label)  # the case id: the image's stem, or nnU-Net's <case> of <case>_0000
            group = _custom_group(image, stem, group_pattern)
            refs.append(CaseRef(stem, group, image, label, fov=fovs.get(image)))
        return refs
    raise DataError(f"dataset {spec.name!r} has no reader")


def _custom_group(image: Path, stem: str, pattern: str | None) -> str:
    if pattern is None:
        return stem
    m = re.search(pattern, stem)
    if m is None:
        raise DataError(
            f"{image}: data.custom.group_pattern {pattern!r} does not match the file stem {stem!r}; "
            "every file needs a patient id"
        )
    return m.group(1)


def read_label_2d(path: Path, num_classes: int, mask_threshold: int | None = None) -> np.ndarray:
    """A 2-D label image as (H, W) uint8 class indices, validated (`label_2d` without its grey fraction)."""
    return label_2d(path, num_classes, mask_threshold)[0]


THRESHOLD_KEY = (
    "data.custom.mask_threshold"  # how the pipeline's user sets it; `medfusion evaluate`: --mask-threshold
)


def label_2d(
    path: Path, num_classes: int, mask_threshold: int | None = None, option: str = THRESHOLD_KEY
) -> tuple[np.ndarray, float]:
    """A 2-D label image as (H, W) uint8 class indices, validated, and the fraction of its pixels that
    were grey (neither 0 nor 255; 0.0 unless `mask_threshold` is set).

    `mask_threshold` T (2 classes; data.custom.mask_threshold): grey > T is foreground, whatever the
    format, except palette masks (their indices are the classes) and masks that hold only 0 and 1
    (class indices already). Otherwise, JPEG masks (Kvasir-SEG, lossy): grey > 127 is foreground;
    refused when over 5% of the pixels are mid-grey (32..223), which no binary mask has. Lossless
    masks: class indices 0..K-1, or exactly {0, 255} / {0, 1} subsets for a binary task.

    Raises:
        DataError: unreadable, or values that are not labels of this dataset (naming the values and,
            for a binary task, the threshold's setting `option` of the command that reads it).
    """
    grey, palette = read_label_image(path, with_palette=True)
    if mask_threshold is not None and num_classes == 2 and not palette:
        if grey.max(initial=0) <= 1:
            return grey.astype(np.uint8), 0.0
        grey_fraction = float(np.count_nonzero((grey != 0) & (grey != 255))) / max(grey.size, 1)
        return (grey > mask_threshold).astype(np.uint8), grey_fraction
    return _label_2d_strict(path, grey, num_classes, option), 0.0


def _label_2d_strict(
    path: Path, grey: np.ndarray, num_classes: int, option: str = THRESHOLD_KEY
) -> np.ndarray:
    if path.suffix.lower() in (".jpg", ".jpeg"):
        mid = float(((grey > 32) & (grey < 223)).mean())
        if num_classes != 2 or mid > JPEG_MASK_MAX_GREY:
            raise DataError(
                f"{path}: not a binary mask ({100 * mid:.1f}% of pixels are mid-grey; expected near 0 or 255)"
                if num_classes == 2
                else f"{path}: a JPEG mask for {num_classes} classes; lossy masks cannot hold class indices"
            )
        return (grey > 127).astype(np.uint8)
    values = np.unique(grey)
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        return (grey == 255).astype(np.uint8)
    if values.max(initial=0) < num_classes:
        return grey.astype(np.uint8)
    expected = "{0, 255} or {0, 1}" if num_classes == 2 else f"class indices 0..{num_classes - 1}"
    shown = values[:10].tolist() + (["..."] if values.size > 10 else [])
    way_out = (
        f"; grey values from a lossy export? {option} (e.g. 127) binarises masks at > it"
        if num_classes == 2
        else ""
    )
    raise DataError(f"{path}: mask values {shown}; expected {expected} (a non-binary mask?){way_out}")


MAX_EMPTY_FRACTION = 0.9  # more cases than this with no foreground after reading: refused
EMPTY_CHECK_FROM = 20  # preprocessing stops at the 20th case already when every case so far was empty


def empty_masks_error(
    n_empty: int, n_cases: int, example: Path, threshold: int | None, option: str = THRESHOLD_KEY
) -> DataError | None:
    """The refusal of a dataset whose masks are all, or nearly all, empty once read, or None.

    The rule: refused when more than 90% of the cases (a 2-D image, or a whole volume) have no
    foreground. Segmentation datasets have a structure in (nearly) every case: Kvasir-SEG's and
    CHASE_DB1's every image, every LiTS volume (its liver). A dataset that reads as empty is almost
    always read wrongly, most often label values 0/1 saved as JPEG, which the > 127 binarisation of
    JPEG masks turns into nothing; training on it would run and report Dice 0. `example`: one mask
    file, to say how the masks were read; `option`: the threshold's setting of the command."""
    if n_cases == 0 or n_empty <= MAX_EMPTY_FRACTION * n_cases:
        return None
    lossy = Path(example).suffix.lower() in (".jpg", ".jpeg")
    how = (
        f"binarised at > {threshold}"
        if threshold is not None
        else ("JPEG masks binarised at > 127" if lossy else "read as class indices (0/255 or 0..K-1)")
    )
    return DataError(
        f"{n_empty} of {n_cases} cases have an empty mask once read ({how}; e.g. {example}). Likely label "
        f"values 0/1 saved in a lossy format (JPEG): set {option} 0 (foreground = any value above 0), or "
        f"save the masks losslessly (PNG). A dataset is refused when more than "
        f"{MAX_EMPTY_FRACTION:.0%} of its cases have no foreground."
    )


def _count_empty(empty: int, masks: np.ndarray, done: int, refs: list, threshold: int | None) -> int:
    """The count of empty cases with this one's `masks` added; raises `empty_masks_error` as cases come:
    early when the first EMPTY_CHECK_FROM cases are all empty, else once all `refs` are read."""
    empty += not masks.any()
    if (done == EMPTY_CHECK_FROM and empty == done) or done == len(refs):
        refused = empty_masks_error(empty, done, refs[0].label, threshold)
        if refused is not None:
            raise refused
    return empty


def read_volume_label(path: Path, dataset: str, class_names: tuple[str, ...] | list[str]) -> np.ndarray:
    """A label volume (D, H, W) as uint8 classes of `dataset`, validated (MetaImage or NIfTI; msd_prostate's
    two zones merged into the whole gland).

    Raises:
        DataError: unreadable, NaN or infinite voxels, or values beyond the classes.
    """
    path = Path(path)
    label = (
        read_metaimage(path, integers=True) if is_metaimage(path) else read_nifti(path, ndim=3, integers=True)
    )[0]
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"{path}: label has NaN or infinite voxels")
        np.rint(label, out=label)  # in place: a CT label volume can hold 10^8 voxels
    if dataset == "msd_prostate":
        label = label > 0  # whole gland = peripheral + transition zone
    in_range = label.size == 0 or (label.min() >= 0 and label.max() < len(class_names))
    bad = np.array([]) if in_range else np.setdiff1d(np.unique(label), np.arange(len(class_names)))
    if bad.size:
        shown = [int(v) if float(v).is_integer() else float(v) for v in bad[:10]]
        raise DataError(
            f"{path}: label values {shown}; expected 0..{len(class_names) - 1} ({list(class_names)})"
        )
    return label.astype(np.uint8, copy=False)


def read_fov(path: Path, shape: tuple[int, ...], image_name: str = "its image") -> np.ndarray:
    """A field-of-view mask as (H, W) bool (non-zero = inside), of the image's `shape`."""
    fov = read_label_image(Path(path)) > 0
    if fov.shape != tuple(shape[-2:]):
        raise DataError(
            f"{path}: FOV mask of size {fov.shape}; its image {image_name} is {tuple(shape[-2:])}"
        )
    return fov


def fov_sample(fov: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """The field of view as stored beside the sample (1, S, S) uint8: resized as labels (`resize_labels`,
    centres aligned), or padded into the native canvas (0 = outside)."""
    fov = fov.astype(np.uint8)
    if settings.native:
        out = np.zeros(settings.canvas, np.uint8)
        out[: fov.shape[0], : fov.shape[1]] = fov
        return out[None]
    return _resize(fov, settings.image_size, nearest=True)[None]


def read_label(
    path: Path,
    kind: str,
    dataset: str,
    class_names: tuple[str, ...] | list[str],
    mask_threshold: int | None = None,
) -> np.ndarray:
    """One case's ground truth as preprocessing reads it, at its original size: (H, W) for a 2-D image
    (`read_label_2d`, with meta.json's `mask_threshold`), (D, H, W) for a volume (`read_volume_label`).
    Evaluation scores against it."""
    if kind == "image":
        return read_label_2d(Path(path), len(class_names), mask_threshold)
    return read_volume_label(Path(path), dataset, class_names)


def load_case(ref: CaseRef, spec: DatasetSpec) -> RawCase:
    """Read and validate one case."""
    if spec.kind == "image":
        image = read_channels_2d(ref.image, spec.modality == "gray", spec.channel_files)
        label, grey_fraction = label_2d(ref.label, spec.num_classes, spec.mask_threshold)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"{ref.label}: mask size {label.shape} differs from image {ref.image.name} {image.shape[:2]}"
            )
        observer2 = None
        if ref.observer2 is not None:
            observer2 = read_label_2d(ref.observer2, spec.num_classes, spec.mask_threshold)
            if observer2.shape != label.shape:
                raise DataError(f"{ref.observer2}: size {observer2.shape} differs from {ref.label.name}")
        extra = {} if spec.mask_threshold is None else {"mask_grey_fraction": grey_fraction}
        fov = None if ref.fov is None else read_fov(ref.fov, label.shape, ref.image.name)
        return RawCase(ref.case_id, ref.group, image, label, None, observer2=observer2, extra=extra, fov=fov)
    volume, spacing, affine = read_channels_3d(ref.image, spec.channel_files, spec.in_channels, spec.title)
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise DataError(f"{ref.image}: volume has NaN or infinite voxels")
    label = read_volume_label(ref.label, spec.name, spec.class_names)
    if volume.shape[1:] != label.shape:
        raise DataError(
            f"{ref.image}: volume shape {volume.shape[1:]} differs from its label's {label.shape} ({ref.label.name})"
        )
    if affine is not None and not is_metaimage(ref.label):
        _check_same_space(ref, np.asarray(affine), nifti_affine(ref.label))
    return RawCase(ref.case_id, ref.group, volume, label, spacing, affine)


def read_channels_2d(image: Path, gray: bool, files: int = 1) -> np.ndarray:
    """A case's 2-D image as `load_case` reads it: (H, W, 3) RGB, (H, W) with `gray`, or from `files`
    M > 1 channel files (nnU-Net's <case>_0000.. files, `fetch.channel_files`) (H, W, M), one grey
    file per channel in file order.

    Raises:
        DataError: unreadable, a channel file missing, or channels of different sizes (naming the file).
    """
    try:
        files = channel_files(image, files)
    except FetchError as err:
        raise DataError(str(err)) from None
    if len(files) == 1:
        return read_image(image, gray=gray)
    planes = []
    for f in files:
        planes.append(read_image(f, gray=True))
        if planes[-1].shape != planes[0].shape:
            raise DataError(
                f"{f}: a channel of size {planes[-1].shape}; channel 0 ({files[0].name}) is {planes[0].shape}"
            )
    return np.stack(planes, axis=-1)


def read_channels_3d(
    image: Path, files: int, in_channels: int, title: str = "the dataset"
) -> tuple[np.ndarray, tuple | None, list | None]:
    """A case's volume as `load_case` reads it: (M, D, H, W) with its spacing and NIfTI affine (None for
    MetaImage). M = `in_channels` channels come from one 3-D file (M = 1), a 4-D NIfTI (msd_prostate's
    T2 + ADC), or `files` = M nnU-Net files <case>_0000.., one 3-D volume each, which must share shape
    and affine. `title` names who expects M in the error. Integers stay integers where the file stores them (a CT volume stays int16, half
    of float32, until windowed). Memory: the M channels of the case.

    Raises:
        DataError: unreadable, a channel file missing, or channels in different spaces (naming the file).
    """
    if is_metaimage(image):
        if files > 1:
            raise DataError(f"{image}: MetaImage channel files are not read; give NIfTI (.nii.gz) channels")
        volume, spacing = read_metaimage(image)
        return volume[None], spacing, None
    try:
        files = channel_files(image, files)
    except FetchError as err:
        raise DataError(str(err)) from None
    if len(files) > 1:
        channels, spacing, affine = [], None, None
        for f in files:
            volume, spacing_f, affine_f = read_nifti(f, ndim=3, with_affine=True, integers=True)
            if channels and (
                volume.shape != channels[0].shape or not np.allclose(affine_f, affine, atol=1e-3)
            ):
                raise DataError(
                    f"{f}: a channel of shape {volume.shape} and affine {np.round(affine_f, 3).tolist()}; "
                    f"channel 0 ({files[0].name}) has {channels[0].shape} and {np.round(affine, 3).tolist()}: "
                    "every channel of a case must lie in one space"
                )
            if not channels:
                spacing, affine = spacing_f, affine_f
            channels.append(volume)
        return np.stack(channels), spacing, affine
    ndim = 4 if in_channels > 1 else 3
    volume, spacing, affine = read_nifti(image, ndim=ndim, with_affine=True, integers=True)
    volume = volume if ndim == 4 else volume[None]
    if volume.shape[0] != in_channels:
        raise DataError(f"{image}: {volume.shape[0]} modalities; {title} expects {in_channels}")
    return volume, spacing, affine


def _check_same_space(ref: CaseRef, image_affine: np.ndarray, label_affine: np.ndarray) -> None:
    """Image and label must lie in one space: equal affines up to 1e-3 mm (float noise of writers)."""
    if not np.allclose(image_affine, label_affine, rtol=1e-4, atol=1e-3):
        raise DataError(
            f"{ref.label}: its affine {np.round(label_affine, 4).tolist()} differs from image "
            f"{ref.image.name}'s {np.round(image_affine, 4).tolist()}: the label is not in the image's "
            "space (resample it onto the image, e.g. with SimpleITK, and write it with the image's affine)"
        )


def n4_correct(volume: np.ndarray, spacing: tuple[float, ...], shrink: int = 4) -> np.ndarray:
    """N4 bias-field correction of a (D, H, W) MRI volume (SimpleITK); returns float32, same shape."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.maximum(volume, 0).astype(np.float32) + 1e-3)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK is (x, y, z)
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    factors = [shrink, shrink, 1] if volume.shape[0] < 4 * shrink else [shrink] * 3
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50] * 4)
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    corrected = image / sitk.Exp(log_bias)
    return sitk.GetArrayFromImage(corrected).astype(np.float32)


def intensity_window(volume: np.ndarray, modality: str, ct_window: tuple[float, float] = CT_WINDOW) -> tuple:
    """(low, high) of a volume's intensity window: the CT window, or the MRI volume's 0.5-99.5 percentiles."""
    if modality == "ct":
        return tuple(float(v) for v in ct_window)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    return float(lo), float(hi)


def to_uint8(
    volume: np.ndarray, modality: str, ct_window: tuple[float, float] = CT_WINDOW, window: tuple | None = None
) -> np.ndarray:
    """Intensity window of a CT or MRI volume (or one slice of it, with the volume's `window`), scaled
    to uint8."""
    lo, hi = window if window is not None else intensity_window(volume, modality, ct_window)
    scaled = (np.clip(volume.astype(np.float32, copy=False), lo, hi) - lo) / max(hi - lo, 1e-6)
    return np.rint(scaled * 255).astype(np.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map (H, W) (class indices of any value, or a bool mask) resized to `size` = (h, w), pixel
    centres aligned: output pixel x takes the source pixel nearest its centre, (x + 0.5) * H / h - 0.5
    in source pixel indices (either one at an exact tie), where the image's area resize is centred too;
    cv2.INTER_NEAREST_EXACT, down and up. Rule (METHOD.md section 3): never OpenCV's plain INTER_NEAREST,
    which takes floor(x * H / h) and shifts the labels half an output pixel off the image; a perfect
    model of CHASE_DB1's 28 vessel masks stored at 256 scored 0.727 mean Dice at 999x960 that way, 0.861
    aligned (benchmarks/label_resize.py). Memory: the output only.
    """
    if labels.shape[:2] == tuple(size):
        return labels
    return cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def _resize(image: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """An image (area interpolation) or, with `nearest`, a label map (masks, the second observer's,
    field-of-view masks: `resize_labels`, centres aligned) resized to size x size."""
    if nearest:
        return resize_labels(image, (size, size))
    if image.shape[:2] == (size, size):
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def case_samples(
    case: RawCase, spec: DatasetSpec, settings: PreprocessSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resized samples of one case: images (n, C, S, S) uint8, masks (n, S, S) uint8, observer-2 masks."""
    size = settings.image_size
    clahe = cv2.createCLAHE(clipLimit=settings.clahe_clip, tileGridSize=(8, 8))
    if settings.native:
        return _native_samples(case, spec, settings, clahe)
    if spec.kind == "image":
        image = _resize(case.image, size, nearest=False)
        image = image if image.ndim == 3 else image[..., None]
        if spec.modality == "gray":
            image = _clahe_channels(image, clahe, spec.in_channels)
        second = None if case.observer2 is None else _resize(case.observer2, size, nearest=True)[None]
        return image.transpose(2, 0, 1)[None], _resize(case.label, size, nearest=True)[None], second
    channels = []
    for m, volume in enumerate(case.image):
        first = m not in spec.quantitative_channels  # a weighted image, not msd_prostate's ADC (channel 1)
        if spec.modality == "mri" and settings.n4 and first:
            volume = n4_correct(volume, case.spacing or (1.0, 1.0, 1.0))
        window = intensity_window(volume, spec.modality, settings.ct_window)
        # slice by slice: the float temporaries of the window are one slice, not the volume
        resized = [_resize(to_uint8(s, spec.modality, window=window), size, nearest=False) for s in volume]
        channels.append(np.stack([clahe.apply(s) if first else s for s in resized]))
    images = np.stack(channels, axis=1)  # (D, M, S, S)
    masks = np.stack([_resize(s, size, nearest=True) for s in case.label])
    return images, masks, None


def _native_samples(case: RawCase, spec: DatasetSpec, settings: PreprocessSettings, clahe) -> tuple:
    """A 2-D image at its own size (CLAHE for grayscale), padded with zeros at the bottom and right
    into the dataset's canvas; its own size is meta.json's cases[c].shape."""
    if spec.kind != "image":
        raise DataError(f"{case.case_id}: data.image_size native is for 2-D images; {spec.title} has volumes")
    image = case.image if case.image.ndim == 3 else case.image[..., None]
    if spec.modality == "gray":
        image = _clahe_channels(image, clahe, spec.in_channels)
    h, w = image.shape[:2]
    ch, cw = settings.canvas
    if h > ch or w > cw:
        raise DataError(f"{case.case_id}: image of {h}x{w} does not fit the canvas {ch}x{cw}")

    def pad(a: np.ndarray) -> np.ndarray:
        out = np.zeros((ch, cw, *a.shape[2:]), np.uint8)
        out[:h, :w] = a
        return out

    second = None if case.observer2 is None else pad(case.observer2)[None]
    return pad(image).transpose(2, 0, 1)[None], pad(case.label)[None], second


def _clahe_channels(image: np.ndarray, clahe, channels: int) -> np.ndarray:
    """CLAHE of each of the first `channels` planes of a grey (H, W, C) image (C = 3 for a grey file
    read as RGB: its first plane stands for all) -> (H, W, channels) uint8."""
    return np.stack([clahe.apply(np.ascontiguousarray(image[..., c])) for c in range(channels)], axis=-1)


def native_canvas(refs: list[CaseRef]) -> tuple[int, int]:
    """The largest (H, W) of the images, each rounded up to a multiple of 16 (image headers only)."""
    from PIL import Image

    h = w = 16
    for ref in refs:
        try:
            with Image.open(ref.image) as im:
                width, height = im.size
        except Image.DecompressionBombError as err:
            raise DataError(f"{ref.image}: {err} ({MAX_PIXELS_HOW})") from None
        except OSError as err:
            raise DataError(f"{ref.image}: unreadable image ({err})") from err
        h, w = max(h, -(-height // 16) * 16), max(w, -(-width // 16) * 16)
    return h, w


def _work(args: tuple[CaseRef, DatasetSpec, PreprocessSettings]) -> tuple:
    ref, spec, settings = args  # no cv2.setNumThreads here: in a forked child it can hang
    case = load_case(ref, spec)
    images, masks, second = case_samples(case, spec, settings)
    fov = None if case.fov is None else fov_sample(case.fov, settings)
    info = {
        "shape": list(case.label.shape),
        "spacing": None if case.spacing is None else list(case.spacing),
        "affine": case.affine,
        "group": case.group,
        **case.extra,
    }
    return ref.case_id, images, masks, (second, fov), info


def rebuild_volume(slices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Slices (D, S, S) of class labels back to the case's original (D, H, W), each by `resize_labels`
    (pixel centres aligned, never plain nearest). Memory: the output and one uint8 copy of the slices."""
    if slices.shape[0] != shape[0]:
        raise DataError(f"{slices.shape[0]} slices for a volume of depth {shape[0]}")
    out = np.stack([resize_labels(s, (shape[1], shape[2])) for s in slices.astype(np.uint8)])
    return out.astype(slices.dtype)


def preprocess_dataset(
    name: str,
    raw_dir: Path,
    out_dir: Path,
    image_size: int | PreprocessSettings,
    custom: dict | None = None,
    workers: int = 1,
) -> dict:
    """Write data/processed/<name> from data/raw/<name>; returns meta.json's content.

    Args:
        image_size: S, or the full PreprocessSettings.
        custom: params.yaml's data.custom (the `custom` dataset's description).
        workers: processes reading and resizing cases (0 = one per CPU core); the output does not
            depend on it.
    """
    spec = dataset_spec(name, custom)
    settings = image_size if isinstance(image_size, PreprocessSettings) else PreprocessSettings(image_size)
    if custom and spec.custom:
        settings = PreprocessSettings(**{**settings.__dict__, "group_pattern": custom.get("group_pattern")})
    out_dir = Path(out_dir)
    try:
        refs = case_refs(spec, Path(raw_dir), settings.group_pattern)
    except FetchError as err:  # the layout of data/raw changed since the fetch (a mask deleted, ...)
        raise DataError(str(err)) from err
    if not refs:
        raise DataError(f"{raw_dir}: no cases found for {name}")
    if settings.native:
        if spec.kind != "image":
            raise DataError(
                f"data.image_size native is for 2-D images; {spec.title} ({name}) has volumes: set a size (e.g. 256)"
            )
        settings = dataclasses.replace(settings, canvas=native_canvas(refs))
    workers = min(workers or os.cpu_count() or 1, len(refs))
    jobs = [(ref, spec, settings) for ref in refs]
    label_files = {ref.case_id: os.path.relpath(ref.label, raw_dir) for ref in refs}
    fov_files = {ref.case_id: os.path.relpath(ref.fov, raw_dir) for ref in refs if ref.fov is not None}
    cases, per_case, empty_cases, observers = [], {}, 0, []
    with atomic_dir(out_dir) as tmp:
        names = ("images.npy", "masks.npy", "observer2.npy", "fov.npy")
        writers = {name: _StackWriter(tmp / name) for name in names}
        with (
            _discard_on_error(writers.values()),
            multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _Serial() as pool,
            tqdm(total=len(refs), desc=f"preprocess {name}", unit="case") as bar,
        ):
            for case_id, imgs, msks, (second, fov), info in pool.imap(_work, jobs, chunksize=4):
                writers["images.npy"].write(imgs)  # written as it comes: memory is one case, not the dataset
                writers["masks.npy"].write(msks)
                if fov is not None:
                    writers["fov.npy"].write(fov)
                if second is not None:
                    writers["observer2.npy"].write(second)
                    observers += _observer_dices(msks, second)
                group = info.pop("group")
                for k, mask in enumerate(msks):
                    cases.append(
                        {
                            "case_id": case_id,
                            "group": group,
                            "slice": k if spec.kind == "volume" else None,
                            "empty": not bool(mask.any()),
                        }
                    )
                per_case[case_id] = {**info, "label": label_files[case_id]}
                if case_id in fov_files:  # scored inside it (evaluation reads it from the raw copy)
                    per_case[case_id]["fov"] = fov_files[case_id]
                bar.update()
                empty_cases = _count_empty(empty_cases, msks, len(per_case), refs, spec.mask_threshold)
        digest = hashlib.sha256()
        for writer in writers.values():
            writer.close(digest)
        meta = _meta(name, spec, settings, cases, per_case, empty_cases)
        meta["raw_dir"] = str(raw_dir)
        meta["sha256"] = digest.hexdigest()
        if observers:
            meta["inter_observer_dice"] = float(np.mean(observers))
        write_json(tmp / "cases.json", cases)
        write_json(tmp / "meta.json", meta)
    return meta


def _meta(
    name: str,
    spec: DatasetSpec,
    settings: PreprocessSettings,
    cases: list[dict],
    per_case: dict,
    empty_cases: int,
) -> dict:
    """meta.json (without its sha256): what the processed arrays hold and how they were made."""
    return {
        "dataset": name,
        "title": spec.title,
        "kind": spec.kind,
        "image_size": settings.image_size,
        **({"canvas": list(settings.canvas)} if settings.native else {}),
        "in_channels": spec.in_channels,
        "modalities": spec.modalities,
        "modality": spec.modality,
        **({"channel_files": spec.channel_files} if spec.channel_files > 1 else {}),
        "class_names": list(spec.class_names),
        "regions": spec.scored_regions(),  # what evaluation scores (LiTS: liver = labels 1-2, tumour = 2)
        "num_samples": len(cases),
        "num_cases": len(per_case),
        "num_groups": len({c["group"] for c in cases}),
        "empty_samples": sum(c["empty"] for c in cases),
        "empty_cases": empty_cases,
        "intensity": {
            "n4": settings.n4 and spec.modality == "mri",
            "ct_window": list(settings.ct_window) if spec.modality == "ct" else None,
            "clahe_clip": settings.clahe_clip if spec.modality in ("gray", "ct", "mri") else None,
        },
        "spacing_unit": "mm" if spec.kind == "volume" else None,
        **_mask_threshold_meta(spec, per_case),
        **({"roi": "fov"} if any("fov" in info for info in per_case.values()) else {}),
        "cases": per_case,
    }


def _mask_threshold_meta(spec: DatasetSpec, per_case: dict) -> dict:
    """meta.json's record of data.custom.mask_threshold: the threshold and the fraction of all mask
    pixels that were grey (neither 0 nor 255) before binarising; each case keeps its own fraction."""
    if spec.mask_threshold is None:
        return {}
    pixels = grey = 0.0
    for info in per_case.values():
        n = float(np.prod(info["shape"]))
        pixels, grey = pixels + n, grey + n * info.get("mask_grey_fraction", 0.0)
    return {"mask_threshold": spec.mask_threshold, "mask_grey_fraction": grey / pixels if pixels else 0.0}


class _Serial:
    """Pool stand-in for workers = 1 (no processes, easier debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


@contextlib.contextmanager
def _discard_on_error(writers):
    try:
        yield
    except BaseException:
        for writer in writers:
            writer.discard()
        raise


class _StackWriter:
    """A .npy file of uint8 samples (N, ...) filled block by block, N known only at the end: the data
    go after a fixed 256-byte header, rewritten with the final shape at `close`. Memory: one block.
    A writer that received nothing writes no file."""

    HEADER = 256  # bytes, a multiple of 64 as the .npy format asks; room for any shape of 4 ints

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.count, self.tail = Path(path), None, 0, None

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.uint8)
        if self.file is None:
            self.file, self.tail = open(self.path, "wb"), block.shape[1:]
            self.file.write(b"\0" * self.HEADER)
        if block.shape[1:] != self.tail:
            raise DataError(
                f"{self.path.name}: a sample of shape {block.shape[1:]} after samples of {self.tail}"
            )
        self.file.write(block.tobytes())
        self.count += len(block)

    def discard(self) -> None:
        """Close the file after an error (the temp folder it is in is removed by `atomic_dir`)."""
        if self.file is not None and not self.file.closed:
            self.file.close()

    def close(self, digest) -> None:
        """Write the header; feed the data (as stored, in order) to `digest`."""
        if self.file is None:
            return
        shape = (self.count, *self.tail)
        text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        text = text.ljust(self.HEADER - 10 - 1) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1"))
        self.file.close()
        with open(self.path, "rb") as f:  # re-read in order: the digest is that of the arrays' bytes
            f.seek(self.HEADER)
            while chunk := f.read(1 << 24):
                digest.update(chunk)


def _observer_dices(first: np.ndarray, second: np.ndarray) -> list[float]:
    """Per image, the Dice between the two observers at the processed resolution (CHASE_DB1)."""
    scores = []
    for a, b in zip(first, second, strict=True):
        inter = float(np.logical_and(a == 1, b == 1).sum())
        total = float((a == 1).sum() + (b == 1).sum())
        scores.append(1.0 if total == 0 else 2 * inter / total)
    return scores
