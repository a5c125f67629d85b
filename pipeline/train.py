"""Stage train@<dataset>-<model>: every (fold, seed) of params.cv; finished runs are not redone.

Then every run's learning curves as DVC plot data (--curves-dir, --drgo-curves-dir: medfusion/curves.py)."""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params, protocol_note
from medfusion.curves import write_curves
from medfusion.data.io import read_json
from medfusion.entries import resolve_entry, resources
from medfusion.training.cv import run_cv
from medfusion.training.tracking import Tracker, resolve_tracking_uri


def main(
    dataset: str = typer.Option(...),
    model: str = typer.Option(...),
    processed_dir: Path = typer.Option(...),
    split: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    curves_dir: Path = typer.Option(None, help="each run's curves as TSV (DVC plots)"),
    drgo_curves_dir: Path = typer.Option(None, help="each run's DRGO terms as TSV (DVC plots)"),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    entry = resolve_entry(params, dataset, model)
    cv = params.cv
    flat = {**entry.tracking_params(), "cv.n_folds": cv.n_folds, "cv.seeds": cv.seeds}
    flat |= {"cv.split_seed": cv.split_seed, "cv.test_fraction": cv.test_fraction}
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(
        resolve_tracking_uri(params.mlflow.tracking_uri),
        f"{params.mlflow.experiment_prefix}/{dataset}",
        run_name=model,
        params=flat,
        tags={"dataset": dataset, "model": model, "architecture": entry.architecture},
        state_file=out_dir / "mlflow.json",
        dataset=_dataset_input(dataset, processed_dir),
        note=protocol_note(params),
    )
    results = run_cv(
        entry, processed_dir, split, out_dir, tracker.child, cv, resources(params), params.executor
    )
    tracker.finish()
    if curves_dir is not None:
        write_curves(out_dir, results, curves_dir, drgo_curves_dir or curves_dir.parent / "drgo")
    print(f"train {dataset}/{model}: {len(results)} runs in {out_dir}")


def _dataset_input(dataset: str, processed_dir: Path) -> dict[str, str] | None:
    """The processed dataset as MLflow records a run's input: name, digest (meta.json's sha256, its first
    36 characters: MLflow's limit) and source (the processed folder)."""
    meta_path = processed_dir / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    return {
        "name": dataset,
        "digest": str(meta.get("sha256", ""))[:36],
        "source": str(processed_dir.resolve()),
    }


if __name__ == "__main__":
    run_stage(main)
