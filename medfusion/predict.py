"""Segment new images with a trained run: `medfusion predict --run PATH INPUT... --out DIR`.

The pixels the model sees are made as in training: `preprocess.case_samples` (resize to S x S with
area interpolation; CLAHE for grayscale; CT window or MRI percentiles + N4 and CLAHE per slice), then
`dataset.zscore` per image or slice. With several checkpoints (every fold x seed of a run directory)
the prediction is the argmax of the mean of their softmax probabilities.

How the training data was preprocessed, in order of preference:
    1. `--processed-meta PATH`: the processed dataset's meta.json, given explicitly;
    2. the checkpoint's `preprocess` dict {image_size, modality, in_channels, ct_window, clahe_clip, n4};
    3. data/processed/<dataset>/meta.json next to data/runs/<dataset>/<model> (the DVC layout);
    4. for RGB datasets of the registry, nothing is needed (RGB images get no intensity step).

Outputs in the output folder, per input <stem>:
    <stem>_mask.png       2-D input: uint8 class indices 0..K-1 (not scaled: a binary mask looks black
                          in a viewer; use --overlay to look at it), the input's width and height.
    <stem>_mask.nii.gz    NIfTI input: uint8 class indices, the input's shape and affine (so its spacing),
                          in its own voxel order (read reoriented to RAS+, written back: `io.from_canonical`).
    <stem>_overlay.png    with --overlay, 2-D: the input with the classes in colour.
    <stem>_overlay_slice<k>.png   with --overlay, volumes: axial slice k, the one with the largest
                          predicted foreground (the middle one when nothing is found).
    <stem>_probs.npy      with --save-probabilities: float16 softmax probabilities (K, H, W), or
                          (K, D, H, W) for a volume, at the input's size (the ensemble's, after TTA).
Masks are made at the input's size: the probabilities are resized back (`medfusion.resample`, the
function evaluation scores with), then the argmax taken, and then the post-processing the run's
evaluation chose on validation (`eval.json`: the ensemble's settings for a run folder, the run's own
for one checkpoint) so that the masks are those the tables' "post" rows scored (`--no-postprocess`:
the raw argmax). Inputs may be files or folders (every image or NIfTI file in them, sorted);
`--folds 0,2` keeps the runs of those folds; `--tta flip` averages each model's probabilities over
the image and its left-right, up-down and double flips (flipped back).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medfusion.common import UserError
from medfusion.data.dataset import zscore
from medfusion.data.fetch import NIFTI_SUFFIXES, FetchError, channel_case, channel_files, file_stem
from medfusion.data.io import (
    IMAGE_SUFFIXES,
    DataError,
    from_canonical,
    read_image,
    read_json,
    read_nifti,
    write_nifti,
    write_png,
)
from medfusion.data.preprocess import (
    CT_WINDOW,
    PreprocessSettings,
    RawCase,
    case_samples,
    read_channels_2d,
    read_channels_3d,
    to_uint8,
)
from medfusion.data.registry import DATASETS, DatasetSpec
from medfusion.evaluation import postprocess_of
from medfusion.hardware import Precision, out_of_memory_explained
from medfusion.inference.checkpoint import load_checkpoint
from medfusion.inference.window import infer_probs
from medfusion.postprocess import PostProcess
from medfusion.postprocess import apply as apply_postprocess
from medfusion.resample import labels_at, slices_at

# overlay colours of classes 1, 2, ... (RGB); background is left as is
CLASS_COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 128, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], dtype=np.float32
)


class PredictError(UserError, ValueError):
    """A run or checkpoint that cannot be used for prediction (stops the command)."""


@dataclass(frozen=True)
class Preprocessing:
    """How the model's training images were preprocessed, and where that was read from."""

    image_size: int | str  # S, or "native" (2-D images at their own size, by sliding window)
    modality: str  # rgb | gray (2-D images), ct | mri (volumes)
    in_channels: int
    ct_window: tuple[float, float] | None
    clahe_clip: float | None
    n4: bool
    source: str
    quantitative: tuple[int, ...] = ()  # channels without N4/CLAHE (DatasetSpec.quantitative_channels)

    @property
    def kind(self) -> str:
        return "image" if self.modality in ("rgb", "gray") else "volume"

    @property
    def native(self) -> bool:
        return self.image_size == "native"

    def settings(self, canvas: tuple[int, int] | None = None) -> PreprocessSettings:
        return PreprocessSettings(
            self.image_size,
            canvas=canvas,
            n4=self.n4,
            ct_window=tuple(self.ct_window) if self.ct_window else CT_WINDOW,
            clahe_clip=self.clahe_clip or 2.0,  # unused where None (RGB)
        )


