"""`medfusion evaluate`: score a trained run on a folder of images and masks, without retraining.

Every checkpoint of the run (each fold x seed, `run` = its folder name) and their fold ensemble
(`ensemble`: the mean of their probabilities, as `medfusion predict`) predict every image; each
prediction is resized back to the image's own size (`resample.labels_at`, as the pipeline's
evaluation at eval.resolution: original) and scored against its mask at that size with the
pipeline's metrics (`metrics.region_metrics`: Dice, IoU, precision, recall, F1, HD95 and ASSD in
original pixels, per image and scored region). Masks are read as preprocessing reads them
(`preprocess.label_2d`, `mask_threshold` for grey masks); volumes (NIfTI) as label volumes, scored
in mm.

Post-processing: where the run's evaluation recorded the settings it chose on validation
(data/eval/<dataset>/<model>/eval.json beside data/runs/<dataset>/<model>, or --eval-json), the
`post` rows apply them (per run, and the ensemble's); otherwise only `raw` (argmax) rows are written.

Field of view (`fov_dir`, optional, same stems): a pixel counts only where the FOV mask is non-zero.
Prediction and ground truth are both set to background outside it (the prediction before
post-processing, as the pipeline's evaluation does with a custom dataset's fov/), so overlap metrics
count only FOV pixels; boundaries are those of the masked maps (our choice: HD95/ASSD are computed on
the masked maps, the FOV border being common to neither unless a structure touches it).

Output (`out_dir`, each file written whole through a rename): per_case.csv (columns run, case_id,
class, metric, value, postprocess, resolution, group, roi; one row per case, region and metric, as the
pipeline's), summary.csv (mean, std and n per run, postprocess, class and metric, and the pooled
"global" Dice per region), summary.md (the same for the ensemble, with how it was computed).

Memory: one case at a time: its image, its (runs + 1) probability maps at the model's size and the
label maps at the original size; the rows grow with cases x regions x metrics (a few hundred bytes each).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from medfusion.common import atomic_write
from medfusion.data import preprocess
from medfusion.data.fetch import NIFTI_SUFFIXES, FetchError, channel_case, stem_pairs
from medfusion.data.io import IMAGE_SUFFIXES, DataError, read_json
from medfusion.data.preprocess import (
    THRESHOLD_KEY,
    empty_masks_error,
    label_2d,
    read_label,
    read_volume_label,
)
from medfusion.data.registry import DATASETS, scored_regions
from medfusion.hardware import out_of_memory_explained
from medfusion.metrics import COUNTS, FLAGS, PENALISED, PRESENT, pooled_dice, region_metrics
from medfusion.postprocess import PostProcess
from medfusion.postprocess import apply as apply_postprocess
from medfusion.predict import (
    Ensemble,
    Preprocessing,
    chosen_postprocess,
    ensemble_postprocess,
    ensemble_probs,
    expand_inputs,
    model_dir_of,
    model_inputs,
    read_input,
    takes_channel_files,
)
from medfusion.resample import labels_at


@dataclasses.dataclass(frozen=True)
class FolderCase:
    """One image (or volume) of the folder, its mask and its field of view (None: the whole image)."""

    image: Path
    mask: Path
    fov: Path | None = None
    case_id: str = ""  # per_case.csv's case_id: the image's file name where not given
    group: str = ""  # the patient (statistics by patient): the case itself where not given

    @property
    def name(self) -> str:
        return self.case_id or self.image.name


def folder_cases(
    images: Path, masks: Path, kind: str, fov: Path | None = None, prep: Preprocessing | None = None
) -> list[FolderCase]:
    """The (image, mask[, fov]) triples matched by file stem; `kind` image | volume. For a model of
    several grey channels or volume channels (`prep`), a case given as nnU-Net channel files
    <case>_0000<ending>, <case>_0001<ending>, ... is matched by <case> (its mask: <case><ending>, as
    in nnU-Net's labelsTr/).

    Raises:
        DataError: a folder missing or empty, an image without its mask or FOV mask, a file of the
            wrong kind (naming it).
    """
    wanted = NIFTI_SUFFIXES if kind == "volume" else IMAGE_SUFFIXES
    for folder, option in ((images, "--images"), (masks, "--masks"), (fov, "--fov")):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{option} {folder}: no such folder")
    expects = f"a model trained on {'volumes' if kind == 'volume' else '2-D images'}"
    kept = set(expand_inputs([Path(images)], prep)) if takes_channel_files(prep) else None
    try:
        pairs = stem_pairs(Path(images), Path(masks), wanted, expects, keep=kept)
        fovs = (
            dict(stem_pairs(Path(images), Path(fov), wanted, expects, what="FOV mask", keep=kept))
            if fov
            else {}
        )
    except FetchError as err:
        raise DataError(str(err)) from None
    # a case of channel files is named by its mask (case.png), as any other by its image file
    return [
        FolderCase(
            image, mask, fovs.get(image), mask.name if kept is not None and channel_case(image) else ""
        )
        for image, mask in pairs
    ]


def read_fov(path: Path, shape: tuple[int, ...], image_name: str) -> np.ndarray:
    """A field-of-view mask as bool (non-zero = inside) of the image's `shape` (a volume's: the same
    2-D field of view on every slice)."""
    fov = preprocess.read_fov(path, shape, image_name)
    return fov if len(shape) == 2 else np.broadcast_to(fov, shape)


def run_regions(ensemble: Ensemble) -> dict[str, list[int]]:
    """The scored regions of the training dataset: its processed meta.json's (beside the run, or the
    one the preprocessing came from), the registry's, or each class alone as class_1, class_2, ..."""
    source = Path(ensemble.preprocessing.source.split(" (")[0])
    model_dir = model_dir_of(ensemble)
    for meta_path in (source, model_dir.parent.parent.parent / "processed" / ensemble.dataset / "meta.json"):
        if meta_path.name == "meta.json" and meta_path.is_file():
            meta = read_json(meta_path)
            return scored_regions(meta["class_names"], meta.get("regions"))
    spec = DATASETS.get(ensemble.dataset)
    if spec is not None:
        return spec.scored_regions()
    names = ["background"] + [f"class_{k}" for k in range(1, ensemble.num_classes)]
    return scored_regions(names, None)


