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
from medfusion.data.io import read_json, write_json
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


def load_results(transfer_dir: Path) -> list[dict]:
    """Every finished transfer under data/eval/transfer: [{trained_on, target, title, stats, entries:
    {entry: per_case}, info}], sorted by training dataset and target. [] when there is none."""
    results = []
    for target_dir in sorted(Path(transfer_dir).glob("*/*")):
        if not (target_dir / "stats.csv").is_file():
            continue
        entries, info = {}, {}
        for entry_dir in sorted(p for p in target_dir.iterdir() if (p / "per_case.csv").is_file()):
            entries[entry_dir.name] = pd.read_csv(entry_dir / "per_case.csv")
            info = read_json(entry_dir / "transfer.json")
        stats = (
            pd.read_csv(target_dir / "stats.csv")
            if (target_dir / "stats.csv").stat().st_size
            else pd.DataFrame()
        )
        results.append(
            {"trained_on": target_dir.parent.name, "target": target_dir.name, "stats": stats,
             "entries": entries, "info": info}
        )  # fmt: skip
    return results


def _kind(frame: pd.DataFrame) -> str:
    return "post" if "post" in set(frame["postprocess"]) else "raw"


def generalisation_table(results: list[dict], models: list[str]) -> tuple[str, pd.DataFrame]:
    """reports/tables/generalisation: per (training dataset -> target, class, entry) the Dice over runs
    (each run's mean over the target's cases: mean ± std), the fold ensemble's Dice and HD95, and
    CASNet's paired per-case difference (Holm-corrected t-test). -> (markdown, the rows as a frame)."""
    rows = []
    for result in results:
        stats = result["stats"]
        for entry in [m for m in models if m in result["entries"]]:
            frame = result["entries"][entry]
            frame = frame[frame["postprocess"] == _kind(frame)]
            for region, by_class in frame.groupby("class"):
                dice = by_class[by_class["metric"] == "dice"]
                per_run = dice[dice["run"] != "ensemble"].groupby("run")["value"].mean()
                ens = by_class[
                    by_class["run"]
                    == ("ensemble" if "ensemble" in set(by_class["run"]) else per_run.index[0])
                ]
                test = (
                    stats[(stats["class"] == region) & (stats["metric"] == "dice") & (stats["model"] == entry)]
                    if len(stats) else pd.DataFrame()
                )  # fmt: skip
                rows.append({
                    "trained_on": result["trained_on"], "target": result["target"], "class": region,
                    "model": entry, "postprocess": _kind(frame), "runs": len(per_run),
                    "cases": dice["case_id"].nunique(), "roi": result["info"].get("roi", "image"),
                    "dice_mean": per_run.mean(), "dice_std": per_run.std(ddof=1) if len(per_run) > 1 else float("nan"),
                    "ensemble_dice": ens[ens["metric"] == "dice"]["value"].mean(),
                    "ensemble_hd95": ens[ens["metric"] == "hd95"]["value"].mean(),
                    "diff_vs_reference": test["mean_diff"].iloc[0] if len(test) else float("nan"),
                    "ci_low": test["ci_low"].iloc[0] if len(test) else float("nan"),
                    "ci_high": test["ci_high"].iloc[0] if len(test) else float("nan"),
                    "p_holm": test["p_t_holm"].iloc[0] if len(test) else float("nan"),
                })  # fmt: skip
    frame = pd.DataFrame(rows)
    return _generalisation_markdown(frame, models[0]), frame


def _pct(v: float) -> str:
    return "-" if pd.isna(v) else f"{100 * v:.2f}"


def _generalisation_markdown(frame: pd.DataFrame, reference: str) -> str:
    lines = [
        "# Generalisation: trained on one dataset, tested on another without retraining",
        "",
        "Every entry's runs (folds x seeds) and their fold ensemble, trained on the first dataset, predict "
        "*all* cases of the target, preprocessed as the training data was (eval.transfer; "
        "`medfusion/transfer.py`). Each case scored at its original size against the target's own ground "
        "truth (inside its field of view where it has one), with the post-processing chosen on the "
        'training dataset\'s validation folds. Dice (%) per case; "runs": mean ± std over runs of each '
        f"run's mean over the cases; Δ: the entry minus `{reference}` per case (each case averaged over "
        "the runs), 95% CI, paired t-test Holm-corrected over the entries.",
        "",
        "| trained on → target | class | entry | cases | Dice, runs | Dice, ensemble | HD95 ensemble (px/mm) "
        f"| Δ Dice vs `{reference}` [95% CI] | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.to_dict("records"):
        spread = "" if pd.isna(r["dice_std"]) else f" ± {100 * r['dice_std']:.2f}"
        delta = (
            "-" if pd.isna(r["diff_vs_reference"])
            else f"{100 * r['diff_vs_reference']:+.2f} [{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]"
        )  # fmt: skip
        p = "-" if pd.isna(r["p_holm"]) else f"{r['p_holm']:.2g}"
        where = " (FOV)" if r["roi"] == "fov" else ""
        hd95 = "-" if pd.isna(r["ensemble_hd95"]) else f"{r['ensemble_hd95']:.2f}"
        lines.append(
            f"| `{r['trained_on']}` → `{r['target']}`{where} | {r['class']} | `{r['model']}` | {r['cases']} "
            f"| {_pct(r['dice_mean'])}{spread} ({r['runs']} runs) | {_pct(r['ensemble_dice'])} "
            f"| {hd95} | {delta} | {p} |"
        )
    return "\n".join(lines) + "\n"


def mlflow_transfer_metrics(results: list[dict], trained_on: str, entry: str) -> dict[str, float]:
    """The parent run's transfer metrics: `transfer_<target>_dice_<class>` (the ensemble's, post-processed
    where chosen) and `transfer_<target>_dice_runs_<class>` (mean over runs)."""
    metrics = {}
    for result in results:
        frame = result["entries"].get(entry)
        if result["trained_on"] != trained_on or frame is None:
            continue
        frame = frame[(frame["postprocess"] == _kind(frame)) & (frame["metric"] == "dice")]
        for region, by_class in frame.groupby("class"):
            runs = by_class[by_class["run"] != "ensemble"].groupby("run")["value"].mean()
            ens = by_class[by_class["run"] == "ensemble"]["value"]
            metrics[f"transfer_{result['target']}_dice_runs_{region}"] = float(runs.mean())
            if len(ens):
                metrics[f"transfer_{result['target']}_dice_{region}"] = float(ens.mean())
    return metrics
