"""Stage evaluate@<dataset>-<model>: every trained run on the test split -> per-case long table."""

from pathlib import Path

import pandas as pd
import typer

from medfusion.config import load_params
from medfusion.data.io import read_json
from medfusion.evaluation import evaluate_run, summarize
from medfusion.training.loop import resolve_precision
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
    test_ids = read_json(split)["test"]
    runs = read_json(runs_dir / "summary.json")["runs"]
    state = read_json(runs_dir / "mlflow.json") if (runs_dir / "mlflow.json").exists() else {}
    tracker = Tracker.attach(resolve_tracking_uri(params.mlflow.tracking_uri), state.get("parent_run_id"))
    frames = []
    for run in runs:
        name = f"fold{run['fold']}_seed{run['seed']}"
        rows = evaluate_run(
            runs_dir / name / "model.pt", processed_dir, test_ids, params.eval.batch_size, precision
        )
        frame = pd.DataFrame(rows).assign(dataset=dataset, model=model, run=name)
        frames.append(frame)
        means = frame.groupby(["class", "metric"])["value"].mean()
        tracker.log_test_metrics(
            run.get("mlflow_run_id"), {f"test_{m}_{c}": v for (c, m), v in means.items()}
        )
    per_case = pd.concat(frames)[["dataset", "model", "run", "case_id", "class", "metric", "value"]]
    summary = summarize(per_case)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(out_dir / "per_case.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    parent_metrics = {f"test_{r.metric}_{r._3}": r.mean for r in summary.itertuples()}
    parent_metrics |= {f"test_{r.metric}_{r._3}_std": r.std for r in summary.itertuples()}
    tracker.log_test_metrics(None, parent_metrics, [out_dir / "per_case.csv", out_dir / "summary.csv"])
    print(summary.to_string(index=False))


if __name__ == "__main__":
    typer.run(main)
