"""The `medfusion` command: quickstart, reproduce, sensitivity, fetch, models, predict, plan,
check."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import typer

from medfusion.common import telemetry_off

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="MedFusion-TransNet segmentation pipeline."
)


def _repo_root() -> Path:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        raise typer.BadParameter("run this inside a clone of the medfusion repository (git + DVC)") from None
    root = Path(out.stdout.strip())
    if not (root / "dvc.yaml").exists():
        raise typer.BadParameter(
            f"{root} has no dvc.yaml: run this inside a clone of the medfusion repository"
        )
    return root


def _pipeline_env(root: Path) -> dict[str, str]:
    """Environment for DVC and its stages: this interpreter's bin first (so `dvc` and the stages'
    `python` are the ones medfusion is installed in, without activating a venv), telemetry off, and a
    git identity for the experiment commits where the user has none."""
    env = telemetry_off(dict(os.environ))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    has_identity = subprocess.run(
        ["git", "config", "user.email"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    if not has_identity:
        for role in ("AUTHOR", "COMMITTER"):
            env.setdefault(f"GIT_{role}_NAME", "medfusion quickstart")
            env.setdefault(f"GIT_{role}_EMAIL", "quickstart@medfusion.invalid")
    return env


def _run_experiment(root: Path, overrides: list[str], name: str, what: str) -> str:
    """Run `dvc exp run --temp -n NAME -S ...` with `overrides` guarded (interrupted: the workspace as
    it was), then apply experiment `name` to the workspace with params.yaml put back. -> the commit it
    ran from."""
    from medfusion.config import ConfigError, params_from_dict, read_yaml
    from medfusion.plan import PlanError, apply_overrides
    from medfusion.quickstart import Interrupted, apply_experiment, run_guarded

    cmd = ["dvc", "exp", "run", "--temp", "-n", name] + [a for o in overrides for a in ("-S", o)]
    try:  # the names and values checked before DVC expands the stages (it would say "missing params")
        params_from_dict(apply_overrides(read_yaml(root / "params.yaml"), overrides), "params.yaml with -S")
    except (ConfigError, PlanError) as err:
        typer.echo(f"{what}: {err}", err=True)
        raise typer.Exit(1) from None
    saved = (root / "params.yaml").read_bytes()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    env = _pipeline_env(root)
    typer.echo(f"$ {shlex.join(cmd)}")
    try:
        code = run_guarded(cmd, root, env)
    except Interrupted as err:
        typer.echo(f"\n{what} stopped by {err}; the workspace is as it was before it started.", err=True)
        raise typer.Exit(128 + err.signum) from None
    if code:
        raise typer.Exit(code)
    apply_experiment(name, root, env, saved, commit)
    return commit


@app.command()
def quickstart(
    name: str = typer.Option("", help="experiment name (default: quickstart-<time>)"),
    set_param: list[str] = typer.Option([], "--set", "-S", help="extra params override, e.g. train.epochs=2"),
    all_models: bool = typer.Option(
        False, "--all-models", help="train all eleven model entries (default: casnet, casnet_wo_br and unet)"
    ),
) -> None:
    """Run the whole DVC pipeline on synthetic data on CPU, as a real `dvc exp run` with small settings.

    fetch -> preprocess -> split -> train -> evaluate -> stats -> report, and efficiency, offline, on
    CASNet, one ablation and U-Net (`--all-models`: every entry). The experiment runs in a temporary
    copy of the repository; its results are then applied to the workspace and params.yaml is put
    back (the paper protocol stays the default). Interrupted, it leaves the workspace as it was.
    """
    from medfusion.quickstart import (
        DEFAULT_MODELS,
        quickstart_overrides,
    )

    root = _repo_root()
    name = name or time.strftime("quickstart-%Y%m%d-%H%M%S")
    overrides = quickstart_overrides(None if all_models else DEFAULT_MODELS) + list(set_param)
    start = time.perf_counter()
    _run_experiment(root, overrides, name, "quickstart")
    _print_quickstart_results(root, name, (time.perf_counter() - start) / 60)


# MLflow 3.17's UI opens every experiment on its GenAI (traces) overview unless the link asks for the
# training view, whatever the experiment's mlflow.experimentKind tag says; this query asks for it
MLFLOW_RUNS_VIEW = "workflowType=machine_learning"


def _experiment_ids(db: Path) -> list[tuple[str, str]]:
    """(id, name) of the medfusion experiments in a sqlite MLflow store (read directly: no MLflow
    import, which costs seconds); [] where there is none."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            rows = con.execute(
                "select experiment_id, name from experiments where name != 'Default'"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [(str(i), n) for i, n in sorted(rows)]