@dataclass
class Ensemble:
    """The loaded checkpoints of one run; they share inputs, classes and preprocessing."""

    models: list[torch.nn.Module]
    paths: list[Path]
    num_classes: int
    dataset: str
    preprocessing: Preprocessing
    precision: Precision
    patch_size: int | None = None  # native images: the sliding window's side
    tta: str = "none"  # none | flip: test-time augmentation of every model (`ensemble_probs`)


def find_checkpoints(run: Path, folds: list[int] | None = None) -> list[Path]:
    """`run` itself (a model.pt), run/model.pt (one fold's folder) or every run/fold*/model.pt
    (those of `folds` only, when given)."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise PredictError(f"--run {run}: no such file or directory")
    if (run / "model.pt").is_file():
        return [run / "model.pt"]
    found = sorted(run.glob("fold*/model.pt"))
    if not found:
        raise PredictError(
            f"--run {run}: no checkpoints; expected fold*/model.pt (a trained data/runs/<dataset>/<model>) "
            "or the path of a model.pt"
        )
    if folds is not None:
        kept = [p for p in found if _fold_of(p.parent.name) in set(folds)]
        if not kept:
            have = sorted({_fold_of(p.parent.name) for p in found} - {None})
            raise PredictError(f"--folds {folds}: {run} has runs of folds {have} only")
        return kept
    return found


def _fold_of(name: str) -> int | None:
    """fold0_seed1 -> 0; None for other names."""
    head = name.split("_")[0]
    return int(head[4:]) if head.startswith("fold") and head[4:].isdigit() else None


def preprocessing_from_meta(meta_path: Path, checkpoint: dict) -> Preprocessing:
    """The preprocessing recorded in a processed dataset's meta.json, checked against the checkpoint."""
    try:
        meta = read_json(meta_path)
    except DataError as err:
        raise PredictError(str(err)) from None
    try:
        intensity = meta["intensity"]
        prep = Preprocessing(
            _size(meta["image_size"]),
            meta["modality"],
            int(meta["in_channels"]),
            intensity["ct_window"],
            intensity["clahe_clip"],
            bool(intensity["n4"]),
            str(meta_path),
        )
    except (KeyError, TypeError) as err:
        raise PredictError(f"{meta_path}: not a processed dataset's meta.json (no {err})") from None
    if meta.get("dataset") != checkpoint.get("dataset"):
        raise PredictError(
            f"{meta_path}: describes dataset {meta.get('dataset')!r}; the model was trained on "
            f"{checkpoint.get('dataset')!r}"
        )
    for key in ("image_size", "in_channels"):
        if getattr(prep, key) != checkpoint[key]:
            raise PredictError(
                f"{meta_path}: {key} {getattr(prep, key)}; the checkpoint says {checkpoint[key]} "
                "(data/processed was rebuilt with other settings after training?)"
            )
    return prep


def resolve_preprocessing(
    checkpoint: dict, checkpoint_path: Path, processed_meta: Path | None = None
) -> Preprocessing:
    """The training preprocessing of `checkpoint` (see the module docstring for the order), with the
    registry's quantitative channels of its dataset (msd_prostate's ADC: no N4 or CLAHE)."""
    prep = _recorded_preprocessing(checkpoint, checkpoint_path, processed_meta)
    spec = DATASETS.get(str(checkpoint.get("dataset")))
    if spec is not None and spec.quantitative_channels:
        prep = dataclasses.replace(prep, quantitative=spec.quantitative_channels)
    return prep


