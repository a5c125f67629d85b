"""Cross-dataset evaluation without retraining (`eval.transfer`, stage transfer@<train dataset>).

Every entry trained on dataset D (each fold x seed run and their fold ensemble) predicts *all* cases
of each target dataset T of eval.transfer[D], preprocessed with D's recorded preprocessing (the
checkpoints' record: size, intensity steps, channels), and is scored as `medfusion evaluate` scores
a folder (`folder_eval`: each case at its original size, T's ground truth read as T's preprocessing
reads it, its mask threshold and field of view applied, the post-processing chosen on D's
validation applied in the `post` rows). Checks before any prediction: T's class count is D's, and
T's channels fit the model (a colour image for a grey model is refused by `predict.read_input`).

Output per target and entry: data/eval/transfer/<D>/<T>/<entry>/{per_case.csv, summary.csv,
summary.md, transfer.json}; per target, stats.csv: CASNet against every other entry, paired per
case (each case's value averaged over the runs, `stats.compare_models`, Holm-corrected, by patient
where T's patients give several cases), as the in-dataset statistics are computed.

Where T is not one of `datasets` (no fetch stage), its files are read from data.sources.<T> and
validated as the fetch stage does, into a temporary folder (hard links where possible) that is removed
afterwards; DVC sees a change of that path (params data.sources), not of the files in it.

Memory: one case at a time (see `folder_eval`); the rows of one target and entry.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from medfusion.common import atomic_write
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import write_json
from medfusion.data.preprocess import case_refs
from medfusion.data.registry import DatasetSpec
from medfusion.folder_eval import FolderCase, evaluate_folder
from medfusion.predict import PredictError, load_ensemble
from medfusion.stats import compare_models


class TransferError(ValueError):
    """A transfer target that does not fit the trained models (classes, channels, missing data)."""


def target_cases(spec: DatasetSpec, raw_dir: Path, group_pattern: str | None = None) -> list[FolderCase]:
    """Every labelled case of a fetched dataset, as folder cases with its id, patient and field of view."""
    return [
        FolderCase(ref.image, ref.label, ref.fov, ref.case_id, ref.group)
        for ref in case_refs(spec, Path(raw_dir), group_pattern)
    ]


@contextlib.contextmanager
def target_raw(
    target: str, raw_root: Path, source: str | None, synthetic, custom: dict | None
) -> Iterator[Path]:
    """data/raw/<target> where the pipeline fetched it, else a validated temporary copy of `source`."""
    fetched = Path(raw_root) / target
    if fetched.is_dir():
        yield fetched
        return
    if source is None and custom is not None:
        raise TransferError(
            f"eval.transfer target {target!r}: no data/raw/{target} and data.sources.{target} is null; "
            f"set data.sources.{target} to its folder"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f"transfer-{target}-"))
    try:
        fetch_dataset(target, tmp / target, source, synthetic, custom)
        yield tmp / target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def transfer_entry(
    runs_dir: Path,
    processed_meta: Path,
    spec: DatasetSpec,
    cases: list[FolderCase],
    out_dir: Path,
    precision,
    batch_size: int = 16,
) -> pd.DataFrame:
    """One entry (its runs and their ensemble, `runs_dir`) scored on one target's `cases`.

    Raises:
        TransferError: the target's classes are not the model's.
    """
    try:
        ensemble = load_ensemble(runs_dir, precision, processed_meta)
    except PredictError as err:
        raise TransferError(str(err)) from None
    if ensemble.num_classes != spec.num_classes:
        raise TransferError(
            f"{runs_dir}: {ensemble.num_classes} classes; target {spec.name!r} has {spec.num_classes} "
            f"({list(spec.class_names)}): a model can only be scored on data of its classes"
        )
    per_case, _ = evaluate_folder(ensemble, cases, out_dir, spec.mask_threshold, None, batch_size, spec)
    write_json(
        Path(out_dir) / "transfer.json",
        {
            "trained_on": ensemble.dataset,
            "target": spec.name,
            "target_title": spec.title,
            "cases": len(cases),
            "runs": len(ensemble.paths),
            "preprocessing": ensemble.preprocessing.source,
            "roi": "fov" if any(c.fov is not None for c in cases) else "image",
        },
    )
    return per_case


def transfer_stats(per_case: dict[str, pd.DataFrame], models: list[str], target: str) -> pd.DataFrame:
    """CASNet (models[0]) against every other entry on one target, as the in-dataset statistics."""
    frames = [frame.assign(model=model, dataset=target) for model, frame in per_case.items()]
    post = "post" if all("post" in set(f["postprocess"]) for f in frames) else "raw"
    return compare_models(pd.concat(frames, ignore_index=True), models, postprocess=post)


def write_stats(path: Path, stats: pd.DataFrame) -> None:
    atomic_write(path, stats.to_csv(index=False))


def check_target(name: str, spec: DatasetSpec, trained: DatasetSpec) -> None:
    """Refuse a target whose classes differ from the training dataset's, before any prediction."""
    if spec.num_classes != trained.num_classes:
        raise TransferError(
            f"eval.transfer.{trained.name}: target {name!r} has classes {list(spec.class_names)}, "
            f"{trained.name!r} {list(trained.class_names)}: a model is scored on data of its own classes"
        )
    if spec.in_channels != trained.in_channels and not (spec.in_channels == 1 and trained.in_channels == 3):
        raise TransferError(
            f"eval.transfer.{trained.name}: target {name!r} has {spec.in_channels} channel(s), the models "
            f"of {trained.name!r} take {trained.in_channels}"
        )
