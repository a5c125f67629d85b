"""Cross-validated training of one entry: `run_cv` trains every (fold, seed) of `cv` not already done.

Layout under out_dir (data/runs/<dataset>/<entry>/): one folder per run (`run_fold` writes its
model.pt and history.json; the executor adds result.json, the completion record with the run's
config hash, best epoch and best validation loss and Dice) and summary.json, every run's result
for the evaluate stage.

A run whose result.json carries the current config hash (`run_hash`) is finished and is not redone;
a run with another hash (the entry's settings, the split, the data or the code that trains it
changed: `provenance.code_fingerprint`) is retrained, and the log says why ("code changed:
medfusion/models/unet.py"). Its last.pt is keyed by the same hash, so an interrupted run resumes only
with the same code. Runs no longer asked for are removed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from medfusion.common import run_name
from medfusion.config import CVParams, ExecutorParams
from medfusion.data.io import read_json, write_json
from medfusion.entries import Entry, Resources
from medfusion.provenance import changed_files, code_fingerprint
from medfusion.training.executor import RunJob, RunTracker, run_pending


def run_hash(entry: Entry, processed_dir: Path, split: dict, fold: int, seed: int) -> str:
    """What a finished run depends on: the entry, the processed data and the fold's cases."""
    meta = read_json(Path(processed_dir) / "meta.json")
    return entry.run_hash(meta["sha256"], split["folds"][fold], fold, seed)


def retrain_reason(record: dict) -> str:
    """Why a finished run's result.json no longer counts: the code files that changed since it was
    trained (`provenance.changed_files`), or else its settings, data or fold."""
    changed = changed_files(record.get("code_files"), code_fingerprint()[1])
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        return f"code changed: {', '.join(changed[:5])}{more}"
    if "code_fingerprint" not in record:
        return "trained before runs recorded their code"
    return "settings, data or fold changed"


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
        record = read_json(record_path) if record_path.exists() else None
        if record is not None and record.get("config_hash") == digest:
            print(
                f"{entry.dataset}/{entry.name} {run_dir.name}: finished earlier with this config and code, skipped"
            )
            results[fold, seed] = record
            continue
        if record is not None:
            print(f"{entry.dataset}/{entry.name} {run_dir.name}: {retrain_reason(record)}, trained again")
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