def run_names(ensemble: Ensemble) -> list[str]:
    """Each checkpoint's run name: its folder (fold0_seed0, ...), or the file's stem for a lone model.pt."""
    names = [p.parent.name if p.name == "model.pt" else p.stem for p in ensemble.paths]
    return names if len(set(names)) == len(names) else [f"run{k}" for k in range(len(names))]


def case_probs(ensemble: Ensemble, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Each checkpoint's softmax probabilities of one case, (K, n, S, S) float32 each."""
    per_model = []
    for model in ensemble.models:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size])
            with out_of_memory_explained(
                "evaluation", batch, model, ensemble.precision.device, "--batch-size", None, "--device"
            ):
                chunks.append(
                    ensemble_probs(
                        [model], batch, ensemble.precision, ensemble.patch_size, ensemble.tta
                    ).numpy()
                )
        per_model.append(np.concatenate(chunks).transpose(1, 0, 2, 3))
    return per_model


THRESHOLD_OPTION = "--mask-threshold"  # `medfusion evaluate`'s, named in its messages


def _read_target(case: FolderCase, ensemble: Ensemble, mask_threshold, spec=None) -> np.ndarray:
    """The case's ground truth: read as the target dataset's preprocessing reads it (`spec`: its
    DatasetSpec, with its mask threshold and label rules), or as a folder of the model's classes."""
    if spec is not None:
        return read_label(case.mask, spec.kind, spec.name, spec.class_names, spec.mask_threshold)
    if ensemble.preprocessing.kind == "image":
        return label_2d(case.mask, ensemble.num_classes, mask_threshold, THRESHOLD_OPTION)[0]
    return read_volume_label(case.mask, ensemble.dataset, ["c"] * ensemble.num_classes)


def check_masks(ensemble: Ensemble, cases: list[FolderCase], mask_threshold=None, spec=None) -> None:
    """Read every 2-D mask before any prediction and refuse a folder whose masks are (nearly) all
    empty once read (`preprocess.empty_masks_error`: JPEG masks holding 0/1, say). Volumes are not
    read twice: their masks are checked as each case is scored. Memory: one mask at a time.

    Raises:
        DataError: a mask that cannot be read as labels, or the refusal."""
    if (spec.kind if spec is not None else ensemble.preprocessing.kind) != "image" or not cases:
        return
    empty = sum(not _read_target(case, ensemble, mask_threshold, spec).any() for case in cases)
    threshold = spec.mask_threshold if spec is not None else mask_threshold
    option = THRESHOLD_OPTION if spec is None else THRESHOLD_KEY
    refused = empty_masks_error(empty, len(cases), cases[0].mask, threshold, option)
    if refused is not None:
        raise refused


