"""Test-set evaluation of trained runs: per test case, per foreground class, per run (long table).

A test case is a 2-D image, or a whole volume rebuilt from its slice predictions (metrics on the
3-D label map). Everything is at the preprocessed resolution (data.image_size in-plane); the report
says so. Rows: dataset, model, run, case_id, class, metric, value.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfusion.common import first_line, run_name
from medfusion.data.dataset import SegDataset
from medfusion.data.io import read_json
from medfusion.data.registry import scored_regions
from medfusion.hardware import Precision
from medfusion.metrics import COUNTS, pooled_dice, processed_spacing, region_metrics
from medfusion.models import build_model
from medfusion.postprocess import apply as apply_postprocess
from medfusion.postprocess import choose_postprocess
from medfusion.training.loop import out_of_memory_explained, predict_probs


class CheckpointError(ValueError):
    """A model.pt that cannot be used: names the file and what is wrong with it."""


CHECKPOINT_KEYS = ("model", "kwargs", "in_channels", "num_classes", "state_dict")


def weights_mismatch(expected: dict, found: dict) -> str:
    """What differs between a model's state_dict (`expected`) and a checkpoint's (`found`); "" if they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        (k, tuple(getattr(found[k], "shape", ())), tuple(v.shape))
        for k, v in expected.items()
        if k in found and tuple(getattr(found[k], "shape", ())) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the file (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the model does not have (e.g. {unexpected[0]!r})")
    if shapes:
        key, in_file, in_model = shapes[0]
        parts.append(
            f"{len(shapes)} weight(s) of another shape (e.g. {key!r}: {in_file} in the file, {in_model} in the model)"
        )
    return "; ".join(parts)


def load_checkpoint(path: Path, precision: Precision) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint written by `run_fold`.

    Raises:
        CheckpointError: naming the file: unreadable (truncated, corrupt), not a medfusion checkpoint,
            or weights that do not fit the model its record describes (another model's file, or other
            widths / classes / channels).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint; expected a model.pt written by training (train the run first)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable medfusion checkpoint ({type(err).__name__}: {first_line(err)}); "
            "the file is truncated or corrupt (an interrupted copy, a full disk?): restore it or retrain the run"
        ) from err
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else None
    if missing is None or missing:
        if not isinstance(checkpoint, dict):
            found = f"a {type(checkpoint).__name__}"
        elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            found = f"only weights (a bare state_dict of {len(checkpoint)} tensors)"
        else:
            keys = list(checkpoint)
            found = f"keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
        raise CheckpointError(
            f"{path}: not a medfusion checkpoint: no {missing or list(CHECKPOINT_KEYS)}; it holds {found}. "
            "Expected a model.pt written by medfusion training (data/runs/<dataset>/<model>/fold*/model.pt)"
        )
    architecture = checkpoint.get("architecture", checkpoint["model"])
    described = (
        f"{architecture} {checkpoint['kwargs']} with {checkpoint['in_channels']} input channel(s) and "
        f"{checkpoint['num_classes']} classes"
    )
    try:
        model = build_model(
            architecture, checkpoint["in_channels"], checkpoint["num_classes"], **checkpoint["kwargs"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot build the model it records, {described}: {first_line(err)}"
        ) from err
    state = checkpoint["state_dict"]
    problem = weights_mismatch(model.state_dict(), state) if isinstance(state, dict) else "no weights dict"
    if problem:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its record describes ({described}): {problem}. "
            "The file was written by another model or with other settings (widths, classes, channels)"
        )
    model.load_state_dict(state)
    model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), checkpoint


def check_fits_data(path: Path, checkpoint: dict, meta: dict, processed_dir: Path) -> None:
    """A checkpoint must have been trained on data like `processed_dir`'s: same classes and channels."""
    theirs = (len(meta["class_names"]), meta["in_channels"])
    ours = (checkpoint["num_classes"], checkpoint["in_channels"])
    if ours != theirs:
        raise CheckpointError(
            f"{path}: trained for {ours[0]} classes from {ours[1]} channel(s), but {processed_dir} has "
            f"{theirs[0]} classes and {theirs[1]} channel(s): the run belongs to another dataset, or "
            "data/processed was rebuilt after training (rerun the train stage)"
        )


