"""Stage preprocess@<dataset>: data/raw/<dataset> -> data/processed/<dataset> arrays, every input validated."""

import time
from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.io import DataError, set_max_image_pixels
from medfusion.data.preprocess import PreprocessSettings, preprocess_dataset


def main(
    dataset: str = typer.Option(...),
    raw_dir: Path = typer.Option(...),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    set_max_image_pixels(params.data.max_image_pixels)  # larger 2-D files are refused, named
    d, custom = params.data, params.custom_description(dataset)
    settings = PreprocessSettings(
        image_size=d.image_size,
        n4=d.n4,
        ct_window=(d.ct_window[0], d.ct_window[1]),
        clahe_clip=d.clahe_clip,
        group_pattern=custom["group_pattern"] if custom else None,
    )
    start = time.perf_counter()
    try:
        meta = preprocess_dataset(dataset, raw_dir, out_dir, settings, custom, workers=d.workers)
    except DataError as err:
        raise SystemExit(f"preprocess {dataset}: {err}") from None
    print(
        f"preprocess {dataset}: {meta['num_cases']} cases ({meta['num_groups']} patients), "
        f"{meta['num_samples']} 2-D samples at "
        f"{'their own size' if d.native else f'{d.image_size}x{d.image_size}'}, "
        f"{meta['empty_samples']} with an empty mask, in {time.perf_counter() - start:.1f} s -> {out_dir}"
    )


if __name__ == "__main__":
    run_stage(main)
