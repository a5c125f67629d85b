"""Stage source@<dataset>: data/sources/<dataset>, the link to data.sources.<dataset> that fetch depends on
(DVC hashes the files it points to; medfusion/data/sources.py)."""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.sources import SourceError, write_source


def main(
    dataset: str = typer.Option(...),
    out: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    try:
        print(f"source {write_source(dataset, params.data.sources.get(dataset), out)}")
    except SourceError as err:
        raise SystemExit(f"source {dataset}: {err}") from None


if __name__ == "__main__":
    run_stage(main)
