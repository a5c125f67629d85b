"""Stage evaluate@<dataset>-<model>: every trained run and their fold ensemble on the test split.

Writes data/eval/<dataset>/<model>/: per_case.csv (the long table: dataset, model, run, case_id,
class, metric, value, postprocess, resolution, group: the patient), summary.csv, eval.json (distance unit, resolution
(eval.resolution: original, the default, or processed), the post-processing chosen on validation
per run, the scored regions and global Dice) and examples.npz (a few fixed test cases for the
report's qualitative figure); observer.csv where the dataset has a second observer (CHASE_DB1: its
labels scored against the first observer's, the human reference row of Table 2). And --metrics-file
(data/metrics/<dataset>/<model>.json, the stage's DVC metrics: `dvc exp show` has each model's
numbers as soon as its evaluation ends, before the report): `stage_metrics`. Where the entry's
training was tracked, its fold ensemble is logged as an MLflow model on its parent run (and the
CASNet entry's registered: medfusion/mlflow_model.py), after the files are written. The report stage puts the test metrics and these files into the
model's MLflow runs (one store connection for all entries; MLflow costs each process seconds).
"""

import sys
from pathlib import Path

import numpy as np
import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import atomic_dir, read_json, set_max_image_pixels, write_json
from medfusion.evaluation import evaluate_model, score_second_observer
from medfusion.hardware import resolve_precision
from medfusion.report import stage_metrics, summarize_runs


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
    set_max_image_pixels(params.data.max_image_pixels)  # larger 2-D files are refused, named
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
    log_model(params, dataset, model, runs_dir, out_dir / "eval.json", examples)

    trained = summary[summary["estimate"] == "runs"]
    print(trained[trained["metric"].isin(["dice", "iou", "hd95"])].to_string(index=False))


def log_model(params, dataset: str, model: str, runs_dir: Path, eval_json: Path, examples: dict) -> None:
    """The fold ensemble as an MLflow model on the entry's parent run, registered for the CASNet entry
    (`<prefix>_<dataset>_casnet`, alias `champion` at the paper protocol); nothing where training was
    not tracked. A failure is reported and the stage goes on: its outputs are written already."""
    state = runs_dir / "mlflow.json"
    if not state.is_file() or not read_json(state).get("parent_run_id"):
        return
    from medfusion.config import protocol_differences
    from medfusion.mlflow_model import log_ensemble_model, model_config
    from medfusion.provenance import git_state
    from medfusion.training.tracking import repo_root, resolve_tracking_uri

    try:
        images = examples["images"][:1]  # (1, C, S, S) uint8: a test image as the dataset's files hold it
        if params.spec(dataset).kind == "image":
            example = images.transpose(0, 2, 3, 1)
            example = example[..., 0] if example.shape[-1] == 1 else example
        else:  # a volume's layout (D, H, W) in its stored units; its values do not matter to the schema
            example = np.zeros((2, *images.shape[2:]), np.float32)
        # the folder relative to this workspace (a `dvc exp run --temp` copy or the repository)
        config = model_config(runs_dir, eval_json, Path.cwd(), git_state(repo_root())["commit"])
        reference = model == params.model_names[0]
        uri = log_ensemble_model(
            read_json(state)["parent_run_id"], resolve_tracking_uri(params.mlflow.tracking_uri), config,
            example, f"{params.mlflow.experiment_prefix}_{dataset}_{model}" if reference else None,
            champion=reference and not protocol_differences(params),
        )  # fmt: skip
        print(f"MLflow model of {dataset}/{model}: {uri}")
    except Exception as err:  # the evaluation is written; the model is an extra
        print(f"MLflow: cannot log the model of {dataset}/{model} ({err})", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
