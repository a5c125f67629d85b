"""Stage transfer@<dataset>: every entry trained on <dataset> scored on each target of
eval.transfer[<dataset>] without retraining (medfusion/transfer.py). Every target is checked first
(classes, channels, no case of <dataset>'s data/raw: `check_overlap`), before any model is loaded.

Writes data/eval/transfer/<dataset>/<target>/<entry>/ (per_case.csv, summary.csv, summary.md,
transfer.json) and <target>/stats.csv (CASNet against every other entry on that target). The report
stage turns them into reports/tables/generalisation.md and logs them to MLflow.
"""

import contextlib
from pathlib import Path

import typer

from medfusion.common import run_stage
from medfusion.config import load_params
from medfusion.data.fetch import FetchError
from medfusion.data.io import DataError, atomic_dir, set_max_image_pixels
from medfusion.hardware import resolve_precision
from medfusion.transfer import (
    TransferError,
    check_overlap,
    check_target,
    target_cases,
    target_raw,
    transfer_entry,
    transfer_stats,
    write_stats,
)


def main(
    dataset: str = typer.Option(...),
    runs_dir: Path = typer.Option(..., help="data/runs/<dataset>: one folder per entry"),
    processed_dir: Path = typer.Option(
        ..., help="data/processed/<dataset>: its meta.json records the preprocessing"
    ),
    raw_root: Path = typer.Option(Path("data/raw"), help="where fetched datasets are"),
    out_dir: Path = typer.Option(...),
    params_file: Path = Path("params.yaml"),
):
    params = load_params(params_file)
    set_max_image_pixels(params.data.max_image_pixels)  # larger 2-D files are refused, named
    precision = resolve_precision(params.train.device, params.train.cpu_bf16, params.train.channels_last)
    trained, models = params.spec(dataset), params.model_names
    targets = params.eval.transfer.get(dataset, [])
    try:
        with contextlib.ExitStack() as stack:  # each target's files read (or copied) once, for both steps
            raws = {}
            for target in targets:  # every target checked before the first model is loaded
                check_target(target, params.spec(target), trained)
                custom, source = params.custom_description(target), params.data.sources.get(target)
                raws[target] = stack.enter_context(
                    target_raw(target, raw_root, source, params.data.synthetic, custom)
                )
                check_overlap(target, params.spec(target), raws[target], trained, raw_root / dataset)
            with atomic_dir(out_dir) as tmp:
                for target in targets:
                    spec, custom = params.spec(target), params.custom_description(target)
                    cases = target_cases(spec, raws[target], custom["group_pattern"] if custom else None)
                    per_case = {}
                    for entry in models:
                        out = tmp / target / entry
                        per_case[entry] = transfer_entry(
                            runs_dir / entry, processed_dir / "meta.json", spec, cases, out, precision,
                            params.eval.batch_size,
                        )  # fmt: skip
                        dice = per_case[entry].query("run == 'ensemble' or run == run.min()")
                        print(f"transfer {dataset} -> {target}, {entry}: {len(cases)} cases, mean Dice "
                              f"{dice[dice['metric'] == 'dice']['value'].mean():.4f}")  # fmt: skip
                    write_stats(tmp / target / "stats.csv", transfer_stats(per_case, models, target))
    except (TransferError, DataError, FetchError) as err:
        raise SystemExit(f"transfer {dataset}: {err}") from None


if __name__ == "__main__":
    run_stage(main)
