"""Stage report: the paper's tables, figures and claims from the evaluation, written by the pipeline.

reports/tables/table1-4 and statistics (.md and .csv), reports/figures/*.png (bars, qualitative
overlays, learning curves per dataset), reports/claims.md, reports/summary.csv and reports/metrics.json.
Each model's MLflow parent run gets its dataset's figures as artifacts.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import typer

from medfusion.claims import claims_markdown
from medfusion.config import load_params
from medfusion.data.io import atomic_write_text, read_history, read_json, write_json
from medfusion.figures import learning_curves, metric_bars, qualitative_grid
from medfusion.report import build_tables, efficiency_markdown, metrics_json, summarize_runs, table_csv


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def write_efficiency(models: list[str], rows_dir: Path, out_dir: Path) -> None:
    """reports/efficiency.md and .csv from the efficiency stages' rows (reports/efficiency/<model>.json)."""
    rows = [read_json(rows_dir / f"{m}.json") for m in models]
    atomic_write_text(out_dir / "efficiency.md", efficiency_markdown(rows))
    atomic_write_text(out_dir / "efficiency.csv", pd.DataFrame(rows).to_csv(index=False))


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
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    models = params.model_names
    write_efficiency(models, out_dir / "efficiency", out_dir)
    per_case = pd.concat(
        pd.read_csv(eval_dir / d / m / "per_case.csv") for d in params.datasets for m in models
    )
    infos = {}
    for d in params.datasets:
        info = read_json(eval_dir / d / models[0] / "eval.json")
        infos[d] = {**info, "title": params.spec(d).title, "note": params.spec(d).note}
    tests = pd.read_csv(stats)
    for name, (markdown, frame) in build_tables(per_case, infos, models, params.ablations, tests).items():
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

    states = {(d, m): runs_dir / d / m / "mlflow.json" for d in params.datasets for m in models}
    if any(path.exists() for path in states.values()):  # MLflow only where runs were tracked
        from medfusion.training.tracking import Tracker, resolve_tracking_uri

        uri = resolve_tracking_uri(params.mlflow.tracking_uri)
        for (d, _), path in states.items():
            if path.exists():
                Tracker.attach(uri, read_json(path).get("parent_run_id")).log_test_metrics(
                    None, {}, figures[d]
                )
    print(
        f"report: tables in {out_dir / 'tables'}, figures in {out_dir / 'figures'}, claims in {out_dir / 'claims.md'}"
    )


if __name__ == "__main__":
    typer.run(main)
