"""Stage stats: CASNet (the first model entry) against every other entry, per dataset, class and metric.

Paired t-test (the paper's) and Wilcoxon signed-rank on the test cases' values averaged over runs,
Holm-corrected within each dataset x class x metric, with the mean difference and its 95% CI, and
where patients give several cases, the interval and test by patient (`--out`); the same comparison
over runs, per-run mean Dice of the same fold and seed (`--runs-out`). medfusion/stats.py says how.
"""

from pathlib import Path

import pandas as pd
import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import atomic_write_text
from medfusion.stats import compare_models, compare_runs


def main(
    eval_dir: Path = typer.Option(...),
    out: Path = typer.Option(...),
    runs_out: Path = typer.Option(None, help="also write the comparison over runs here"),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    per_case = pd.concat(
        pd.read_csv(eval_dir / d / m / "per_case.csv") for d in params.datasets for m in params.model_names
    )
    tests = compare_models(per_case, params.model_names)
    atomic_write_text(out, tests.to_csv(index=False))
    if runs_out is not None:
        atomic_write_text(runs_out, compare_runs(per_case, params.model_names).to_csv(index=False))
    shown = tests[tests["metric"] == "dice"]
    print(shown.to_string(index=False) if len(shown) else "stats: one model only, no comparison")


if __name__ == "__main__":
    run_stage(main)
