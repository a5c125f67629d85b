"""Stage stats: paired t-tests of CASNet (the first model entry) against each other one, per dataset and class."""

from pathlib import Path

import pandas as pd
import typer

from medfusion.config import load_params
from medfusion.stats import paired_tests


def main(
    eval_dir: Path = typer.Option(...), out: Path = typer.Option(...), params_file: Path = Path("params.yaml")
):
    params = load_params(params_file)
    per_case = pd.concat(
        pd.read_csv(eval_dir / d / m / "per_case.csv") for d in params.datasets for m in params.model_names
    )
    tests = paired_tests(per_case, params.model_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    tests.to_csv(out, index=False)
    print(tests.to_string(index=False) if len(tests) else "stats: one model only, no comparison")


if __name__ == "__main__":
    typer.run(main)
