"""Stage report: the paper's tables, figures and claims from the evaluation, written by the pipeline.

reports/tables/table1-4 and statistics (.md and .csv), reports/figures/*.png (bars, qualitative
overlays, learning curves per dataset), reports/claims.md, reports/summary.csv and reports/metrics.json.

MLflow, for every (dataset, model) whose training was tracked: each child run (fold, seed) gets its
test metrics (`test_<metric>_<class>`, post-processed), the parent the means and stds over runs and
the fold ensemble's (`test_ensemble_...`), plus per_case.csv, summary.csv, eval.json and the
dataset's figures as artifacts.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import typer

from medfusion.claims import claims_markdown
from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import atomic_write_text, read_history, read_json, write_json
from medfusion.figures import learning_curves, metric_bars, qualitative_grid
from medfusion.generalisation import generalisation_table, load_results, mlflow_transfer_metrics
from medfusion.report import (
    build_tables,
    global_dice_frame,
    metrics_json,
    mlflow_test_metrics,
    summarize_runs,
    table_csv,
)


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def log_to_mlflow(
    params,
    per_case: pd.DataFrame,
    summary: pd.DataFrame,
    eval_dir: Path,
    runs_dir: Path,
    figures: dict[str, list[Path]],
    pooled: pd.DataFrame | None = None,
    transfers: list[dict] | None = None,
    generalisation: Path | None = None,
) -> None:
    """Test metrics and result files into the MLflow runs of every tracked (dataset, model); the
    parent also gets its transfer metrics (`transfer_<target>_dice_<class>`) and summaries. The
    dataset's figures go to one parent only, the first tracked entry's (CASNet's)."""
    tracked = [
        (d, m)
        for d in params.datasets
        for m in params.model_names
        if (runs_dir / d / m / "mlflow.json").exists()
    ]
    if not tracked:
        return
    from medfusion.training.tracking import Tracker, resolve_tracking_uri

    uri, client = resolve_tracking_uri(params.mlflow.tracking_uri), None
    with_figures: set[str] = set()
    for d, m in tracked:
        tracker = Tracker.attach(
            uri, read_json(runs_dir / d / m / "mlflow.json").get("parent_run_id"), client
        )
        client = client or tracker.client  # one store connection for every entry
        mine = per_case[(per_case["dataset"] == d) & (per_case["model"] == m)]
        mine_summary = summary[(summary["dataset"] == d) & (summary["model"] == m)]
        runs = read_json(runs_dir / d / m / "summary.json")["runs"]
        mine_pooled = None if pooled is None else pooled[(pooled["dataset"] == d) & (pooled["model"] == m)]
        children, parent = mlflow_test_metrics(mine, mine_summary, runs, mine_pooled)
        for run_id, metrics in children.items():
            tracker.log_test_metrics(run_id, metrics)
        files = [eval_dir / d / m / name for name in ("per_case.csv", "summary.csv", "eval.json")]
        parent = {**parent, **mlflow_transfer_metrics(transfers or [], d, m)}
        table = [generalisation] if generalisation is not None and params.eval.transfer.get(d) else []
        # the dataset's figures (every entry in them) once, on the first tracked entry's parent (CASNet)
        shown = figures[d] if d not in with_figures else []
        with_figures.add(d)
        tracker.log_test_metrics(None, parent, [*files, *shown, *table])


def dataset_figures(
    summary: pd.DataFrame,
    dataset: str,
    title: str,
    models: list[str],
    eval_dir: Path,
    runs_dir: Path,
    fig_dir: Path,
) -> list[Path]:
    """One dataset's grouped bars, qualitative overlays (evaluation's examples.npz) and learning curves."""
    cases: list[dict] = []
    for m in models:
        ex = np.load(eval_dir / dataset / m / "examples.npz")
        for i, case_id in enumerate(ex["case_ids"]):
            if len(cases) <= i:
                cases.append(
                    {
                        "case_id": str(case_id),
                        "image": ex["images"][i],
                        "target": ex["targets"][i],
                        "preds": {},
                    }
                )
            cases[i]["preds"][m] = ex["preds"][i]
    histories = {
        m: [read_history(p) for p in sorted((runs_dir / dataset / m).glob("fold*_seed*/history.json"))]
        for m in models
    }
    return [
        metric_bars(summary, dataset, models, fig_dir / f"bars_{dataset}.png", title=title),
        qualitative_grid(cases, models, fig_dir / f"qualitative_{dataset}.png"),
        learning_curves(histories, fig_dir / f"curves_{dataset}.png", title=title),
    ]


def main(
    eval_dir: Path = typer.Option(...),
    runs_dir: Path = typer.Option(...),
    stats: Path = typer.Option(...),
    stats_runs: Path = typer.Option(None, help="compare_runs's CSV (the stats stage's --runs-out)"),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    models = params.model_names
    per_case = pd.concat(
        pd.read_csv(eval_dir / d / m / "per_case.csv") for d in params.datasets for m in models
    )
    infos, pooled = {}, []
    for d in params.datasets:
        info = read_json(eval_dir / d / models[0] / "eval.json")
        infos[d] = {**info, "title": params.spec(d).title, "note": params.spec(d).note}
        custom = params.custom_description(d)
        if custom and custom.get("paper_dataset"):  # claims.md: beside that paper number
            infos[d]["stands_for"] = custom["paper_dataset"]
        if custom:
            infos[d]["custom"] = True
        for m in models:
            pooled.append(
                global_dice_frame(d, m, read_json(eval_dir / d / m / "eval.json").get("global_dice", {}))
            )
    pooled = pd.concat(pooled, ignore_index=True)
    tests = pd.read_csv(stats)
    over_runs = pd.read_csv(stats_runs) if stats_runs is not None else None
    observed = [eval_dir / d / models[0] / "observer.csv" for d in params.datasets]
    observers = pd.concat([pd.read_csv(f) for f in observed if f.exists()] or [pd.DataFrame()])
    tables = build_tables(per_case, infos, models, params.ablations, tests, pooled, over_runs, observers)
    transfers = load_results(eval_dir / "transfer")  # eval.transfer: the generalisation table
    if transfers:
        tables["generalisation"] = generalisation_table(transfers, models)
    for name, (markdown, frame) in tables.items():
        atomic_write_text(out_dir / "tables" / f"{name}.md", markdown)
        atomic_write_text(out_dir / "tables" / f"{name}.csv", table_csv(frame))

    summary = summarize_runs(per_case)
    figures = {
        d: dataset_figures(summary, d, params.spec(d).title, models, eval_dir, runs_dir, out_dir / "figures")
        for d in params.datasets
    }
    atomic_write_text(
        out_dir / "claims.md",
        claims_markdown(
            per_case,
            tests,
            infos,
            _csv(out_dir / "efficiency.csv"),
            _csv(out_dir / "device" / "device_bench.csv"),
            reference=models[0],
            baselines=params.models.baselines,
        ),
    )
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    write_json(out_dir / "metrics.json", metrics_json(summary))

    generalisation = out_dir / "tables" / "generalisation.md" if transfers else None
    log_to_mlflow(params, per_case, summary, eval_dir, runs_dir, figures, pooled, transfers, generalisation)
    print(
        f"report: tables in {out_dir / 'tables'}, figures in {out_dir / 'figures'}, claims in {out_dir / 'claims.md'}"
    )


if __name__ == "__main__":
    run_stage(main)