def _print_quickstart_results(root: Path, name: str, minutes: float) -> None:
    tables = sorted((root / "reports" / "tables").glob("*.md"))
    typer.echo(f"\nquickstart finished in {minutes:.1f} min; experiment {name!r} (see `dvc exp show`).")
    for table in tables:
        if table.stem in ("table1", "table2"):  # the paper's main tables; the rest are listed below
            typer.echo(f"\n{table.read_text()}")
    typer.echo("Tables:  " + "  ".join(str(t.relative_to(root)) for t in tables))
    typer.echo("Figures: reports/figures/*.png  (`dvc plots show`)   Claims: reports/claims.md")
    typer.echo("Metrics: reports/metrics.json  (`dvc metrics show`, `dvc exp show`)")
    typer.echo(f"MLflow:  mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}   then open")
    for experiment_id, title in _experiment_ids(root / "mlflow.db"):
        typer.echo(
            f"         {title}: http://127.0.0.1:5000/#/experiments/{experiment_id}?{MLFLOW_RUNS_VIEW}"
        )
    typer.echo("params.yaml is unchanged (paper protocol): `dvc repro` runs the full protocol.")


@app.command()
def reproduce(
    profile: str = typer.Option(..., help="a profile of profiles/ (e.g. cpu-budget) or a .yaml path"),
    data_root: Path = typer.Option(None, help="where the datasets are (default: the profile's data_root)"),
    name: str = typer.Option("", help="experiment name (default: <profile>-<time>)"),
    set_param: list[str] = typer.Option([], "--set", "-S", help="extra params override, after the profile's"),
    out_dir: Path = typer.Option(None, help="where the outputs are kept (default: the profile's out_dir)"),
) -> None:
    """Run the whole DVC pipeline under a committed profile of params overrides (profiles/), on real
    data, and keep the report's outputs under the profile's folder (reports/<profile>/) with RUN.md:
    the command, the machine, the wall time and the commit.

    As the quickstart: a `dvc exp run --temp`, applied to the workspace when it has finished, with
    params.yaml put back; interrupted, the workspace is left as it was.
    """
    from medfusion.hardware import machine_summary
    from medfusion.reproduce import ProfileError, experiment_refs, keep_outputs, load_profile, run_record

    root = _repo_root()
    try:
        chosen = load_profile(root, profile, data_root)
    except ProfileError as err:
        raise typer.BadParameter(str(err), param_hint="--profile") from None
    if chosen["missing"]:
        raise typer.BadParameter(
            f"the data of profile {profile!r} is not there: {'; '.join(chosen['missing'])}; "
            "give the folder that holds the datasets with --data-root",
            param_hint="--data-root",
        )
    stem = chosen["path"].stem
    name = name or time.strftime(f"{stem}-%Y%m%d-%H%M%S")
    overrides = chosen["overrides"] + list(set_param)
    start = time.perf_counter()
    commit = _run_experiment(root, overrides, name, "reproduce")
    minutes = (time.perf_counter() - start) / 60
    shown = shlex.join(
        ["medfusion", "reproduce", "--profile", profile, *[a for o in set_param for a in ("-S", o)]]
        + (["--out-dir", str(out_dir)] if out_dir is not None else [])
    )
    record = run_record(chosen, shown, machine_summary(), minutes, commit, time.strftime("%Y-%m-%d %H:%M %Z"))
    kept = chosen["out_dir"] if out_dir is None else (out_dir if out_dir.is_absolute() else root / out_dir)
    copied = keep_outputs(root, kept, record, experiment_refs(root).get(name))
    typer.echo(f"\n{stem} finished in {minutes:.1f} min; experiment {name!r} (see `dvc exp show`).")
    typer.echo(f"Kept in {kept}/: {', '.join(copied)}, RUN.md")