def _target(case: FolderCase, ensemble: Ensemble, mask_threshold, image_shape, spec=None) -> np.ndarray:
    """The case's ground truth (`_read_target`), checked against its image's size."""
    target = _read_target(case, ensemble, mask_threshold, spec)
    if target.shape != tuple(image_shape):
        raise DataError(
            f"{case.mask}: mask size {target.shape} differs from image {case.image.name} {image_shape}"
        )
    return target


def score_case(
    ensemble: Ensemble,
    case: FolderCase,
    regions: dict[str, list[int]],
    post: dict[str, PostProcess],
    mask_threshold: int | None = None,
    batch_size: int = 16,
    spec=None,
) -> list[dict]:
    """Metric rows of every run and the ensemble on one case (raw, and post where `post` has the run);
    `spec`: the target dataset's DatasetSpec, to read the ground truth as its preprocessing does."""
    prep = ensemble.preprocessing
    raw_case = read_input(case.image, prep)
    shape = raw_case.label.shape  # (H, W) or (D, H, W)
    target = _target(case, ensemble, mask_threshold, shape, spec)
    fov = read_fov(case.fov, shape, case.image.name) if case.fov is not None else None
    if fov is not None:
        target = np.where(fov, target, 0).astype(np.uint8)
    per_model = case_probs(ensemble, model_inputs(raw_case, prep), batch_size)
    runs = dict(zip(run_names(ensemble), per_model, strict=True))
    if len(per_model) > 1:
        runs["ensemble"] = sum(per_model) / len(per_model)
    spacing = raw_case.spacing if prep.kind == "volume" else None
    rows = []
    for run, probs in runs.items():
        if prep.kind == "image":
            probs = probs[:, 0, : shape[0], : shape[1]] if prep.native else probs[:, 0]
        kinds = {"raw": labels_at(probs, shape)}
        if run in post:
            kinds["post"] = apply_postprocess(post[run], probs, shape, fov)
        for kind, labels in kinds.items():
            if fov is not None:
                labels = np.where(fov, labels, 0).astype(np.uint8)
            for region, values in region_metrics(labels, target, regions, spacing).items():
                rows += [
                    {"run": run, "case_id": case.name, "class": region, "metric": k, "value": v,
                     "postprocess": kind}
                    for k, v in values.items()
                ]  # fmt: skip
    return rows


