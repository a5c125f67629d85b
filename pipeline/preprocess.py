"""Stage preprocess@<dataset>: data/raw/<dataset> -> data/processed/<dataset> arrays."""

from pathlib import Path

import typer

from medfusion.config import load_params
from medfusion.data.preprocess import preprocess_dataset


def main(
    dataset: str = typer.Option(...),
    raw_dir: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    meta = preprocess_dataset(dataset, raw_dir, out_dir, params.data.image_size)
    print(f"preprocess {dataset}: {meta['num_cases']} cases, {meta['num_samples']} 2-D samples -> {out_dir}")


if __name__ == "__main__":
    typer.run(main)