sensitivity_app = typer.Typer(
    no_args_is_help=True,
    help="Hyperparameter sensitivity from a grid of DVC experiments (profiles/<grid>.yaml).",
)
app.add_typer(sensitivity_app, name="sensitivity")


@sensitivity_app.command("queue")
def sensitivity_queue(
    grid: str = typer.Option("sensitivity", help="a grid file of profiles/ (or a .yaml path)"),
    data_root: Path = typer.Option(None, help="where the datasets are (default: the base profile's)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc commands, queue nothing"),
) -> None:
    """Queue the grid's experiments (`dvc exp run --queue`, one key varied at a time); run them with
    `dvc queue start`, then `medfusion sensitivity report`."""
    from medfusion.reproduce import ProfileError
    from medfusion.sensitivity import load_grid, queue_commands

    root = _repo_root()
    try:
        chosen = load_grid(root, grid, data_root)
    except ProfileError as err:
        raise typer.BadParameter(str(err), param_hint="--grid") from None
    env = _pipeline_env(root)
    for cmd in queue_commands(chosen):
        typer.echo(f"$ {shlex.join(cmd)}")
        if not dry_run:
            subprocess.run(cmd, cwd=root, env=env, check=True)
    typer.echo(
        f"{len(chosen['experiments'])} experiments; `dvc queue start -j 1`, then `medfusion sensitivity report --grid {grid}`"
    )


@sensitivity_app.command("report")
def sensitivity_report(
    grid: str = typer.Option("sensitivity", help="a grid file of profiles/ (or a .yaml path)"),
    metric: str = typer.Option("dice", help="a metric of reports/summary.csv (dice, iou, hd95, ...)"),
    out_dir: Path = typer.Option(Path("reports/sensitivity"), help="where the table, CSV and figure go"),
) -> None:
    """The sensitivity table (Markdown + CSV) and figure of the grid's finished experiments."""
    from medfusion.common import atomic_write
    from medfusion.reproduce import ProfileError
    from medfusion.sensitivity import load_grid, sensitivity_figure, sensitivity_frame, sensitivity_markdown

    root = _repo_root()
    try:
        chosen = load_grid(root, grid)
    except ProfileError as err:
        raise typer.BadParameter(str(err), param_hint="--grid") from None
    frame, missing = sensitivity_frame(root, chosen, metric)
    out_dir = out_dir if out_dir.is_absolute() else root / out_dir
    atomic_write(out_dir / "sensitivity.md", sensitivity_markdown(frame, chosen, missing, metric))
    atomic_write(out_dir / "sensitivity.csv", frame.to_csv(index=False))
    if not frame.empty:
        sensitivity_figure(frame, out_dir / "sensitivity.png", metric)
    found = len(chosen["experiments"]) - len(missing)
    typer.echo(f"{found} of {len(chosen['experiments'])} experiments finished -> {out_dir}/sensitivity.md")