def _recorded_preprocessing(
    checkpoint: dict, checkpoint_path: Path, processed_meta: Path | None = None
) -> Preprocessing:
    """The preprocessing the checkpoint, its processed meta.json or the registry records."""
    if processed_meta is not None:
        return preprocessing_from_meta(Path(processed_meta), checkpoint)
    if "preprocess" in checkpoint:
        p = checkpoint["preprocess"]
        window = tuple(p["ct_window"]) if p.get("ct_window") else None
        return Preprocessing(
            _size(p["image_size"]),
            p["modality"],
            int(p["in_channels"]),
            window,
            p.get("clahe_clip"),
            bool(p.get("n4")),
            f"{checkpoint_path} (preprocess)",
        )
    dataset = checkpoint.get("dataset")
    model_dir = _model_dir(Path(checkpoint_path))
    meta_path = model_dir.parent.parent.parent / "processed" / str(dataset) / "meta.json"
    if meta_path.is_file():  # data/runs/<dataset>/<model> -> data/processed/<dataset>/meta.json
        return preprocessing_from_meta(meta_path, checkpoint)
    spec: DatasetSpec | None = DATASETS.get(str(dataset))
    if spec is not None and spec.modality == "rgb":
        return Preprocessing(
            checkpoint["image_size"], "rgb", spec.in_channels, None, None, False, f"registry ({dataset})"
        )
    raise PredictError(
        f"{checkpoint_path}: the checkpoint does not record how dataset {dataset!r} was preprocessed and "
        f"{meta_path} does not exist; pass --processed-meta data/processed/{dataset}/meta.json"
    )


def load_ensemble(
    run: Path,
    precision: Precision,
    processed_meta: Path | None = None,
    folds: list[int] | None = None,
    tta: str = "none",
) -> Ensemble:
    """Load every checkpoint of `run` (see `find_checkpoints`) and the preprocessing they expect."""
    if tta not in TTA_MODES:
        raise PredictError(f"--tta {tta!r}; expected one of {list(TTA_MODES)}")
    paths = find_checkpoints(run, folds)
    models, checkpoints = [], []
    for path in paths:
        try:
            model, checkpoint = load_checkpoint(path, precision)
        except KeyError as err:
            raise PredictError(f"{path}: not a medfusion checkpoint (no {err} entry)") from None
        except (ValueError, RuntimeError) as err:  # unreadable, or weights that do not fit the model
            raise PredictError(
                str(err) if str(path) in str(err) else f"{path}: cannot load ({err})"
            ) from None
        models.append(model)
        checkpoints.append(checkpoint)
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        for key in ("dataset", "in_channels", "num_classes", "image_size", "preprocess"):
            if checkpoint.get(key) != first.get(key):
                raise PredictError(
                    f"{path}: {key} {checkpoint.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}; "
                    "an ensemble needs checkpoints of one dataset and model"
                )
    prep = resolve_preprocessing(first, paths[0], processed_meta)
    return Ensemble(
        models,
        paths,
        first["num_classes"],
        first.get("dataset", "?"),
        prep,
        precision,
        first.get("patch_size"),
        tta,
    )


TTA_MODES = ("none", "flip")


def _model_dir(checkpoint: Path) -> Path:
    """data/runs/<dataset>/<model> of a checkpoint: the folder above its fold*/ (or its own folder)."""
    fold_dir = checkpoint.resolve().parent
    return fold_dir.parent if fold_dir.name.startswith("fold") else fold_dir


def model_dir_of(ensemble: Ensemble) -> Path:
    """data/runs/<dataset>/<model> of the ensemble's checkpoints (the folder above fold*/)."""
    return _model_dir(ensemble.paths[0])


def chosen_postprocess(ensemble: Ensemble, eval_json: Path | None = None) -> dict[str, PostProcess]:
    """{run or 'ensemble': the post-processing chosen on validation} from the run's eval.json
    (`eval_json`, else data/eval/<dataset>/<model>/eval.json beside data/runs/<dataset>/<model>);
    {} where there is none."""
    if eval_json is None:
        model_dir = model_dir_of(ensemble)
        eval_json = (
            model_dir.parent.parent.parent / "eval" / model_dir.parent.name / model_dir.name / "eval.json"
        )
        if not eval_json.is_file():
            return {}
    try:
        records = read_json(Path(eval_json))["postprocess"]
        return {run: postprocess_of(r) for run, r in records.items()}
    except (KeyError, TypeError, DataError) as err:
        raise PredictError(
            f"{eval_json}: not an evaluation's eval.json with its post-processing ({err})"
        ) from None


