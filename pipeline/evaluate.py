"""Stage evaluate@<dataset>-<model>: every trained run and their fold ensemble on the test split.

Writes data/eval/<dataset>/<model>/: per_case.csv (the long table: dataset, model, run, case_id,
class, metric, value, postprocess), summary.csv, eval.json (distance unit, resolution, the
post-processing chosen on validation per run) and examples.npz (a few fixed test cases for the
report's qualitative figure). Test metrics and per_case.csv go to the model's MLflow runs.
"""

from pathlib import Path

import numpy as np
import typer

from medfusion.common import run_name
from medfusion.config import load_params
from medfusion.data.io import atomic_dir, read_json, write_json
from medfusion.evaluation import evaluate_model
from medfusion.hardware import resolve_precision
from medfusion.report import summarize_runs
from medfusion.training.tracking import Tracker, resolve_tracking_uri


def main(
    dataset: str = typer.Option(...),
    model: str = typer.Option(...),
    processed_dir: Path = typer.Option(...),
    split: Path = typer.Option(...),
    runs_dir: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    precision = resolve_precision(params.train.device, params.train.cpu_bf16, params.train.channels_last)
    runs = read_json(runs_dir / "summary.json")["runs"]
    per_case, info, examples = evaluate_model(
        runs, runs_dir, processed_dir, read_json(split), params.eval.batch_size, precision
    )
    per_case = per_case.assign(dataset=dataset, model=model)[
        ["dataset", "model", "run", "case_id", "class", "metric", "value", "postprocess"]
    ]
    summary = summarize_runs(per_case)
    with atomic_dir(out_dir) as tmp:  # an interrupted stage leaves no mix of old and new files
        per_case.to_csv(tmp / "per_case.csv", index=False)
        summary.to_csv(tmp / "summary.csv", index=False)
        write_json(tmp / "eval.json", {"dataset": dataset, "model": model, **info})
        np.savez_compressed(tmp / "examples.npz", **examples)

    state = read_json(runs_dir / "mlflow.json") if (runs_dir / "mlflow.json").exists() else {}
    tracker = Tracker.attach(resolve_tracking_uri(params.mlflow.tracking_uri), state.get("parent_run_id"))
    post = per_case[per_case["postprocess"] == "post"]
    for run in runs:
        rows = post[post["run"] == run_name(run["fold"], run["seed"])]
        means = rows.groupby(["class", "metric"])["value"].mean()
        tracker.log_test_metrics(
            run.get("mlflow_run_id"), {f"test_{m}_{c}": v for (c, m), v in means.items()}
        )
    trained = summary[summary["estimate"] == "runs"]
    parent = {f"test_{r.metric}_{r._3}": r.mean for r in trained.itertuples()}
    parent |= {f"test_{r.metric}_{r._3}_std": r.std for r in trained.itertuples()}
    ensemble = summary[summary["estimate"] == "ensemble"]
    parent |= {f"test_ensemble_{r.metric}_{r._3}": r.mean for r in ensemble.itertuples()}
    tracker.log_test_metrics(
        None, parent, [out_dir / "per_case.csv", out_dir / "summary.csv", out_dir / "eval.json"]
    )
    print(trained[trained["metric"].isin(["dice", "iou", "hd95"])].to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
