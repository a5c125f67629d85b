"""Stage evaluate@<dataset>-<model>: every trained run and their fold ensemble on the test split.

Writes data/eval/<dataset>/<model>/: per_case.csv (the long table: dataset, model, run, case_id,
class, metric, value, postprocess, resolution, group: the patient), summary.csv, eval.json (distance unit, resolution
(eval.resolution: original, the default, or processed), the post-processing chosen on validation
per run, the scored regions and global Dice) and examples.npz (a few fixed test cases for the
report's qualitative figure); observer.csv where the dataset has a second observer (CHASE_DB1: its
labels scored against the first observer's, the human reference row of Table 2). And --metrics-file
(data/metrics/<dataset>/<model>.json, the stage's DVC metrics: `dvc exp show` has each model's
numbers as soon as its evaluation ends, before the report): `stage_metrics`. The report stage puts the test metrics and these files into the
model's MLflow runs (one store connection for all entries; MLflow costs each process seconds).
"""

from pathlib import Path

import numpy as np
import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import atomic_dir, read_json, write_json
from medfusion.evaluation import evaluate_model, score_second_observer
from medfusion.hardware import resolve_precision
from medfusion.report import summarize_runs

STAGE_METRICS = ("dice", "iou")


def stage_metrics(per_case) -> dict:
    """{metric: {class: {post, raw[, ensemble, ensemble_raw][, ensemble_tta]}}} for Dice and IoU: the
    mean over the trained runs of each run's mean over test cases (post-processed and raw), and the
    fold ensemble's, as the tables compute them (`summarize_runs`)."""
    out: dict = {}
    for kind, suffix in (("post", ""), ("raw", "_raw")):
        summary = summarize_runs(per_case, kind)
        for r in summary[summary["metric"].isin(STAGE_METRICS)].itertuples():
            key = ("post" if kind == "post" else "raw") if r.estimate == "runs" else f"{r.estimate}{suffix}"
            out.setdefault(r.metric, {}).setdefault(r._3, {})[key] = round(float(r.mean), 6)
    return out


def main(
    dataset: str = typer.Option(...),
    model: str = typer.Option(...),
    processed_dir: Path = typer.Option(...),
    split: Path = typer.Option(...),
    runs_dir: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    raw_dir: Path = typer.Option(None, help="the raw copy (original ground truth); default: meta.json's"),
    metrics_file: Path = typer.Option(None, help="also write the stage's DVC metrics (Dice/IoU) here"),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    precision = resolve_precision(params.train.device, params.train.cpu_bf16, params.train.channels_last)
    runs = read_json(runs_dir / "summary.json")["runs"]
    per_case, info, examples = evaluate_model(
        runs,
        runs_dir,
        processed_dir,
        read_json(split),
        params.eval.batch_size,
        precision,
        resolution=params.eval.resolution,
        raw_dir=raw_dir,
        tta=params.eval.tta,
    )
    per_case = per_case.assign(dataset=dataset, model=model)[
        [
            "dataset",
            "model",
            "run",
            "case_id",
            "class",
            "metric",
            "value",
            "postprocess",
            "resolution",
            "group",
        ]
    ]
    columns = list(per_case.columns)
    observer = score_second_observer(processed_dir, read_json(split), params.eval.resolution, raw_dir)
    summary = summarize_runs(per_case)
    with atomic_dir(out_dir) as tmp:  # an interrupted stage leaves no mix of old and new files
        if observer is not None:
            observer = observer.assign(dataset=dataset, model="second_observer")[columns]
            observer.to_csv(tmp / "observer.csv", index=False)
        per_case.to_csv(tmp / "per_case.csv", index=False)
        summary.to_csv(tmp / "summary.csv", index=False)
        write_json(tmp / "eval.json", {"dataset": dataset, "model": model, **info})
        np.savez_compressed(tmp / "examples.npz", **examples)
    if metrics_file is not None:
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(metrics_file, {dataset: {model: stage_metrics(per_case)}})

    trained = summary[summary["estimate"] == "runs"]
    print(trained[trained["metric"].isin(["dice", "iou", "hd95"])].to_string(index=False))


if __name__ == "__main__":
    run_stage(main)
