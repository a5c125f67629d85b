"""Cross-validated training of one entry: `run_cv` trains every (fold, seed) of `cv` not already done.

Layout under out_dir (data/runs/<dataset>/<entry>/): one folder per run (`run_fold` writes its
model.pt and history.json; the executor adds result.json, the completion record with the run's
config hash, best epoch and best validation loss and Dice) and summary.json, every run's result
for the evaluate stage.

A run whose result.json carries the current config hash (`run_hash`) is finished and is not redone;
a run with another hash (the entry's settings, the split or the data changed) is retrained. Runs no
longer asked for are removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from medfusion.common import run_name
from medfusion.config import CVParams, ExecutorParams
from medfusion.data.io import read_json, write_json
from medfusion.entries import Entry, Resources
from medfusion.training.executor import RunJob, RunTracker, run_pending


def run_hash(entry: Entry, processed_dir: Path, split: dict, fold: int, seed: int) -> str:
    """What a finished run depends on: the entry, the processed data and the fold's cases."""
    meta = read_json(Path(processed_dir) / "meta.json")
    return entry.run_hash(meta["sha256"], split["folds"][fold], fold, seed)


def planned_runs(cv: CVParams) -> Iterator[tuple[int, int]]:
    for seed in cv.seeds:
        for fold in range(cv.n_folds):
            yield fold, seed


def run_cv(
    entry: Entry,
    processed_dir: Path,
    split_path: Path,
    out_dir: Path,
    tracker: RunTracker,
    cv: CVParams,
    resources: Resources | None = None,
    executor: ExecutorParams | None = None,
) -> list[dict]:
    """Train every (fold, seed) of `cv` not already finished, with `executor` (serially in this
    process by default); returns all runs' results in `planned_runs` order."""
    split = read_json(split_path)
    if len(split["folds"]) != cv.n_folds:
        raise ValueError(f"{split_path} has {len(split['folds'])} folds; cv.n_folds is {cv.n_folds}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {run_name(f, s) for f, s in planned_runs(cv)}
    for stale in out_dir.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale)
    results, pending = {}, []
    for fold, seed in planned_runs(cv):
        run_dir = out_dir / run_name(fold, seed)
        digest = run_hash(entry, processed_dir, split, fold, seed)
        record_path = run_dir / "result.json"
        if record_path.exists() and read_json(record_path).get("config_hash") == digest:
            print(f"{entry.dataset}/{entry.name} {run_dir.name}: finished earlier with this config, skipped")
            results[fold, seed] = read_json(record_path)
            continue
        pending.append(
            RunJob(
                entry,
                Path(processed_dir),
                split,
                fold,
                seed,
                run_dir,
                digest,
                tracker,
                resources or Resources(),
            )
        )
    results.update(run_pending(pending, executor or ExecutorParams(), f"{entry.dataset}/{entry.name}"))
    runs = [results[run] for run in planned_runs(cv)]
    write_json(out_dir / "summary.json", {"dataset": entry.dataset, "model": entry.name, "runs": runs})
    return runs
