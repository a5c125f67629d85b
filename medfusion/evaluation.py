"""Test-set evaluation of trained runs: per test case, per scored region, per run (long table).

A test case is a 2-D image, or a whole volume rebuilt from its slice predictions (metrics on the
3-D label map). Rows: dataset, model, run, case_id, class, metric, value (+ postprocess, resolution).

Resolution (eval.resolution, METHOD.md "Scoring"): "original" (the default) resamples each case's
probabilities to its original geometry (`medfusion.resample`: in-plane, every slice kept) and scores
them against the original ground truth read from the raw copy (`preprocess.read_label`), HD95/ASSD
in mm where the spacing is known and in original pixels otherwise, post-processing sizes in original
pixels/voxels; "processed" scores at data.image_size against the resized masks.

Memory (`evaluate_model`): the weights of the runs (all loaded for the test pass, so the fold
ensemble is built case by case) and one test case at a time, in two steps (`_score_test`): while the
ensemble is summed, its sum (K x D x S x S float32) and one run's probabilities (float16); each
run's probabilities are then set aside (in memory up to 256 MB for the case, else in a temporary
file) and read back one at a time after the ensemble is scored. While one is scored: the ground
truth and the label map being scored at the original size (1 byte per voxel each; the
post-processed map waits in the same store while the raw one is scored), one region's two masks
(`metrics.label_mask`, 1 byte each) until their surfaces are found, and the surface distances of
that region (`metrics.surface_distances`: about 8 bytes per voxel of the masks' bounding box for a
noisy prediction), the probabilities released first. A 987 x 512 x 512 LiTS volume:
`benchmarks/case_memory.py`. Choosing post-processing holds per-candidate sums. Nothing grows with
the number of cases except the metric rows (a few per case).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from medfusion.common import run_name
from medfusion.data.dataset import SegDataset, StoredRows
from medfusion.data.io import DataError, read_json
from medfusion.data.preprocess import case_refs, read_fov, read_label
from medfusion.data.registry import dataset_spec, scored_regions
from medfusion.hardware import Precision, out_of_memory_explained
from medfusion.inference.checkpoint import check_fits_data, load_checkpoint
from medfusion.inference.window import infer_probs, predict_probs
from medfusion.metrics import COUNTS, pooled_dice, processed_spacing, region_metrics
from medfusion.postprocess import PostProcess, Selector, nesting
from medfusion.postprocess import apply as apply_postprocess
from medfusion.resample import labels_at


def predict_dataset(
    model: torch.nn.Module, dataset: SegDataset, batch_size: int, precision: Precision
) -> np.ndarray:
    """Argmax label maps (N, S, S) uint8 for every sample of `dataset`, in its order."""
    return predict_dataset_probs(model, dataset, batch_size, precision, np.float32).argmax(1).astype(np.uint8)


def predict_dataset_probs(
    model: torch.nn.Module,
    dataset: SegDataset,
    batch_size: int,
    precision: Precision,
    dtype: type = np.float16,
) -> np.ndarray:
    """Softmax probabilities (N, K, S, S) for every sample of `dataset`, in its order (float16: half the memory)."""
    out = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it["image"] for it in items])
        where = f"prediction of samples {start}..{start + len(items) - 1}"
        with out_of_memory_explained(where, images, model, precision.device, "-S eval.batch_size", None):
            out.append(predict_probs(model, images, precision).numpy())
    return np.concatenate(out).astype(dtype)


RESOLUTIONS = ("original", "processed")
PICTURE_SIZE = 256  # native images are shown at this size in the qualitative figure


def case_positions(dataset: SegDataset) -> dict[str, list[int]]:
    """Per case (sorted ids), the positions of its samples in `dataset`, in slice order."""
    by_case: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, sample in enumerate(dataset.samples):
        by_case[sample["case_id"]].append((sample["slice"] or 0, i))
    return {c: [i for _, i in sorted(by_case[c])] for c in sorted(by_case)}


# what a run's case probabilities are held in while scored: float16, half of float32's memory (the
# argmax of near-ties may differ from float32's: benchmarks/transfer_known_answer.py measures it)
CASE_DTYPE = np.float16


def iter_case_probs(
    model: torch.nn.Module,
    dataset: SegDataset,
    batch_size: int,
    precision: Precision,
    patch: int | None = None,
    tta: str = "none",
) -> Iterator[tuple[str, np.ndarray]]:
    """(case_id, softmax probabilities) of every case of `dataset` in sorted order: (K, S, S) for an
    image, (K, D, S, S) for a volume's slices, float16 (half the memory; scoring resizes each slice
    in float32). Batches run across case boundaries; memory is
    one batch plus the case being assembled, written slice by slice into one array of the case's size
    (no list of slices stacked at the end, which would hold the case twice). Native images (the model's `patch`): one image at a
    time by sliding window, cropped to the image's own size. `tta` "flip": each batch's probabilities
    are the mean over its four mirrorings (`inference.window.infer_probs`)."""
    if dataset.native:
        for case_id, (i,) in case_positions(dataset).items():
            image = dataset[i]["image"][None]
            where = f"prediction of {case_id} ({tuple(image.shape[2:])})"
            with out_of_memory_explained(where, image, model, precision.device, "-S eval.batch_size", None):
                probs = infer_probs(model, image, precision, patch, tta)[0].numpy().astype(CASE_DTYPE)
            h, w = dataset.sizes[i]
            yield case_id, probs[:, :h, :w]
        return
    positions = case_positions(dataset)
    order = [(c, i) for c, rows in positions.items() for i in rows]
    case: list[np.ndarray] = []  # the case being assembled (0 or 1 array)
    done = 0  # samples of the current case collected
    current = 0  # index of the current case in `positions`
    cases = list(positions)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = torch.stack([dataset[i]["image"] for _, i in chunk])
        where = f"prediction of samples {start}..{start + len(chunk) - 1}"
        with out_of_memory_explained(where, images, model, precision.device, "-S eval.batch_size", None):
            if tta == "none":
                probs = predict_probs(model, images, precision)
            else:
                probs = infer_probs(model, images, precision, None, tta)
            probs = probs.numpy().astype(CASE_DTYPE)  # half the memory
        for p in probs:
            case_id = cases[current]
            n = len(positions[case_id])
            if dataset.samples[positions[case_id][0]]["slice"] is None:  # an image: its one sample
                case.append(p.copy())  # not a view of the batch, which would keep the batch alive
            else:
                if done == 0:
                    case.append(np.empty((p.shape[0], n, *p.shape[1:]), CASE_DTYPE))
                case[0][:, done] = p
            done += 1
            if done == n:
                done, current = 0, current + 1
                # hand the array over without keeping a reference in this frame: with one stream
                # per run, a kept case would cost runs x case while the streams wait
                yield case_id, case.pop()


class Targets:
    """Each case's ground truth and voxel spacing at the resolution scored.

    original: the raw ground-truth file recorded by preprocessing (meta.json cases[c].label, under
    `raw_dir`), read and validated as preprocessing reads it, checked against the recorded shape;
    spacing in mm where the dataset records it, else None (pixels). processed: the processed masks
    (stacked slices for volumes), spacing scaled to data.image_size (`processed_spacing`).
    Field of view (custom 2-D data with fov/, meta.json `roi: fov`): `scored` gives the ground truth
    set to background outside it and the FOV itself, which the prediction is restricted to before
    post-processing and scoring (so only FOV pixels count).
    Memory: one case at a time.
    """

    def __init__(self, processed_dir: Path, meta: dict, resolution: str, raw_dir: Path | None = None) -> None:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"eval.resolution {resolution!r}; expected one of {RESOLUTIONS}")
        self.processed_dir, self.meta, self.resolution = Path(processed_dir), meta, resolution
        self.raw_dir = Path(raw_dir if raw_dir is not None else meta.get("raw_dir", ""))
        self.masks = StoredRows(self.processed_dir / "masks.npy")  # read, not mapped: memory is one case
        self._second_files: dict[str, Path | None] | None = None  # the second observer's raw files, on demand
        self._second_rows: StoredRows | None = None  # observer2.npy, opened once on demand
        self.has_fov = meta.get("roi") == "fov"
        self._fov_rows = StoredRows(self.processed_dir / "fov.npy") if self.has_fov else None
        if resolution == "original":
            missing = [c for c, info in meta["cases"].items() if "label" not in info]
            if missing:
                raise DataError(
                    f"{self.processed_dir / 'meta.json'}: no ground-truth file recorded for case {missing[0]!r} "
                    "(preprocessed by an older version); rerun the preprocess stage "
                    "(dvc repro -f preprocess@<dataset>) or score at -S eval.resolution=processed"
                )

    @property
    def unit(self) -> str:
        """ "mm" when every case has a spacing at this resolution, else "px"."""
        known = all(info.get("spacing") is not None for info in self.meta["cases"].values())
        return "mm" if known else "px"

    def spacing(self, case_id: str) -> tuple | None:
        info = self.meta["cases"][case_id]
        if self.unit != "mm":
            return None
        if self.resolution == "original" or self.meta["image_size"] == "native":
            return tuple(float(v) for v in info["spacing"])
        return processed_spacing(info["shape"], info["spacing"], self.meta["image_size"])

    def shape(self, case_id: str, processed_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape scored: the original one, or the processed `processed_shape`."""
        if self.resolution == "processed":
            return tuple(processed_shape)
        return tuple(int(v) for v in self.meta["cases"][case_id]["shape"])

    def target(self, case_id: str, rows: list[int]) -> np.ndarray:
        """The ground truth of `case_id`, whose processed samples are rows `rows` of masks.npy."""
        if self.resolution == "processed":
            masks = np.asarray(self.masks[rows])
            if self.meta["image_size"] == "native":  # the image's own area of its canvas
                h, w = self.meta["cases"][case_id]["shape"][:2]
                return masks[0, :h, :w]
            return masks if self.meta["kind"] == "volume" else masks[0]
        info = self.meta["cases"][case_id]
        path = self.raw_dir / info["label"]
        if not path.is_file():
            raise DataError(
                f"{path}: the ground truth of case {case_id!r} is not there; scoring at eval.resolution: "
                "original reads it from the raw copy (fetch the dataset again, or give --raw-dir), or score "
                "at -S eval.resolution=processed"
            )
        return self._read(path, case_id)

    def fov(self, case_id: str, rows: list[int]) -> np.ndarray | None:
        """The case's field of view (bool) at the resolution scored; None where the dataset has none."""
        if not self.has_fov:
            return None
        info = self.meta["cases"][case_id]
        if self.resolution == "processed":
            fov = np.asarray(self._fov_rows[rows])[0] > 0
            return fov[: info["shape"][0], : info["shape"][1]] if self.meta["image_size"] == "native" else fov
        return read_fov(self.raw_dir / info["fov"], tuple(info["shape"]), case_id)

    def scored(self, case_id: str, rows: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """(ground truth, field of view): the truth set to background outside the FOV, where there is one."""
        target, fov = self.target(case_id, rows), self.fov(case_id, rows)
        if fov is not None:
            target = np.where(fov, target, 0).astype(target.dtype)
        return target, fov

    def _read(self, path: Path, case_id: str) -> np.ndarray:
        info = self.meta["cases"][case_id]
        label = read_label(
            path,
            self.meta["kind"],
            self.meta["dataset"],
            self.meta["class_names"],
            self.meta.get("mask_threshold"),
        )
        if list(label.shape) != list(info["shape"]):
            raise DataError(
                f"{path}: ground truth of shape {label.shape}, but case {case_id!r} was preprocessed from "
                f"shape {tuple(info['shape'])}; data/raw changed after preprocessing: rerun the preprocess stage"
            )
        return label

    def has_second_observer(self) -> bool:
        """Whether every case has a second observer's labels (CHASE_DB1: observer2.npy, one row per mask)."""
        path = self.processed_dir / "observer2.npy"
        if path.is_file() and self._second_rows is None:
            self._second_rows = StoredRows(path)
        return self._second_rows is not None and self._second_rows.shape[0] == self.masks.shape[0] > 0

    def second_observer(self, case_id: str, rows: list[int]) -> np.ndarray:
        """The second observer's labels of `case_id` at the resolution scored: the raw file beside the
        first observer's (the dataset's layout, `preprocess.case_refs`), or observer2.npy's rows."""
        if self.resolution == "processed":
            if not self.has_second_observer():
                raise DataError(
                    f"{self.processed_dir / 'observer2.npy'}: no second observer's labels for every case"
                )
            second = np.asarray(self._second_rows[rows])
            if self.meta["image_size"] == "native":
                h, w = self.meta["cases"][case_id]["shape"][:2]
                return second[0, :h, :w]
            return second if self.meta["kind"] == "volume" else second[0]
        if self._second_files is None:
            spec = dataset_spec(self.meta["dataset"])
            self._second_files = {r.case_id: r.observer2 for r in case_refs(spec, self.raw_dir)}
        path = self._second_files.get(case_id)
        if path is None or not Path(path).is_file():
            raise DataError(
                f"{self.raw_dir}: no second observer's labels for case {case_id!r} (expected beside "
                f"{self.meta['cases'][case_id]['label']}); fetch the dataset again or score at "
                "-S eval.resolution=processed"
            )
        return self._read(Path(path), case_id)


def _metric_rows(
    labels: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    regions: dict[str, list[int]],
    spacings: dict[str, tuple | None],
) -> list[dict]:
    """Rows (case_id, class, metric, value) per test case and scored region; `class` is the region's
    name. The voxel counts tp, fp, fn are among them (for the pooled Dice); `_split_counts` takes
    them out before anything is written."""
    rows = []
    for case_id in sorted(targets):
        metrics = region_metrics(labels[case_id], targets[case_id], regions, spacings[case_id])
        for region, values in metrics.items():
            rows += [
                {"case_id": case_id, "class": region, "metric": k, "value": v} for k, v in values.items()
            ]
    return rows


def _split_counts(rows: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """-> (the metric rows without the counts, pooled Dice per region over all cases of `rows`)."""
    counts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in COUNTS:
            counts[r["class"]][r["metric"]].append(r["value"])
    pooled = {region: pooled_dice(c["tp"], c["fp"], c["fn"]) for region, c in counts.items()}
    return [r for r in rows if r["metric"] not in COUNTS], pooled


def case_regions(meta: dict) -> dict[str, list[int]]:
    """The scored regions of a processed dataset (meta.json's `regions`; each class alone where a
    dataset was preprocessed before regions were recorded)."""
    return scored_regions(meta["class_names"], meta.get("regions"))


def resolution_text(meta: dict, resolution: str, unit: str) -> str:
    """How the cases were scored, for eval.json and the tables' headers."""
    size = meta["image_size"]
    if size == "native":
        return (
            "at each image's original size (data.image_size: native: predicted at that size by sliding "
            "window), against the original ground truth; distances in " + unit
        )
    if resolution == "processed":
        return (
            f"at the processed {size}x{size} in-plane (eval.resolution: processed), against the resized masks"
        )
    geometry = "in-plane size, slice count and spacing" if meta["kind"] == "volume" else "size"
    return (
        f"at each case's original {geometry} (eval.resolution: original; predicted at {size}x{size}, "
        f"probabilities resampled back), against the original ground truth; distances in {unit}"
    )


def roi_text(meta: dict) -> str:
    """How the field of view restricts the scoring, for eval.json and the tables ('' without one)."""
    if meta.get("roi") != "fov":
        return ""
    return (
        "inside each image's field of view only (fov/: prediction and ground truth set to background "
        "outside it before post-processing and scoring)"
    )


def evaluate_run(
    checkpoint_path: Path,
    processed_dir: Path,
    test_ids: list[str],
    batch_size: int,
    precision: Precision,
    resolution: str = "original",
    raw_dir: Path | None = None,
) -> list[dict]:
    """Metric rows (case_id, class, metric, value) of one checkpoint on `test_ids`, raw argmax, no
    post-processing, at `resolution` (see the module docstring)."""
    meta = read_json(Path(processed_dir) / "meta.json")
    model, checkpoint = load_checkpoint(checkpoint_path, precision)
    check_fits_data(checkpoint_path, checkpoint, meta, processed_dir)
    dataset = SegDataset(processed_dir, test_ids)
    targets = Targets(processed_dir, meta, resolution, raw_dir)
    regions, positions = case_regions(meta), case_positions(dataset)
    rows = []
    for case_id, probs in iter_case_probs(
        model, dataset, batch_size, precision, checkpoint.get("patch_size")
    ):
        rows_of = [dataset.indices[i] for i in positions[case_id]]
        target, fov = targets.scored(case_id, rows_of)
        labels = _restricted(labels_at(probs, target.shape), fov)
        rows += _metric_rows(
            {case_id: labels}, {case_id: target}, regions, {case_id: targets.spacing(case_id)}
        )
    return _split_counts(rows)[0]


class _Scores:
    """The metric rows and pooled counts of every (run, raw | post), filled one case at a time."""

    def __init__(self, regions: dict[str, list[int]]) -> None:
        self.regions = regions
        self.rows: dict[tuple[str, str], list[dict]] = defaultdict(list)

    def add(self, run: str, kind: str, case_id: str, labels: np.ndarray, target: np.ndarray, spacing) -> None:
        self.rows[(run, kind)] += _metric_rows(
            {case_id: labels}, {case_id: target}, self.regions, {case_id: spacing}
        )

    def frames(self, order: list[str]) -> tuple[list[pd.DataFrame], dict]:
        frames, pooled = [], {}
        for run in order:
            for kind in ("raw", "post"):
                rows, pooled.setdefault(run, {})[kind] = _split_counts(self.rows[(run, kind)])
                frames.append(pd.DataFrame(rows).assign(run=run, postprocess=kind))
        return frames, pooled


def evaluate_model(
    runs: list[dict],
    runs_dir: Path,
    processed_dir: Path,
    split: dict,
    batch_size: int,
    precision: Precision,
    examples: int = 4,
    resolution: str = "original",
    raw_dir: Path | None = None,
    tta: str = "none",
) -> tuple[pd.DataFrame, dict, dict[str, np.ndarray]]:
    """Every run (fold x seed) of one model, and their fold ensemble, on the test split.

    For each run: post-processing is chosen on that run's validation fold (`postprocess.Selector`,
    never on test), then the test cases are scored raw (argmax) and post-processed. The ensemble
    ("ensemble" run) averages the runs' test probabilities; its post-processing is chosen on the
    pooled out-of-fold validation predictions (each validation case predicted by the runs that did not
    train on it). Validation is scored at the same resolution as test. Metrics per test case (image,
    or volume rebuilt from its slices) and scored region (each foreground class, or LiTS's nested
    liver = labels 1-2 and tumour = label 2: `case_regions`), at `resolution` (module docstring).
    Each run's global Dice per region (pooled over all test cases: the LiTS challenge's "Dice
    global") goes to info["global_dice"][run]["raw" | "post"]. Memory: see the module docstring.

    Args:
        resolution: "original" (the default: each case's own geometry, ground truth from the raw copy)
            or "processed" (data.image_size).
        raw_dir: where the raw ground truth is (default: the raw_dir preprocessing recorded).
        tta: "flip" (eval.tta): the fold ensemble is also scored with every run's probabilities
            averaged over the four mirrorings of each test image (`inference.window.infer_probs`), as
            run "ensemble_tta", raw and with the ensemble's post-processing (chosen on validation
            without TTA: our choice, so that TTA costs 4x the test inference only, not the
            validation's too). Each run stays scored without it.

    Returns:
        per_case: columns run, case_id, class, metric, value, postprocess ("raw" / "post"), resolution,
            group (the case's patient, cases.json's group);
        info: distance unit, image size, resolution and how it was scored, kind, the post-processing
            chosen per run with its validation Dice, the scored regions and the global Dice;
        examples: for the first `examples` test cases (sorted ids): images (n, C, S, S) uint8, targets and
            the ensemble's post-processed predictions (n, S, S) at the processed size (the prediction
            made at the scored resolution and resized back, nearest with pixel centres aligned), the
            slice with the largest ground truth for volumes, and case_ids.
    """
    processed_dir = Path(processed_dir)
    meta = read_json(processed_dir / "meta.json")
    targets = Targets(processed_dir, meta, resolution, raw_dir)
    loaded, chosen = _choose_on_validation(
        runs, runs_dir, processed_dir, split, batch_size, precision, targets
    )
    test_set = SegDataset(processed_dir, split["test"])
    scores, pictures = _Scores(case_regions(meta)), _Pictures(test_set, case_positions(test_set), examples)
    _score_test(loaded, chosen, test_set, batch_size, precision, targets, scores, pictures, tta)
    frames, pooled = scores.frames([*loaded, "ensemble", *(["ensemble_tta"] if tta == "flip" else [])])
    patients = {s["case_id"]: s["group"] for s in test_set.samples}  # for statistics by patient
    per_case = pd.concat(frames, ignore_index=True).assign(resolution=resolution)
    per_case["group"] = per_case["case_id"].map(patients)
    info = {
        "distance_unit": targets.unit,
        "image_size": meta["image_size"],
        "resolution": resolution,
        "resolution_text": resolution_text(meta, resolution, targets.unit)
        + (f"; {roi_text(meta)}" if roi_text(meta) else ""),
        "roi": meta.get("roi", "image"),
        "kind": meta["kind"],
        "title": meta.get("title", meta["dataset"]),
        "runs": len(runs),
        "test_cases": len(pictures.positions),
        "postprocess": chosen,
        "tta": tta,
        "regions": scores.regions,
        "global_dice": pooled,
    }
    return per_case, info, pictures.arrays()


def _choose_on_validation(
    runs: list[dict], runs_dir: Path, processed_dir: Path, split: dict, batch_size: int, precision: Precision,
    targets: Targets,
) -> tuple[dict[str, tuple[torch.nn.Module, int | None]], dict[str, dict]]:  # fmt: skip
    """Load every run and choose its post-processing on its validation fold, and the ensemble's on
    all of them pooled, one case at a time. -> ({run: (model, patch)}, {run | "ensemble": record})."""
    meta = targets.meta
    loaded: dict[str, tuple[torch.nn.Module, int | None]] = {}
    chosen: dict[str, dict] = {}
    k = len(meta["class_names"])
    parents = nesting(case_regions(meta), k)  # LiTS: thresholds chosen on liver = 1+2 and tumour = 2
    pooled = Selector(k, parents=parents)
    for run in runs:
        name = run_name(run["fold"], run["seed"])
        model, checkpoint = load_checkpoint(runs_dir / name / "model.pt", precision)
        check_fits_data(runs_dir / name / "model.pt", checkpoint, meta, processed_dir)
        val_set = SegDataset(processed_dir, split["folds"][run["fold"]]["val"])
        positions, selector = case_positions(val_set), Selector(k, parents=parents)
        patch = checkpoint.get("patch_size")  # native images: the run's sliding-window side
        for case_id, probs in iter_case_probs(model, val_set, batch_size, precision, patch):
            target, fov = targets.scored(case_id, [val_set.indices[i] for i in positions[case_id]])
            score = selector.score(probs, target, fov)  # computed once, for the run and for the ensemble
            selector.add_score(score)
            pooled.add_score(score)
            del probs, target, fov  # not held while the stream assembles the next case
        chosen[name] = _selection_record(selector.result())
        loaded[name] = (model, patch)
    chosen["ensemble"] = _selection_record(pooled.result())
    return loaded, chosen


def _score_test(
    loaded, chosen, test_set, batch_size, precision, targets, scores, pictures, tta="none"
) -> None:
    """Every test case, one at a time, in two steps so that no run's probabilities are held while
    another array of the case's size is scored: (1) each run's probabilities are added into the fold
    ensemble's (float32, summed in place) and set aside (`_CaseStore`: kept in memory when small,
    else written to a temporary file); the ensemble is scored, its sum released before its metrics;
    (2) each run's probabilities are read back and scored the same way; each post-processed label map
    waits in the store while its raw one is scored. With `tta` "flip", then the
    ensemble of the runs' flip-averaged probabilities (another case-sized sum, after the first is
    released). The order of the rows does not depend on the store."""
    settings = {name: postprocess_of(record) for name, record in chosen.items()}
    streams = {
        name: iter_case_probs(model, test_set, batch_size, precision, patch)
        for name, (model, patch) in loaded.items()
    }
    flipped = {
        name: iter_case_probs(model, test_set, batch_size, precision, patch, tta)
        for name, (model, patch) in loaded.items()
        if tta == "flip"
    }
    with _CaseStore() as store:
        for case_id, positions in pictures.positions.items():
            rows = [test_set.indices[i] for i in positions]
            case = _Case(case_id, *targets.scored(case_id, rows), targets.spacing(case_id))
            post = case.score(
                scores, "ensemble", _case_ensemble(streams, case_id, store), settings["ensemble"], store
            )
            pictures.add(case_id, rows, post)
            del post
            for name in streams:  # each run's own probabilities, read back one at a time
                case.score(scores, name, store.take(name), settings[name], store)
            if flipped:
                case.score(
                    scores, "ensemble_tta", _case_ensemble(flipped, case_id), settings["ensemble"], store
                )
            del case  # this case's arrays, gone before the next case is read


@dataclasses.dataclass
class _Case:
    """One test case being scored: its id, ground truth, field of view and spacing."""

    case_id: str
    target: np.ndarray
    fov: np.ndarray | None
    spacing: tuple | None

    def score(
        self,
        scores: _Scores,
        run: str,
        probs: np.ndarray,
        postprocess: PostProcess,
        store: _CaseStore | None = None,
    ) -> np.ndarray:
        """Score `run`'s probabilities raw and post-processed; returns the post labels. The caller
        hands `probs` over (keeps no reference): both label maps are made first, then the
        probabilities are released before the metrics (whose distance transforms are the peak);
        with a `store`, the post-processed map waits there while the raw one is scored."""
        raw, post = _case_labels(probs, postprocess, self.target.shape, self.fov)
        del probs
        aside = store is not None and post is not raw
        if aside:
            store.put(f"{run} post", post)
            del post
        scores.add(run, "raw", self.case_id, raw, self.target, self.spacing)
        del raw
        if aside:
            post = store.take(f"{run} post")
        scores.add(run, "post", self.case_id, post, self.target, self.spacing)
        return post


def _case_labels(probs, postprocess, shape, fov) -> tuple[np.ndarray, np.ndarray]:
    """(raw argmax, post-processed) labels at `shape`, inside `fov`; one array when they are equal."""
    raw = _restricted(labels_at(probs, shape), fov)
    post = raw if postprocess == PostProcess() else apply_postprocess(postprocess, probs, shape, fov)
    return raw, post


class _CaseStore:
    """Each run's probabilities of the current test case, set aside while the ensemble is scored:
    in memory up to `in_memory` bytes in all, beyond that in files of a temporary folder (removed on
    exit, also when interrupted), each read back once. Memory: at most `in_memory` bytes."""

    def __init__(self, in_memory: int = 256 << 20) -> None:
        self.in_memory, self.held, self.kept, self.files, self.folder = in_memory, 0, {}, {}, None

    def __enter__(self) -> _CaseStore:
        return self

    def __exit__(self, *exc) -> None:
        self.kept.clear()
        if self.folder is not None:
            self.folder.cleanup()

    def put(self, name: str, probs: np.ndarray) -> None:
        if self.held + probs.nbytes <= self.in_memory:
            self.kept[name], self.held = probs, self.held + probs.nbytes
            return
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="medfusion-eval-")
        path = Path(self.folder.name) / f"{len(self.files)}.npy"
        np.save(path, probs)
        self.files[name] = path

    def take(self, name: str) -> np.ndarray:
        if name in self.kept:
            probs = self.kept.pop(name)
            self.held -= probs.nbytes
            return probs
        path = self.files.pop(name)
        probs = np.load(path)
        path.unlink()
        return probs


def _case_ensemble(streams, case_id, store: _CaseStore | None = None) -> np.ndarray:
    """The runs' mean probabilities (float32) of `case_id`, the next case of every stream; each run's
    own probabilities go to `store` (when given) to be scored after the ensemble."""
    ensemble = None
    for name, stream in streams.items():
        got, probs = next(stream)
        if got != case_id:
            raise RuntimeError(f"run {name} predicted case {got} where {case_id} was expected")
        if ensemble is None:
            ensemble = probs.astype(np.float32)
        else:
            np.add(ensemble, probs, out=ensemble)
        if store is not None:
            store.put(name, probs)
        del probs  # before the next run's case arrives
    ensemble /= len(streams)  # the runs' mean
    return ensemble


def score_second_observer(
    processed_dir: Path, split: dict, resolution: str = "original", raw_dir: Path | None = None
) -> pd.DataFrame | None:
    """The human reference row (METHOD.md section 3): each test case's second-observer labels scored
    against the first observer's (the models' ground truth) with the models' metrics, regions and
    resolution. None where the dataset has no second observer (every dataset but CHASE_DB1).

    Returns:
        Long rows as `evaluate_model`'s per_case: run "second_observer", postprocess "none", the
        case's resolution and group. Memory: one case's two label maps.
    """
    processed_dir = Path(processed_dir)
    meta = read_json(processed_dir / "meta.json")
    targets = Targets(processed_dir, meta, resolution, raw_dir)
    if not targets.has_second_observer():
        return None
    test_set = SegDataset(processed_dir, split["test"])
    regions, rows = case_regions(meta), []
    for case_id, positions in case_positions(test_set).items():
        sample_rows = [test_set.indices[i] for i in positions]
        (first, fov), second = (
            targets.scored(case_id, sample_rows),
            targets.second_observer(case_id, sample_rows),
        )
        second = _restricted(second, fov)
        rows += _metric_rows(
            {case_id: second}, {case_id: first}, regions, {case_id: targets.spacing(case_id)}
        )
    rows, _ = _split_counts(rows)
    patients = {s["case_id"]: s["group"] for s in test_set.samples}
    frame = pd.DataFrame(rows).assign(run="second_observer", postprocess="none", resolution=resolution)
    frame["group"] = frame["case_id"].map(patients)
    return frame


def _selection_record(selection) -> dict:
    return {
        **dataclasses.asdict(selection.postprocess),
        "val_dice_before": selection.dice_before,
        "val_dice_after": selection.dice_after,
    }


def postprocess_of(record: dict) -> PostProcess:
    """The PostProcess of one eval.json `postprocess` record (`_selection_record`'s keys; records
    written before relative sizes, largest-component and nested thresholds existed have none)."""
    thresholds, parents = record["thresholds"], record.get("parents")
    return PostProcess(
        record["min_size"],
        record["fill_holes"],
        None if thresholds is None else tuple(thresholds),
        float(record.get("min_fraction", 0.0)),
        bool(record.get("largest", False)),
        None if parents is None else tuple(int(p) for p in parents),
    )


def _restricted(labels: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    """`labels` set to background outside the field of view (unchanged without one)."""
    return labels if fov is None else np.where(fov, labels, 0).astype(labels.dtype)


def _score_case(scores: _Scores, run, case_id, probs, postprocess, target, spacing, fov=None) -> np.ndarray:
    """Score one run's case raw and post-processed at the target's shape (inside `fov` where there is
    one); returns the post labels (`_Case.score`)."""
    return _Case(case_id, target, fov, spacing).score(scores, run, probs, postprocess)


class _Pictures:
    """The qualitative examples: the first `n` test cases at the processed size."""

    def __init__(self, test_set: SegDataset, positions: dict[str, list[int]], n: int) -> None:
        self.test_set, self.positions, self.wanted = test_set, positions, list(positions)[:n]
        self.images, self.masks, self.preds, self.ids = [], [], [], []

    def add(self, case_id: str, rows: list[int], post: np.ndarray) -> None:
        if case_id not in self.wanted:
            return
        masks = np.asarray(self.test_set.masks[rows])  # (n, S, S), n = 1 for an image
        k = int(np.argmax((masks > 0).reshape(len(masks), -1).sum(1))) if len(masks) > 1 else 0
        pred = post[k] if post.ndim == 3 else post
        image, mask = np.asarray(self.test_set.images[rows[k]]), masks[k]
        if self.test_set.native:  # the image's own area, shown at PICTURE_SIZE
            h, w = self.test_set.sizes[self.test_set.indices.index(rows[k])]
            side = PICTURE_SIZE
            image = np.stack(
                [cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in image[:, :h, :w]]
            )
            mask = cv2.resize(mask[:h, :w], (side, side), interpolation=cv2.INTER_NEAREST_EXACT)
        size = mask.shape[-1]
        if pred.shape != (size, size):
            pred = cv2.resize(pred, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
        self.images.append(image)
        self.masks.append(mask)
        self.preds.append(pred)
        self.ids.append(case_id)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "images": np.stack(self.images),
            "targets": np.stack(self.masks),
            "preds": np.stack(self.preds),
            "case_ids": np.array(self.ids),
        }
