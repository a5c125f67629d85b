"""Stage train@<dataset>-<model>: every (fold, seed) of params.cv; finished runs are not redone."""

from pathlib import Path

import typer

from medfusion.config import load_params
from medfusion.training.cv import asdict_flat, run_cv
from medfusion.training.tracking import Tracker, resolve_tracking_uri


def main(
    dataset: str = typer.Option(...),
    model: str = typer.Option(...),
    processed_dir: Path = typer.Option(...),
    split: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    flat = {
        "dataset": dataset,
        "model": model,
        "architecture": params.architecture(model),
        "data.image_size": params.data.image_size,
        **asdict_flat({"model_kwargs": params.model_kwargs(model, dataset)}),
        **asdict_flat({"train": params.train, "loss": params.loss, "cv": params.cv}),
    }
    if params.uses_drgo(model):  # only then: a baseline's parent run stays the same when drgo changes
        flat.update(asdict_flat({"drgo": params.drgo}))
        flat["drgo.use_boundary"] = params.use_boundary(model)
    if params.train.augment:
        flat.update(asdict_flat({"augment": params.augment}))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(
        resolve_tracking_uri(params.mlflow.tracking_uri),
        f"{params.mlflow.experiment_prefix}/{dataset}",
        run_name=model,
        params=flat,
        tags={"dataset": dataset, "model": model, "architecture": params.architecture(model)},
        state_file=out_dir / "mlflow.json",
    )
    results = run_cv(params, dataset, model, processed_dir, split, out_dir, tracker.child)
    tracker.finish()
    print(f"train {dataset}/{model}: {len(results)} runs in {out_dir}")


if __name__ == "__main__":
    typer.run(main)