def ensemble_postprocess(ensemble: Ensemble, chosen: dict[str, PostProcess]) -> PostProcess | None:
    """The settings that apply to the ensemble's prediction: the fold ensemble's for several
    checkpoints, the run's own for one; None where the evaluation recorded none for it."""
    if len(ensemble.paths) > 1:
        every = {p.parent.name for p in find_checkpoints(model_dir_of(ensemble))}
        # the recorded ensemble is that of every run: a --folds subset has no recorded choice
        return chosen.get("ensemble") if {p.parent.name for p in ensemble.paths} == every else None
    return chosen.get(ensemble.paths[0].parent.name)


def _size(value) -> int | str:
    return value if value == "native" else int(value)


def takes_channel_files(prep: Preprocessing | None) -> bool:
    """Whether a model's inputs may come as nnU-Net channel files: several grey or volume channels
    (an RGB model's image is one file, whatever its name)."""
    return prep is not None and prep.in_channels > 1 and prep.modality != "rgb"


def output_stem(path: Path, prep: Preprocessing | None = None) -> str:
    """The outputs' name of an input: its name without suffix, and without _0000 for a case given as
    nnU-Net channel files (<case>_0000<ending> with <case>_0001<ending> beside it)."""
    name = Path(path).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    return (channel_case(Path(path)) if takes_channel_files(prep) else None) or stem


def input_files(path: Path, prep: Preprocessing) -> list[Path]:
    """The files of one input: [path], or for a model of several channels a case given as nnU-Net
    channel files: <case>_0000<ending> (the `path` named) with <case>_0001<ending>, ... beside it, one
    grey image or 3-D volume per channel. A volume model of several channels also takes one 4-D NIfTI.

    Raises:
        DataError: a grey model of several channels given one file, or a channel file missing."""
    path = Path(path)
    if not takes_channel_files(prep):
        return [path]
    if channel_case(path) is not None:
        try:
            return channel_files(path, prep.in_channels)
        except FetchError as err:
            raise DataError(str(err)) from None
    if prep.kind == "image":
        raise DataError(
            f"{path}: the model takes {prep.in_channels} grey channels, one file each: give "
            "<case>_0000<ending> with <case>_0001<ending>, ... beside it (nnU-Net's naming)"
        )
    return [path]  # a 4-D NIfTI


