"""Stage report: reports/tables/<dataset>.md, tables/ablations.md, reports/summary.csv and reports/metrics.json."""

from pathlib import Path

import pandas as pd
import typer

from medfusion.config import load_params
from medfusion.data.io import atomic_write_text, write_json
from medfusion.report import ablation_table, dataset_table, metrics_json


def main(
    eval_dir: Path = typer.Option(...),
    stats: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    summary = pd.concat(
        pd.read_csv(eval_dir / d / m / "summary.csv") for d in params.datasets for m in params.model_names
    )
    tests = pd.read_csv(stats)
    for dataset in params.datasets:
        atomic_write_text(
            out_dir / "tables" / f"{dataset}.md",
            dataset_table(summary, tests, dataset, params.data.image_size, params.spec(dataset)),
        )
    atomic_write_text(
        out_dir / "tables" / "ablations.md",
        ablation_table(
            summary, tests, params.models.casnet, {n: params.ablations[n] for n in params.models.casnet}
        ),
    )
    summary.to_csv(out_dir / "summary.csv", index=False)
    write_json(out_dir / "metrics.json", metrics_json(summary))
    print(f"report: tables in {out_dir / 'tables'}, metrics in {out_dir / 'metrics.json'}")


if __name__ == "__main__":
    typer.run(main)
