"""Stage split@<dataset>: held-out test cases and patient-grouped folds -> data/splits/<dataset>.json."""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import read_json, write_json
from medfusion.data.splits import SplitError, make_split


def main(
    dataset: str = typer.Option(...),
    processed_dir: Path = typer.Option(...),
    out: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    cv = params.cv
    case_groups = {c["case_id"]: c["group"] for c in read_json(processed_dir / "cases.json")}
    rule = params.spec(dataset).test_rule
    try:
        split = make_split(case_groups, rule, cv.n_folds, cv.split_seed, cv.test_fraction)
    except SplitError as err:
        raise SystemExit(f"split {dataset}: {err}") from None
    write_json(out, {"dataset": dataset, "test_rule": rule, "seed": cv.split_seed, **split})
    print(
        f"split {dataset}: {len(split['test'])} test cases, {cv.n_folds} folds of the other {len(case_groups) - len(split['test'])}"
    )


if __name__ == "__main__":
    run_stage(main)
