"""Learning curves as DVC plot data: one TSV per run, so that `dvc plots show` draws every run's
curves and `dvc plots diff <exp> <exp>` overlays them per revision.

The train stage writes, from each run's history.json:
    data/curves/<dataset>/<entry>/<run>.tsv       epoch (1 = the first), train_loss, val_loss,
                                                  val_dice, lr, seconds
    data/drgo_curves/<dataset>/<entry>/<run>.tsv  epoch and DRGO's terms (drgo_seg, drgo_ada, drgo_bnd,
                                                  drgo_drs, drgo_gamma, then the others) of entries
                                                  trained with it, NaN where a variant has no such
                                                  term (the folder is empty for the others)
Two folders, so that each of dvc.yaml's top-level plot definitions (a folder: one chart per file)
fits every file it holds. Torch-free.
"""

from __future__ import annotations

import math
from pathlib import Path

from medfusion.common import run_name
from medfusion.data.io import atomic_dir, read_history

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds")


# the DRGO terms dvc.yaml plots; an entry without one (use_boundary false: no drgo_bnd) writes NaN
DRGO_PLOTTED = ("drgo_seg", "drgo_ada", "drgo_bnd", "drgo_drs", "drgo_gamma")


def _cell(value) -> str:
    """A TSV cell; NaN where there is no value: Vega draws nothing there (an empty cell would read as 0)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "NaN"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _tsv(rows: list[dict], columns: list[str]) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(c)) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def write_curves(runs_dir: Path, runs: list[dict], curves_dir: Path, drgo_dir: Path) -> None:
    """Each run's curves into `curves_dir` and its DRGO terms (where it has them) into `drgo_dir`,
    each folder replaced as a whole (an interrupted stage leaves the previous curves).

    Args:
        runs_dir: data/runs/<dataset>/<entry> (each run's <run>/history.json).
        runs: the runs' records (fold, seed), as run_cv returns them.
        curves_dir, drgo_dir: data/curves/<dataset>/<entry>, data/drgo_curves/<dataset>/<entry>.
    """
    histories = {}
    for run in runs:
        name = run_name(run["fold"], run["seed"])
        rows = read_history(Path(runs_dir) / name / "history.json")
        histories[name] = [{**r, "epoch": int(r["epoch"]) + 1} for r in rows]
    with atomic_dir(curves_dir) as tmp:
        for name, rows in histories.items():
            (tmp / f"{name}.tsv").write_text(_tsv(rows, list(CURVE_COLUMNS)))
    with atomic_dir(drgo_dir) as tmp:
        for name, rows in histories.items():
            terms = sorted({k for r in rows for k in r if k.startswith("drgo_")} - set(DRGO_PLOTTED))
            if any(k.startswith("drgo_") for r in rows for k in r):
                (tmp / f"{name}.tsv").write_text(_tsv(rows, ["epoch", *DRGO_PLOTTED, *terms]))