def predict_dataset(
    model: torch.nn.Module, dataset: SegDataset, batch_size: int, precision: Precision
) -> np.ndarray:
    """Argmax label maps (N, S, S) uint8 for every sample of `dataset`, in its order."""
    return predict_dataset_probs(model, dataset, batch_size, precision, np.float32).argmax(1).astype(np.uint8)


def group_cases(dataset: SegDataset, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per test case: the 2-D array of an image, or the slices of a volume stacked in slice order (D, ...)."""
    by_case: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for sample, label in zip(dataset.samples, labels, strict=True):
        by_case[sample["case_id"]].append((sample["slice"], label))
    out = {}
    for case_id, items in by_case.items():
        if items[0][0] is None:  # a 2-D image: one sample
            out[case_id] = items[0][1]
        else:
            out[case_id] = np.stack([m for _, m in sorted(items, key=lambda t: t[0])])
    return out


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


def group_probs(dataset: SegDataset, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per test case, class first: (K, S, S) for an image, (K, D, S, S) for a volume's stacked slices."""
    return {c: p if p.ndim == 3 else p.transpose(1, 0, 2, 3) for c, p in group_cases(dataset, probs).items()}


def case_spacings(processed_dir: Path, case_ids: list[str]) -> tuple[dict[str, tuple | None], str]:
    """Each case's voxel spacing at the processed resolution, and the distance unit ("mm" or "px")."""
    meta = read_json(Path(processed_dir) / "meta.json")
    spacings = {
        c: processed_spacing(meta["cases"][c]["shape"], meta["cases"][c]["spacing"], meta["image_size"])
        for c in case_ids
    }
    unit = "mm" if all(s is not None for s in spacings.values()) else "px"
    return (spacings if unit == "mm" else dict.fromkeys(case_ids)), unit


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


def evaluate_run(
    checkpoint_path: Path, processed_dir: Path, test_ids: list[str], batch_size: int, precision: Precision
) -> list[dict]:
    """Metric rows (case_id, class, metric, value) of one checkpoint on `test_ids`, raw argmax, no post-processing."""
    model, checkpoint = load_checkpoint(checkpoint_path, precision)
    check_fits_data(checkpoint_path, checkpoint, read_json(Path(processed_dir) / "meta.json"), processed_dir)
    dataset = SegDataset(processed_dir, test_ids)
    targets = group_cases(dataset, np.asarray(dataset.masks[dataset.indices]))  # reads only these rows
    labels = group_cases(dataset, predict_dataset(model, dataset, batch_size, precision))
    regions = case_regions(read_json(Path(processed_dir) / "meta.json"))
    spacings, _ = case_spacings(processed_dir, sorted(targets))
    return _split_counts(_metric_rows(labels, targets, regions, spacings))[0]


def evaluate_model(
    runs: list[dict],
    runs_dir: Path,
    processed_dir: Path,
    split: dict,
    batch_size: int,
    precision: Precision,
    examples: int = 4,
) -> tuple[pd.DataFrame, dict, dict[str, np.ndarray]]:
    """Every run (fold x seed) of one model, and their fold ensemble, on the test split.

    For each run: post-processing is chosen on that run's validation fold (`choose_postprocess`,
    never on test), then the test cases are scored raw (argmax) and post-processed. The ensemble
    ("ensemble" run) averages the runs' test probabilities; its post-processing is chosen on the
    pooled out-of-fold validation predictions (each validation case predicted by the run that did not
    train on it). Metrics per test case (image, or volume rebuilt from its slices) and scored region
    (each foreground class, or LiTS's nested liver = labels 1-2 and tumour = label 2: `case_regions`),
    HD95/ASSD in mm at the processed resolution where the spacing is known, else in pixels. Each run's
    global Dice per region (pooled over all test cases: the LiTS challenge's "Dice global") goes to
    info["global_dice"][run]["raw" | "post"].

    Returns:
        per_case: columns run, case_id, class, metric, value, postprocess ("raw" / "post");
        info: distance unit, image size, kind, the post-processing chosen per run with its validation Dice,
            the scored regions and the global Dice;
        examples: for the first `examples` test cases (sorted ids): images (n, C, S, S) uint8, targets and
            the ensemble's post-processed predictions (n, S, S), the slice with the largest ground truth
            for volumes, and case_ids.
    """
    processed_dir = Path(processed_dir)
    meta = read_json(processed_dir / "meta.json")
    regions = case_regions(meta)
    test_set = SegDataset(processed_dir, split["test"])
    targets = group_cases(test_set, np.asarray(test_set.masks[test_set.indices]))
    spacings, unit = case_spacings(processed_dir, sorted(targets))
    frames, chosen, pooled = [], {}, {}
    ensemble: dict[str, np.ndarray] = {}
    oof_probs: list[np.ndarray] = []
    oof_targets: list[np.ndarray] = []
    for run in runs:
        name = run_name(run["fold"], run["seed"])
        model, checkpoint = load_checkpoint(runs_dir / name / "model.pt", precision)
        check_fits_data(runs_dir / name / "model.pt", checkpoint, meta, processed_dir)
        val_set = SegDataset(processed_dir, split["folds"][run["fold"]]["val"])
        val_probs = group_probs(val_set, predict_dataset_probs(model, val_set, batch_size, precision))
        val_targets = group_cases(val_set, np.asarray(val_set.masks[val_set.indices]))
        cases = sorted(val_targets)
        selection = choose_postprocess(
            [val_probs[c].astype(np.float32) for c in cases], [val_targets[c] for c in cases]
        )
        oof_probs += [val_probs[c] for c in cases]
        oof_targets += [val_targets[c] for c in cases]
        chosen[name] = _selection_record(selection)
        probs = group_probs(test_set, predict_dataset_probs(model, test_set, batch_size, precision))
        for c, p in probs.items():
            ensemble[c] = ensemble.get(c, 0) + p.astype(np.float32) / len(runs)
        frames += _score(name, probs, selection.postprocess, targets, regions, spacings, pooled)
    selection = choose_postprocess([p.astype(np.float32) for p in oof_probs], oof_targets)
    chosen["ensemble"] = _selection_record(selection)
    frames += _score("ensemble", ensemble, selection.postprocess, targets, regions, spacings, pooled)
    per_case = pd.concat(frames, ignore_index=True)
    info = {
        "distance_unit": unit,
        "image_size": meta["image_size"],
        "kind": meta["kind"],
        "title": meta.get("title", meta["dataset"]),
        "runs": len(runs),
        "test_cases": len(targets),
        "postprocess": chosen,
        "regions": regions,
        "global_dice": pooled,
    }
    pictures = _examples(test_set, targets, ensemble, selection.postprocess, examples)
    return per_case, info, pictures


def _selection_record(selection) -> dict:
    return {
        **dataclasses.asdict(selection.postprocess),
        "val_dice_before": selection.dice_before,
        "val_dice_after": selection.dice_after,
    }


def _score(run, probs, postprocess, targets, regions, spacings, pooled: dict) -> list[pd.DataFrame]:
    """The run's metric frames, raw and post-processed; its pooled Dice per region goes to
    pooled[run][raw | post]."""
    raw = {c: p.argmax(0).astype(np.uint8) for c, p in probs.items()}
    post = {c: apply_postprocess(postprocess, p.astype(np.float32)) for c, p in probs.items()}
    frames = []
    for kind, labels in (("raw", raw), ("post", post)):
        rows, pooled.setdefault(run, {})[kind] = _split_counts(
            _metric_rows(labels, targets, regions, spacings)
        )
        frames.append(pd.DataFrame(rows).assign(run=run, postprocess=kind))
    return frames


def _examples(test_set: SegDataset, targets, ensemble, postprocess, n: int) -> dict[str, np.ndarray]:
    rows_of: dict[str, dict] = defaultdict(dict)
    for row, sample in zip(test_set.indices, test_set.samples, strict=True):
        rows_of[sample["case_id"]][sample["slice"] or 0] = row
    images, masks, preds, ids = [], [], [], []
    for case_id in sorted(targets)[:n]:
        target = targets[case_id]
        pred = apply_postprocess(postprocess, ensemble[case_id])
        k = 0
        if target.ndim == 3:  # a volume: the slice with the largest ground truth
            k = int(np.argmax((target > 0).reshape(len(target), -1).sum(1)))
            target, pred = target[k], pred[k]
        images.append(np.asarray(test_set.images[rows_of[case_id][k]]))
        masks.append(target)
        preds.append(pred)
        ids.append(case_id)
    return {
        "images": np.stack(images),
        "targets": np.stack(masks),
        "preds": np.stack(preds),
        "case_ids": np.array(ids),
    }
