"""Cross-dataset evaluation without retraining (`eval.transfer`, stage transfer@<train dataset>).

Every entry trained on dataset D (each fold x seed run and their fold ensemble) predicts *all* cases
of each target dataset T of eval.transfer[D], preprocessed with D's recorded preprocessing (the
checkpoints' record: size, intensity steps, channels), and is scored as `medfusion evaluate` scores
a folder (`folder_eval`: each case at its original size, T's ground truth read as T's preprocessing
reads it, its mask threshold and field of view applied, the post-processing chosen on D's
validation applied in the `post` rows). Checks before any prediction: T's class count is D's, and
T's channels fit the model (a colour image for a grey model is refused by `predict.read_input`), and
T holds none of D's cases (`check_overlap`): a training case scored as unseen inflates the transfer
score. Every target is checked before the first model is loaded.

Shared cases are found by source identity where the registry knows it (DatasetSpec.collection: lits17
and msd_liver are both LiTS, msd_liver's liver_N is volume-N), otherwise by sha256 of the raw image
files (data/raw/<D> against T's files; a case's every image file, an .mhd's .raw data). Labels are not
compared: an image seen in training is seen whatever its label, and equal label files (an empty mask)
do not make equal cases. Files are hashed only where a file of the same size exists on the other side.

Output per target and entry: data/eval/transfer/<D>/<T>/<entry>/{per_case.csv, summary.csv,
summary.md, transfer.json}; per target, stats.csv: CASNet against every other entry, paired per
case (each case's value averaged over the runs, `stats.compare_models`, Holm-corrected, by patient
where T's patients give several cases), as the in-dataset statistics are computed.

Where T is not one of `datasets` (no fetch stage), its files are read from data.sources.<T> and
validated as the fetch stage does, into a temporary folder (hard links where possible) that is removed
afterwards (once per stage: the checks and the scoring read the same copy; every target's copy is
held until the stage ends, hard links where the filesystem allows); DVC sees a change of that path
(params data.sources), not of the files in it.

Memory: one case at a time (see `folder_eval`); the rows of one target and entry; the overlap check
reads files in 1 MiB chunks and holds one size and at most one digest per file.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from medfusion.common import UserError, atomic_write
from medfusion.data.fetch import FetchError, channel_files, fetch_dataset, file_digest
from medfusion.data.io import write_json
from medfusion.data.preprocess import CaseRef, case_refs
from medfusion.data.registry import DatasetSpec
from medfusion.folder_eval import FolderCase, evaluate_folder
from medfusion.predict import PredictError, load_ensemble
from medfusion.stats import compare_models


class TransferError(UserError, ValueError):
    """A transfer target that does not fit the trained models (classes, channels, shared cases, no data)."""


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


SHOWN = 10  # shared cases named in the error; the count gives the rest


def check_overlap(name: str, spec: DatasetSpec, raw: Path, trained: DatasetSpec, trained_raw: Path) -> None:
    """Refuse target `name` (its fetched files at `raw`) when it holds cases of the training data
    (`trained_raw`: data/raw/<trained>): by the registry's source collection where both datasets are of
    one, else by sha256 of the raw image files. Run before any model is loaded.

    Raises:
        TransferError: shared cases (up to SHOWN named, with the count), a collection whose case ids
            cannot be matched, or no training data to compare with.
    """
    if not Path(trained_raw).is_dir():
        raise TransferError(
            f"eval.transfer.{trained.name}: no {trained_raw} to compare target {name!r} with (the overlap "
            f"check reads the training cases); fetch it first: dvc repro fetch@{trained.name}"
        )
    try:
        mine, theirs = case_refs(trained, Path(trained_raw)), case_refs(spec, Path(raw))
    except FetchError as err:
        raise TransferError(f"eval.transfer.{trained.name}: target {name!r}: {err}") from None
    if spec.collection and trained.collection and spec.collection[0] == trained.collection[0]:
        shared = _shared_by_identity(name, spec, theirs, trained, mine)
        how = f"both are {spec.collection[0]}: the same cases, by case number"
    else:
        shared = _shared_by_content(spec, theirs, trained, mine)
        how = "byte-identical image files, sha256"
    if shared:
        listed = ", ".join(f"{t} = {trained.name}'s {d}" for t, d in shared[:SHOWN])
        more = f" (first {SHOWN} of {len(shared)})" if len(shared) > SHOWN else ""
        raise TransferError(
            f"eval.transfer.{trained.name}: target {name!r} shares {len(shared)} case(s) with the training "
            f"data {trained_raw} ({how}): {listed}{more}. A transfer target must be data the models never "
            f"saw: remove {name!r} from eval.transfer.{trained.name} in params.yaml, or remove the shared "
            f"cases from the target's files (data.sources.{name}) and fetch it again"
        )


def _shared_by_identity(
    name: str, spec: DatasetSpec, theirs: list[CaseRef], trained: DatasetSpec, mine: list[CaseRef]
) -> list[tuple[str, str]]:
    """(target case, training case) pairs of one collection, matched by its case number; refuses the
    whole target when a case id does not map 1:1 to a number."""
    collection, numbers = spec.collection[0], []
    for ds, refs in ((spec, theirs), (trained, mine)):
        by_number: dict[int, str] = {}
        for ref in refs:
            m = re.fullmatch(ds.collection[1], ref.case_id)
            if m is None or int(m.group(1)) in by_number:
                what = (
                    f"cases {by_number[int(m.group(1))]!r} and {ref.case_id!r} are one {collection} case"
                    if m else f"case {ref.case_id!r} is not named as expected ({ds.collection[1]})"
                )  # fmt: skip
                raise TransferError(
                    f"eval.transfer.{trained.name}: target {name!r} and {trained.name!r} are both drawn "
                    f"from {collection}, and {ds.name}'s {what}: its case ids do not map 1:1 to "
                    f"{collection}'s, so the shared cases cannot be told apart. Remove {name!r} from "
                    f"eval.transfer.{trained.name} in params.yaml"
                )
            by_number[int(m.group(1))] = ref.case_id
        numbers.append(by_number)
    target, training = numbers
    return [(target[n], training[n]) for n in sorted(target.keys() & training.keys())]


def _image_files(spec: DatasetSpec, ref: CaseRef) -> list[Path]:
    """A case's image files as compared: every channel file, an .mhd header's .raw data instead of it."""
    files = channel_files(ref.image, spec.channel_files)
    return [f.with_suffix(".raw") if f.suffix.lower() == ".mhd" else f for f in files]


def _shared_by_content(
    spec: DatasetSpec, theirs: list[CaseRef], trained: DatasetSpec, mine: list[CaseRef]
) -> list[tuple[str, str]]:
    """(target case, training case) pairs with a byte-identical image file (sha256), in target order.
    Only files whose size occurs on both sides are read (1 MiB chunks)."""
    sides = []
    for ds, refs in ((spec, theirs), (trained, mine)):
        try:
            sides.append([(ref.case_id, f, f.stat().st_size) for ref in refs for f in _image_files(ds, ref)])
        except (FetchError, OSError) as err:
            raise TransferError(f"{ds.name}: cannot read its image files ({err})") from None
    target, training = sides
    both = {size for *_, size in target} & {size for *_, size in training}
    digests: dict[str, str] = {}
    for case_id, path, size in training:
        if size in both:
            digests.setdefault(file_digest(path, "sha256"), case_id)
    shared: dict[str, str] = {}
    for case_id, path, size in target:
        if size in both and case_id not in shared:
            match = digests.get(file_digest(path, "sha256"))
            if match is not None:
                shared[case_id] = match
    return list(shared.items())