@app.command()
def fetch(
    dataset: str = typer.Argument(..., help="a dataset name from params.yaml"),
    source: Path | None = typer.Option(None, help="local copy: a folder or the official archive"),
    out_dir: Path | None = typer.Option(None, help="where to put it (default data/raw/DATASET)"),
    params_file: Path = typer.Option(Path("params.yaml"), help="params file for the synthetic generator"),
) -> None:
    """Fetch one dataset into data/raw/DATASET: generate it, verify and copy a local copy, or download it.

    Local copies are verified like downloads (archive checksum or file fingerprint). Layouts:
    kvasir_seg Kvasir-SEG/images + masks; chase_db1 Image_NNX.jpg + Image_NNX_1stHO.png (+ _2ndHO);
    promise12 CaseNN.mhd/.raw + CaseNN_segmentation.mhd/.raw; lits17 volume-N.nii + segmentation-N.nii;
    msd_prostate / msd_liver the Decathlon's Task folder or .tar (imagesTr + labelsTr);
    custom images/ + masks/ (or labels/) with matching stems, described by data.custom.
    """

    from medfusion.config import ConfigError, load_params
    from medfusion.data.fetch import FetchError, fetch_dataset
    from medfusion.data.registry import DATASET_NAMES

    try:
        params = load_params(params_file)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    known = sorted({*DATASET_NAMES, *params.custom_datasets})
    if dataset not in known:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; choose from {known}")
    custom = params.custom_description(dataset)
    try:
        record = fetch_dataset(
            dataset, out_dir or Path("data/raw") / dataset, source, params.data.synthetic, custom
        )
    except FetchError as err:
        typer.echo(f"fetch {dataset}: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"fetched {dataset}: {record}")


@app.command()
def models(
    size: int = typer.Option(256, help="input side for FLOPs and timing"),
    in_channels: int = typer.Option(3, help="input channels"),
    timed: bool = typer.Option(True, "--time/--no-time", help="also time inference (ms/image, batch 1)"),
    params_file: Path = typer.Option(Path("params.yaml"), help="model widths come from here"),
) -> None:
    """Every model entry of params.yaml: parameters, forward GFLOPs and inference ms/image at SIZE."""
    from medfusion.config import ConfigError, load_params
    from medfusion.efficiency import efficiency_table
    from medfusion.hardware import resolve_precision
    from medfusion.report import efficiency_markdown

    try:
        params = load_params(params_file)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    if size < 16 or size % 16:
        raise typer.BadParameter(f"--size {size}: expected a multiple of 16")
    precision = resolve_precision(params.train.device, params.train.cpu_bf16, params.train.channels_last)
    rows = efficiency_table(params, precision, size, in_channels, timed=timed)
    typer.echo(efficiency_markdown(rows))


def _folds_option(folds: str) -> list[int] | None:
    """--folds '0,2' -> [0, 2]; '' -> None (every fold)."""
    if not folds:
        return None
    try:
        return sorted({int(f) for f in folds.split(",")})
    except ValueError:
        raise typer.BadParameter(
            f"{folds!r}; expected fold numbers such as 0,2", param_hint="--folds"
        ) from None


def _ensemble_banner(ensemble, chosen) -> str:
    """What `medfusion predict` is about to do: checkpoints, input size, classes, preprocessing, TTA, post."""
    prep = ensemble.preprocessing
    size = (
        f"their own size (sliding window {ensemble.patch_size})"
        if prep.native
        else f"{prep.image_size}x{prep.image_size}"
    )
    return (
        f"{ensemble.dataset}: {len(ensemble.paths)} checkpoint(s), {prep.modality} {prep.kind}s at {size}, "
        f"{ensemble.num_classes} classes; preprocessing from {prep.source}"
        + ("; TTA: flips" if ensemble.tta == "flip" else "")
        + (
            f"; post-processing chosen on validation: {chosen}"
            if chosen
            else "; raw argmax (no post-processing)"
        )
    )


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(
        ...,
        help="2-D images (PNG, JPEG, TIFF, BMP, GIF, PPM/PGM), NIfTI volumes (.nii, .nii.gz), or folders of them",
    ),
    run: Path = typer.Option(
        ..., help="a run folder data/runs/DATASET/MODEL (its fold*/model.pt are averaged) or one model.pt"
    ),
    out: Path = typer.Option(..., help="output folder for <stem>_mask.png / <stem>_mask.nii.gz"),
    processed_meta: Path | None = typer.Option(
        None,
        help="meta.json of the processed training data, overriding the checkpoint's record "
        "(default: that record, else data/processed/DATASET/meta.json beside data/runs)",
    ),
    overlay: bool = typer.Option(False, "--overlay", help="also write <stem>_overlay*.png (RGB)"),
    save_probabilities: bool = typer.Option(
        False,
        "--save-probabilities",
        help="also write <stem>_probs.npy: float16 (K, [D,] H, W) at the input's size",
    ),
    folds: str = typer.Option("", help="only the runs of these folds, e.g. 0,2 (default: every fold)"),
    tta: str = typer.Option(
        "none", help="none, or flip: average over the left-right, up-down and double flips"
    ),
    postprocess: bool = typer.Option(
        True,
        "--postprocess/--no-postprocess",
        help="apply the post-processing the run's evaluation chose on validation (eval.json), when there",
    ),
    eval_json: Path | None = typer.Option(
        None, help="the run's eval.json (default: data/eval/DATASET/MODEL/eval.json beside data/runs)"
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    batch_size: int = typer.Option(16, min=1, help="images or slices per forward pass"),
    max_image_pixels: int | None = typer.Option(
        None, min=1, help="refuse 2-D files with more pixels (default 89478485, about 9459 x 9459)"
    ),
) -> None:
    """Segment new images with a trained model: the mean softmax of every fold and seed of the run.

    Inputs are preprocessed as the training data was (resize, CLAHE, CT window or MRI N4 + percentiles,
    z-score). Masks hold class indices 0..K-1 (uint8; not scaled for viewing, see --overlay), at the
    input's size, post-processed as the evaluation chose on validation (its "post" rows); NIfTI masks
    keep the input's shape and affine. A bad input is reported and skipped; the exit code is then 1.
    """
    from medfusion.common import TrainingError
    from medfusion.data.io import DataError, set_max_image_pixels, writable_dir
    from medfusion.hardware import resolve_precision
    from medfusion.predict import (
        Outputs,
        PredictError,
        chosen_postprocess,
        ensemble_postprocess,
        expand_inputs,
        load_ensemble,
        predict_files,
    )

    set_max_image_pixels(max_image_pixels)
    try:
        writable_dir(out, "--out")  # before any work
        precision = resolve_precision(device)  # auto: the same choice as training and evaluation
        ensemble = load_ensemble(run, precision, processed_meta, _folds_option(folds), tta)
        chosen = (
            ensemble_postprocess(ensemble, chosen_postprocess(ensemble, eval_json)) if postprocess else None
        )
        paths = expand_inputs(inputs, ensemble.preprocessing)
    except (PredictError, TrainingError, DataError) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo(_ensemble_banner(ensemble, chosen))
    outputs = Outputs(overlay, save_probabilities, chosen)
    failed = predict_files(ensemble, paths, out, outputs, batch_size)
    typer.echo(f"{len(paths) - len(failed)} of {len(paths)} inputs predicted -> {out}")
    if failed:
        typer.echo(f"failed: {', '.join(str(p) for p in failed)}", err=True)
        raise typer.Exit(1)


@app.command()
def evaluate(
    run: Path = typer.Option(
        ...,
        help="a run folder data/runs/DATASET/MODEL (every fold*/model.pt and their ensemble) or one model.pt",
    ),
    images: Path = typer.Option(..., help="folder of images (2-D files, or NIfTI volumes)"),
    masks: Path = typer.Option(..., help="folder of their masks, matched by file stem"),
    out: Path = typer.Option(..., help="output folder for per_case.csv, summary.csv and summary.md"),
    mask_threshold: int | None = typer.Option(
        None,
        min=0,
        max=254,
        help="binarise grey masks at > T (2-class models); default: masks must be labels",
    ),
    fov: Path | None = typer.Option(
        None, help="folder of field-of-view masks (same stems): score inside them"
    ),
    eval_json: Path | None = typer.Option(
        None,
        help="the run's eval.json, for the post-processing chosen on validation (default: "
        "data/eval/DATASET/MODEL/eval.json beside data/runs, when there)",
    ),
    processed_meta: Path | None = typer.Option(
        None, help="meta.json of the processed training data, overriding the checkpoint's record"
    ),
    folds: str = typer.Option("", help="only the runs of these folds, e.g. 0,2 (default: every fold)"),
    tta: str = typer.Option(
        "none", help="none, or flip: average over the left-right, up-down and double flips"
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    batch_size: int = typer.Option(16, min=1, help="images or slices per forward pass"),
    max_image_pixels: int | None = typer.Option(
        None, min=1, help="refuse 2-D files with more pixels (default 89478485, about 9459 x 9459)"
    ),
) -> None:
    """Score a trained run on a folder of images and masks, without retraining (e.g. another centre's data).

    Each fold x seed run and their fold ensemble, at each image's original size, with the pipeline's
    metrics (and, where the run's eval.json is found, its post-processing chosen on validation).
    Writes per_case.csv (one row per case, class and metric, as the pipeline's) and a summary.
    """
    from medfusion.common import TrainingError
    from medfusion.data.io import DataError, set_max_image_pixels, writable_dir
    from medfusion.folder_eval import evaluate_folder, folder_cases
    from medfusion.hardware import resolve_precision
    from medfusion.predict import PredictError, load_ensemble

    set_max_image_pixels(max_image_pixels)
    try:
        writable_dir(out, "--out")  # before any work
        precision = resolve_precision(device)
        ensemble = load_ensemble(run, precision, processed_meta, _folds_option(folds), tta)
        if mask_threshold is not None and ensemble.num_classes != 2:
            raise PredictError(
                f"--mask-threshold binarises masks, but {run} has {ensemble.num_classes} classes"
            )
        cases = folder_cases(images, masks, ensemble.preprocessing.kind, fov, ensemble.preprocessing)
        evaluate_folder(ensemble, cases, out, mask_threshold, eval_json, batch_size)
    except (PredictError, TrainingError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"{len(cases)} cases scored -> {out}/per_case.csv, summary.csv, summary.md", err=True)


@app.command()
def plan(
    set_param: list[str] = typer.Option(
        [], "--set", "-S", help="params override as for dvc exp run, e.g. train.epochs=2"
    ),
    params_file: Path = typer.Option(Path("params.yaml"), help="the params file to cost"),
    profile: str = typer.Option("", help="cost this profile of profiles/ (its overrides before -S)"),
    processed: Path = typer.Option(
        Path("data/processed"), help="where preprocessed datasets are (their sizes)"
    ),
    steps: int = typer.Option(2, min=1, help="timed training steps per entry (after one warm-up)"),
    batch: int = typer.Option(
        4, min=1, help="largest batch the calibration runs (scaled to train.batch_size)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """What `dvc repro` will cost with these params, before any training: every run, a measured step
    time per entry on this device, hours per dataset and in all (serial and with the executor), disk,
    and the expected peak memory of the largest stage."""
    import json

    from medfusion.config import ConfigError
    from medfusion.plan import PlanError, load_plan_params, make_plan, plan_markdown
    from medfusion.reproduce import ProfileError

    try:
        overrides = list(set_param)
        if profile:
            from medfusion.reproduce import load_profile

            overrides = load_profile(_repo_root(), profile)["overrides"] + overrides
        params = load_plan_params(params_file, overrides)
        result = make_plan(params, processed, steps=steps, max_batch=batch)
    except (PlanError, ConfigError, ProfileError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result, indent=2) if as_json else plan_markdown(result))


@app.command()
def check(
    params_file: Path = typer.Argument(Path("params.yaml"), help="params file to validate"),
    processed: Path = typer.Option(Path("data/processed"), help="preprocessed datasets, for the split check"),
) -> None:
    """Validate params.yaml: keys, types, dataset and model names, ranges; and, for each dataset
    already preprocessed (PROCESSED/<dataset>/cases.json), that its cases can make the split."""
    from medfusion.config import ConfigError, load_params
    from medfusion.data.io import DataError, read_json
    from medfusion.data.splits import SplitError, make_split

    try:
        params = load_params(params_file)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    cv, failed = params.cv, False
    for dataset in params.datasets:
        cases = processed / dataset / "cases.json"
        if not cases.is_file():
            continue
        try:
            groups = {c["case_id"]: c["group"] for c in read_json(cases)}
            make_split(groups, params.spec(dataset).test_rule, cv.n_folds, cv.split_seed, cv.test_fraction)
        except (SplitError, DataError) as err:
            typer.echo(f"{params_file}: {dataset} ({cases}): {err}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)
    typer.echo(f"{params_file}: ok ({len(params.datasets)} datasets x {len(params.model_names)} models)")


def main() -> None:  # pragma: no cover - console entry for `python -m medfusion.cli`
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
