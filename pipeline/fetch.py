"""Stage fetch@<dataset>: data/raw/<dataset> from a generator, a local copy or the official URL."""

from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.fetch import FetchError, fetch_dataset


def main(
    dataset: str = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    try:
        record = fetch_dataset(
            dataset,
            out_dir,
            params.data.sources.get(dataset),
            params.data.synthetic,
            params.custom_description(dataset),
        )
    except FetchError as err:
        raise SystemExit(f"fetch {dataset}: {err}") from None
    print(f"fetch {dataset}: {record} -> {out_dir}")


if __name__ == "__main__":
    run_stage(main)