def read_input(path: Path, prep: Preprocessing) -> RawCase:
    """One input as a RawCase (zero label) for `case_samples`; DataError names the file and the problem.

    2-D: (H, W, 3) RGB, or (H, W) for a 1-channel model (refused when the image has colour: the model
    saw grayscale). A grayscale image for an RGB model is repeated to 3 channels, as training reads it.
    NIfTI: (M, D, H, W) with spacing and affine; 3-D for a 1-channel model, 4-D (x, y, z, M) otherwise.
    A model of M > 1 grey channels or volumes also takes nnU-Net's channel files (`input_files`).
    """
    path = Path(path)
    name = path.name.lower()
    is_nifti = name.endswith(NIFTI_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not is_nifti and not name.endswith(IMAGE_SUFFIXES):
        raise DataError(
            f"{path}: unsupported file type; expected {', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)}"
        )
    trained_on = f"{prep.modality} {'2-D images' if prep.kind == 'image' else 'volumes'}"
    if is_nifti and prep.kind == "image":
        raise DataError(
            f"{path}: a NIfTI volume, but the model was trained on {trained_on}; give a 2-D image file"
        )
    if not is_nifti and prep.kind == "volume":
        raise DataError(f"{path}: a 2-D image, but the model was trained on {trained_on}; give NIfTI")
    files = len(input_files(path, prep))
    if not is_nifti:
        image = read_image(path) if files == 1 else read_channels_2d(path, True, files)  # (H, W, 3 | M)
        return _image_case(image, prep, path.name, str(path), DataError)
    if files > 1:
        volume, spacing, affine = read_channels_3d(path, files, prep.in_channels, "the model")
        return _volume_case(volume, prep, path.name, str(path), DataError, spacing, affine)
    ndim = 3 if prep.in_channels == 1 else 4
    volume, spacing, affine = read_nifti(path, ndim=ndim, with_affine=True)
    volume = volume[None] if ndim == 3 else volume  # (M, D, H, W)
    return _volume_case(volume, prep, path.name, str(path), DataError, spacing, affine)


def _image_case(image: np.ndarray, prep: Preprocessing, case_id: str, where: str, error: type) -> RawCase:
    """A 2-D image (H, W, 3) or (H, W) in the channels the model takes: one channel only from a grey
    image (`error` naming `where` for a colour one), a grey image repeated to 3 channels as training
    reads it."""
    if prep.in_channels == 1 and image.ndim == 3:
        if not (
            np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
        ):
            raise error(f"{where}: a colour image, but the model takes 1 channel (grayscale)")
        image = image[..., 0]
    if prep.in_channels == 3 and image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if prep.in_channels not in (1, 3) and (image.ndim != 3 or image.shape[-1] != prep.in_channels):
        raise error(
            f"{where}: {image.shape[-1] if image.ndim == 3 else 1} channels; the model takes {prep.in_channels}"
        )
    return RawCase(case_id, case_id, image, np.zeros(image.shape[:2], np.uint8), None)


def _volume_case(
    volume, prep: Preprocessing, case_id: str, where: str, error: type, spacing=None, affine=None
):
    """A volume (M, D, H, W) checked against the model's modalities and for non-finite voxels."""
    if volume.shape[0] != prep.in_channels:
        raise error(f"{where}: {volume.shape[0]} modalities; the model takes {prep.in_channels}")
    if not np.isfinite(volume).all():
        raise error(f"{where}: volume has NaN or infinite voxels")
    return RawCase(case_id, case_id, volume, np.zeros(volume.shape[1:], np.uint8), spacing, affine)


def model_inputs(case: RawCase, prep: Preprocessing) -> np.ndarray:
    """(n, C, S, S) float32: the case's image or slices exactly as training fed them to the model."""
    spec = DatasetSpec(
        name="predict",
        title="predict",
        kind=prep.kind,
        in_channels=prep.in_channels,
        class_names=("background",),  # no labels at prediction time: case_samples resizes an all-zero one
        modality=prep.modality,
        url=None,
        checksum=None,
        access="",
        test_rule="",
        quantitative_channels=prep.quantitative,
    )
    if prep.native:  # the image at its size, padded to a multiple of 16 with the z-scored mean (0)
        h, w = case.image.shape[:2]
        canvas = (-(-h // 16) * 16, -(-w // 16) * 16)
        images, _, _ = case_samples(case, spec, prep.settings(canvas))
        stats = (float(images[0, :, :h, :w].mean()), float(images[0, :, :h, :w].std()))
        out = zscore(images[0], stats)
        out[:, h:, :], out[:, :, w:] = 0, 0
        return out[None]
    images, _, _ = case_samples(case, spec, prep.settings())  # (n, C, S, S) uint8
    return np.stack([zscore(image) for image in images])


def ensemble_probs(
    models: list[torch.nn.Module],
    images: torch.Tensor,
    precision: Precision,
    patch: int | None = None,
    tta: str = "none",
) -> torch.Tensor:
    """Mean softmax probabilities (B, K, S, S) of `models` on `images` (B, C, S, S); by sliding
    window of `patch` for native images (`inference.window.infer_probs`, as evaluation predicts).
    `tta` "flip": each model also sees the images flipped left-right, up-down and both (the group of
    the two mirrorings, so the result is equivariant to either flip), its outputs flipped back, and
    the four are averaged (before the mean over models)."""
    total = None
    for model in models:
        p = infer_probs(model, images, precision, patch, tta)
        total = p if total is None else total + p
    return total / len(models)


def predict_case_probs(ensemble: Ensemble, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The ensemble's mean probabilities of one case's samples: (n, C, S, S) float32 -> (K, n, S, S)
    float32 (a volume's slices on axis 1)."""
    probs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size])
        device = ensemble.precision.device
        with out_of_memory_explained(
            "prediction", batch, ensemble.models[0], device, "--batch-size", None, "--device"
        ):
            probs.append(
                ensemble_probs(
                    ensemble.models, batch, ensemble.precision, ensemble.patch_size, ensemble.tta
                ).numpy()
            )
    return np.concatenate(probs).transpose(1, 0, 2, 3)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 image with class c > 0 of `mask` (H, W) blended in colour c."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.astype(np.float32)
    for c in range(1, int(mask.max(initial=0)) + 1):
        hit = mask == c
        out[hit] = (1 - alpha) * out[hit] + alpha * CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
    return np.rint(out).astype(np.uint8)


@dataclass(frozen=True)
class Outputs:
    """What `predict_file` writes besides the mask, and the post-processing applied to it (None: argmax)."""

    overlay: bool = False
    probabilities: bool = False
    postprocess: PostProcess | None = None


def _mask_of(probs: np.ndarray, shape: tuple[int, ...], postprocess: PostProcess | None) -> np.ndarray:
    """Labels at `shape`: the argmax after the resize, then the chosen post-processing (as evaluation)."""
    return labels_at(probs, shape) if postprocess is None else apply_postprocess(postprocess, probs, shape)


def _save_probabilities(
    path: Path, probs: np.ndarray, shape: tuple[int, ...], affine: list | None = None
) -> None:
    """(K, [D,] H, W) float16 probabilities at the input's `shape` (a volume's in its file's own axes,
    as its mask: `affine`), written whole (temp file + rename)."""
    out = np.empty((probs.shape[0], *shape), np.float16)
    for k, p in enumerate(slices_at(probs, shape)):
        out[(slice(None), k) if len(shape) == 3 else slice(None)] = p
    if affine is not None:
        out = np.stack([from_canonical(c, affine) for c in out])
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)


def case_mask(
    ensemble: Ensemble, case: RawCase, postprocess: PostProcess | None, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, probabilities) of one case at its own size: uint8 labels (H, W) or (D, H, W), and the
    ensemble's probabilities (K, H', W') of an image or (K, D, S, S) of a volume's slices. What
    `predict_file` writes and the MLflow model (`medfusion.mlflow_model`) returns."""
    prep = ensemble.preprocessing
    probs = predict_case_probs(ensemble, model_inputs(case, prep), batch_size)  # (K, n, S, S)
    if prep.kind == "volume":
        return _mask_of(probs, case.label.shape, postprocess), probs  # each slice resized in-plane
    h, w = case.image.shape[:2]
    if prep.native:  # predicted at its own size: only the padding goes
        probs = probs[..., :h, :w]
    probs = probs[:, 0]
    return _mask_of(probs, (h, w), postprocess), probs  # as evaluation scores: probabilities resized


def array_case(array: np.ndarray, prep: Preprocessing, name: str = "array") -> RawCase:
    """An in-memory input as `read_input` makes a file's: a 2-D image (H, W, 3) or (H, W) uint8 (or
    (H, W, M) for a model of M grey channels), or a
    volume (D, H, W) (or (M, D, H, W) for M modalities) in its stored units (CT: HU), axial slices
    first, spacing unknown. The same checks of channels as for files; PredictError names the problem."""
    array = np.asarray(array)
    if prep.kind == "image":
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        planes = {3, prep.in_channels}  # RGB, or a grey model's channels (H, W, M)
        if (
            array.dtype != np.uint8
            or array.ndim not in (2, 3)
            or (array.ndim == 3 and array.shape[-1] not in planes)
        ):
            raise PredictError(
                f"{name}: {array.dtype} {array.shape}; expected a uint8 image (H, W, 3) or (H, W)"
                + (f" or (H, W, {prep.in_channels}) channels" if prep.in_channels not in (1, 3) else "")
            )
        return _image_case(array, prep, name, name, PredictError)
    volume = array[None] if array.ndim == 3 else array
    if volume.ndim != 4:
        raise PredictError(f"{name}: shape {array.shape}; expected a volume (D, H, W) or (M, D, H, W)")
    return _volume_case(volume, prep, name, name, PredictError)


def predict_file(
    ensemble: Ensemble, path: Path, out_dir: Path, outputs: Outputs = Outputs(), batch_size: int = 16
) -> list[Path]:
    """Predict one input and write its mask (and what `outputs` asks) into `out_dir`; -> the files."""
    prep = ensemble.preprocessing
    case = read_input(path, prep)
    mask, probs = case_mask(ensemble, case, outputs.postprocess, batch_size)
    stem = output_stem(path, prep)
    written = []
    if prep.kind == "image":
        h, w = case.image.shape[:2]
        written.append(out_dir / f"{stem}_mask.png")
        write_png(written[-1], mask)
        if outputs.overlay:
            written.append(out_dir / f"{stem}_overlay.png")
            write_png(written[-1], overlay(case.image, mask))
        if outputs.probabilities:
            written.append(out_dir / f"{stem}_probs.npy")
            _save_probabilities(written[-1], probs, (h, w))
        return written
    if outputs.probabilities:
        written.append(out_dir / f"{stem}_probs.npy")
        _save_probabilities(written[-1], probs, case.label.shape, case.affine)
    written.append(out_dir / f"{stem}_mask.nii.gz")
    # predicted in the canonical axes read_nifti gives; written back in the input's own axes and affine
    write_nifti(written[-1], from_canonical(mask, case.affine), case.spacing, case.affine)
    if outputs.overlay:
        area = (mask > 0).sum(axis=(1, 2))
        k = int(area.argmax()) if area.any() else len(mask) // 2
        window = prep.settings().ct_window
        shown = to_uint8(case.image[0, k], prep.modality, window)
        written.append(out_dir / f"{stem}_overlay_slice{k}.png")
        write_png(written[-1], overlay(shown, mask[k]))
    return written


def expand_inputs(inputs: list[Path], prep: Preprocessing | None = None) -> list[Path]:
    """Files as given; a folder gives its image and NIfTI files (sorted, hidden ones left out), and
    for a model of several channels (`prep`) one file per case given as nnU-Net channel files: its
    <case>_0000 (the others are read beside it, `input_files`).

    Raises:
        DataError: a folder with no such file in it."""
    paths = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES)
            )  # fmt: skip
            if takes_channel_files(prep):
                found = [p for p in found if not _later_channel(p)]
            if not found:
                raise DataError(
                    f"{path}: a folder with no image or NIfTI file ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)})"
                )
            paths += found
        else:
            paths.append(path)
    return paths


def _later_channel(path: Path) -> bool:
    """<case>_NNNN<ending> with NNNN > 0 and its <case>_0000<ending> beside it: read with that one."""
    m = re.fullmatch(r"(.+)_(\d{4})", file_stem(path))
    ending = path.name[len(file_stem(path)) :]
    return m is not None and m.group(2) != "0000" and path.with_name(f"{m.group(1)}_0000{ending}").is_file()


def predict_files(
    ensemble: Ensemble, paths: list[Path], out_dir: Path, outputs: Outputs = Outputs(), batch_size: int = 16
) -> dict[Path, str]:
    """Predict every input, with a progress bar; a bad input is reported (stderr) and skipped.

    Returns:
        The failed inputs and why; empty when every mask was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[Path, str] = {}
    owner: dict[str, Path] = {}  # output stem -> the input that writes it
    for path in tqdm(paths, desc="predict", unit="input"):
        path = Path(path)
        stem = output_stem(path, ensemble.preprocessing)
        try:
            if stem in owner:
                raise DataError(f"{path}: its outputs ({stem}_mask.*) would overwrite those of {owner[stem]}")
            owner[stem] = path
            predict_file(ensemble, path, out_dir, outputs, batch_size)
        except (DataError, OSError, RuntimeError) as err:  # RuntimeError: e.g. out of GPU memory
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            failed[path] = message
            tqdm.write(f"error: {message}", file=sys.stderr)
    return failed
