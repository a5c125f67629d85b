"""Stage efficiency: reports/efficiency.md and .csv, parameters, FLOPs and ms/image of every model entry.

It depends on data/runs rather than on every model's params section: a change to a section retrains
that entry (the section is in its run hash), which changes data/runs, which reruns this stage. So
adding a model needs no line here or in dvc.yaml.
"""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import atomic_write_text


def main(
    out_dir: Path = typer.Option(...),
    size: int = typer.Option(256, help="input side for FLOPs and timing (the paper's 256)"),
    params_file: Path = Path("params.yaml"),
):
    import pandas as pd

    from medfusion.efficiency import efficiency_table
    from medfusion.hardware import resolve_precision
    from medfusion.report import efficiency_markdown

    params = load_params(params_file)
    t = params.train
    rows = efficiency_table(params, resolve_precision(t.device, t.cpu_bf16, t.channels_last), size)
    atomic_write_text(out_dir / "efficiency.md", efficiency_markdown(rows))
    atomic_write_text(out_dir / "efficiency.csv", pd.DataFrame(rows).to_csv(index=False))
    print(efficiency_markdown(rows))


if __name__ == "__main__":
    run_stage(main)