def summarise(per_case: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """mean, std, n per (run, postprocess, class, metric), plus the pooled Dice per region ("global_dice").
    No value is skipped (a NaN makes the mean NaN); the indicator rows (`metrics.FLAGS`) give, as their
    mean, the share of cases penalised (HD95/ASSD = the case's diagonal) and with the structure."""
    summary = (
        per_case.groupby(["run", "postprocess", "class", "metric"])["value"]
        .agg(mean=lambda v: v.mean(skipna=False), std="std", n="size")
        .reset_index()
    )
    pooled = []
    for (run, kind, region), group in counts.groupby(["run", "postprocess", "class"]):
        c = {m: group.loc[group["metric"] == m, "value"].tolist() for m in COUNTS}
        pooled.append(
            {"run": run, "postprocess": kind, "class": region, "metric": "global_dice",
             "mean": pooled_dice(c["tp"], c["fp"], c["fn"]), "std": float("nan"), "n": len(c["tp"])}
        )  # fmt: skip
    return pd.concat([summary, pd.DataFrame(pooled)], ignore_index=True)


def evaluate_folder(
    ensemble: Ensemble,
    cases: list[FolderCase],
    out_dir: Path,
    mask_threshold: int | None = None,
    eval_json: Path | None = None,
    batch_size: int = 16,
    spec=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score `ensemble` on `cases` and write per_case.csv, summary.csv and summary.md into `out_dir`
    (module docstring); `spec`: the target dataset's, when the cases are a dataset's (transfer).
    -> (per_case without the voxel counts, summary)."""
    check_masks(ensemble, cases, mask_threshold, spec)
    regions = run_regions(ensemble)
    recorded = chosen_postprocess(ensemble, eval_json)
    post = {run: recorded[run] for run in run_names(ensemble) if run in recorded}
    if len(ensemble.paths) > 1 and ensemble_postprocess(ensemble, recorded) is not None:
        post["ensemble"] = ensemble_postprocess(ensemble, recorded)
    rows = []
    for case in tqdm(cases, desc="evaluate", unit="case"):
        rows += score_case(ensemble, case, regions, post, mask_threshold, batch_size, spec)
    frame = pd.DataFrame(rows)
    roi = "fov" if any(c.fov is not None for c in cases) else "image"
    groups = {c.name: c.group or c.name for c in cases}
    frame = frame.assign(resolution="original", group=frame["case_id"].map(groups), roi=roi)
    is_count = frame["metric"].isin(COUNTS)
    per_case, summary = frame[~is_count].reset_index(drop=True), summarise(frame[~is_count], frame[is_count])
    out_dir = Path(out_dir)
    atomic_write(out_dir / "per_case.csv", per_case.to_csv(index=False))
    atomic_write(out_dir / "summary.csv", summary.to_csv(index=False))
    atomic_write(
        out_dir / "summary.md", summary_markdown(ensemble, summary, len(cases), roi, mask_threshold, post)
    )
    return per_case, summary


def summary_markdown(ensemble, summary: pd.DataFrame, n_cases: int, roi: str, mask_threshold, post) -> str:
    """The ensemble's (or the one run's) mean ± std per region and metric, with how it was computed."""
    run = "ensemble" if "ensemble" in set(summary["run"]) else summary["run"].iloc[0]
    kind = ensemble.preprocessing.kind
    lines = [
        f"# {ensemble.dataset} model on {n_cases} {'images' if kind == 'image' else 'volumes'}",
        "",
        f"Run `{run}` ({len(ensemble.paths)} checkpoint(s): {', '.join(str(p) for p in ensemble.paths)}). "
        f"Per {'image' if kind == 'image' else 'volume'}, mean ± std over cases, at each case's original "
        f"size (predicted at the model's input size, probabilities resized back); distances in "
        f"{'pixels' if kind == 'image' else 'mm'}; "
        + ("inside the field of view only; " if roi == "fov" else "over the whole image; ")
        + (f"masks binarised at > {mask_threshold}; " if mask_threshold is not None else "")
        + ("flip TTA; " if ensemble.tta == "flip" else "")
        + (
            "post: the post-processing chosen on validation (eval.json)."
            if post
            else "raw argmax, no post-processing."
        ),
        "",
        "| postprocess | class | " + " | ".join(METRICS_SHOWN) + " | penalised | without it | global Dice |",
        "|" + "---|" * (len(METRICS_SHOWN) + 5),
    ]
    table = summary[summary["run"] == run]
    for (kind_, region), group in table.groupby(["postprocess", "class"]):
        value = {m: group.loc[group["metric"] == m] for m in [*METRICS_SHOWN, *FLAGS, "global_dice"]}
        cells = []
        for m in METRICS_SHOWN:
            v = value[m]
            scale = 1 if m in ("hd95", "assd") else 100
            cells.append(
                f"{scale * v['mean'].iloc[0]:.2f} ± {scale * v['std'].fillna(0).iloc[0]:.2f}"
                if len(v)
                else "-"
            )
        for flag, share in ((PENALISED, False), (PRESENT, True)):  # counts of cases: share x n
            v = value[flag]
            count = (
                round((1 - v["mean"].iloc[0] if share else v["mean"].iloc[0]) * v["n"].iloc[0])
                if len(v)
                else None
            )
            cells.append("-" if count is None else f"{count}/{int(v['n'].iloc[0])}")
        pooled = value["global_dice"]
        cells.append(f"{100 * pooled['mean'].iloc[0]:.2f}" if len(pooled) else "-")
        lines.append(f"| {kind_} | {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nDice, IoU, precision, recall in %; per_case.csv holds every case. HD95 (95th percentile of the "
        "surface distances of both directions pooled) and ASSD over every case: a missed or spurious structure "
        "(one mask empty, the other not) scores the case's diagonal (the BraTS convention); 'penalised' counts "
        "those cases. 'without it': cases whose ground truth lacks the structure (Dice 1 when predicted empty, "
        "else 0).\n"
    )


METRICS_SHOWN = ("dice", "iou", "precision", "recall", "hd95", "assd")
