"""Stage efficiency: reports/efficiency.md and .csv, parameters, FLOPs and ms/image of every model entry."""

from pathlib import Path

import pandas as pd
import typer

from medfusion.config import load_params
from medfusion.data.io import atomic_write_text
from medfusion.efficiency import efficiency_markdown, efficiency_table
from medfusion.training.loop import resolve_precision


def main(
    out_dir: Path = typer.Option(...),
    size: int = typer.Option(256, help="input side for FLOPs and timing (the paper's 256)"),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    precision = resolve_precision(params.train.device, params.train.cpu_bf16, params.train.channels_last)
    rows = efficiency_table(params, precision, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "efficiency.md", efficiency_markdown(rows, precision, size, 3))
    atomic_write_text(out_dir / "efficiency.csv", pd.DataFrame(rows).to_csv(index=False))
    print(efficiency_markdown(rows, precision, size, 3))


if __name__ == "__main__":
    typer.run(main)
