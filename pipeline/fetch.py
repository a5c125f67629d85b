"""Stage fetch@<dataset>: data/raw/<dataset> from a generator, a local copy or the official URL.

The local copy is read through data/sources/<dataset> (the link the stage source@<dataset> makes from
data.sources.<dataset>), the dependency by which DVC sees a change of the copy's files."""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.fetch import FetchError, fetch_dataset
from medfusion.data.sources import SourceError, read_source


def main(
    dataset: str = typer.Option(...),
    out_dir: Path = typer.Option(...),
    source: Path = typer.Option(..., help="data/sources/<dataset>, written by the stage source@<dataset>"),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    try:
        record = fetch_dataset(
            dataset,
            out_dir,
            read_source(source),
            params.data.synthetic,
            params.custom_description(dataset),
        )
    except (FetchError, SourceError) as err:
        raise SystemExit(f"fetch {dataset}: {err}") from None
    print(f"fetch {dataset}: {record} -> {out_dir}")


if __name__ == "__main__":
    run_stage(main)
