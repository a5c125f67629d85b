"""The generalisation table from finished transfer stages (data/eval/transfer; `medfusion.transfer`).

Light on purpose (pandas only, no torch): the report stage reads it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medfusion.common import ENSEMBLE_RUNS
from medfusion.data.io import read_json
from medfusion.metrics import PENALISED
from medfusion.report import delta_text, penalised_text
from medfusion.stats import strict_mean, strict_std


def load_results(transfer_dir: Path) -> list[dict]:
    """Every finished transfer under data/eval/transfer: [{trained_on, target, title, stats, entries:
    {entry: per_case}, info}], sorted by training dataset and target. [] when there is none."""
    results = []
    for target_dir in sorted(Path(transfer_dir).glob("*/*")):
        if not (target_dir / "stats.csv").is_file():
            continue
        entries, info = {}, {}
        for entry_dir in sorted(p for p in target_dir.iterdir() if (p / "per_case.csv").is_file()):
            entries[entry_dir.name] = pd.read_csv(entry_dir / "per_case.csv")
            info = read_json(entry_dir / "transfer.json")
        stats = (
            pd.read_csv(target_dir / "stats.csv")
            if (target_dir / "stats.csv").stat().st_size
            else pd.DataFrame()
        )
        results.append(
            {"trained_on": target_dir.parent.name, "target": target_dir.name, "stats": stats,
             "entries": entries, "info": info}
        )  # fmt: skip
    return results


def _kind(frame: pd.DataFrame) -> str:
    return "post" if "post" in set(frame["postprocess"]) else "raw"


def generalisation_table(results: list[dict], models: list[str]) -> tuple[str, pd.DataFrame]:
    """reports/tables/generalisation: per (training dataset -> target, class, entry) the Dice over runs
    (each run's mean over the target's cases: mean ± std), the fold ensemble's Dice and HD95 (every
    case: a missed structure has the case's diagonal, `medfusion.metrics`; a NaN makes the mean NaN)
    with the number of cases given that penalty, and Δ Dice = the entry - CASNet per case
    (`stats.compare_models`' delta, one direction in every table) with its CI and Holm-corrected
    t-test. -> (markdown, the rows as a frame)."""
    rows = []
    for result in results:
        stats = result["stats"]
        for entry in [m for m in models if m in result["entries"]]:
            frame = result["entries"][entry]
            frame = frame[frame["postprocess"] == _kind(frame)]
            for region, by_class in frame.groupby("class"):
                dice = by_class[by_class["metric"] == "dice"]
                per_run = dice[~dice["run"].isin(ENSEMBLE_RUNS)].groupby("run")["value"].agg(strict_mean)
                ens = by_class[
                    by_class["run"]
                    == ("ensemble" if "ensemble" in set(by_class["run"]) else per_run.index[0])
                ]
                test = (
                    stats[(stats["class"] == region) & (stats["metric"] == "dice") & (stats["model"] == entry)]
                    if len(stats) else pd.DataFrame()
                )  # fmt: skip
                rows.append({
                    "trained_on": result["trained_on"], "target": result["target"], "class": region,
                    "model": entry, "postprocess": _kind(frame), "runs": len(per_run),
                    "cases": dice["case_id"].nunique(), "roi": result["info"].get("roi", "image"),
                    "dice_mean": strict_mean(per_run), "dice_std": strict_std(per_run) if len(per_run) > 1 else float("nan"),
                    "ensemble_dice": ens[ens["metric"] == "dice"]["value"].mean(skipna=False),
                    "ensemble_hd95": ens[ens["metric"] == "hd95"]["value"].mean(skipna=False),
                    "ensemble_penalised": _count(ens, PENALISED),
                    "delta": test["delta"].iloc[0] if len(test) else float("nan"),
                    "delta_ci_low": test["delta_ci_low"].iloc[0] if len(test) else float("nan"),
                    "delta_ci_high": test["delta_ci_high"].iloc[0] if len(test) else float("nan"),
                    "p_holm": test["p_t_holm"].iloc[0] if len(test) else float("nan"),
                })  # fmt: skip
    frame = pd.DataFrame(rows)
    return _generalisation_markdown(frame, models[0]), frame


def _count(rows: pd.DataFrame, flag: str) -> float:
    """How many cases of `rows` have the indicator `flag`; NaN where the table does not record it."""
    found = rows.loc[rows["metric"] == flag, "value"]
    return float(found.sum()) if len(found) else float("nan")


def _pct(v: float) -> str:
    return "-" if pd.isna(v) else f"{100 * v:.2f}"


def _generalisation_markdown(frame: pd.DataFrame, reference: str) -> str:
    lines = [
        "# Generalisation: trained on one dataset, tested on another without retraining",
        "",
        "Every entry's runs (folds x seeds) and their fold ensemble, trained on the first dataset, predict "
        "*all* cases of the target, preprocessed as the training data was (eval.transfer; "
        "`medfusion/transfer.py`). Each case scored at its original size against the target's own ground "
        "truth (inside its field of view where it has one), with the post-processing chosen on the "
        'training dataset\'s validation folds. Dice (%) per case; "runs": mean ± std over runs of each '
        f"run's mean over the cases; Δ: the entry minus `{reference}` per case (each case averaged over "
        "the runs; negative: the entry is worse), 95% CI, paired t-test Holm-corrected over the entries. "
        "HD95 over every case: a missed or spurious structure scores the case's diagonal (the BraTS "
        "convention); 'penalised': how many of the cases got that penalty.",
        "",
        "| trained on → target | class | entry | cases | Dice, runs | Dice, ensemble | HD95 ensemble (px/mm) "
        f"| penalised | Δ Dice vs `{reference}` [95% CI] | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.to_dict("records"):
        spread = "" if pd.isna(r["dice_std"]) else f" ± {100 * r['dice_std']:.2f}"
        delta = delta_text("dice", r["delta"], r["delta_ci_low"], r["delta_ci_high"])
        p = "-" if pd.isna(r["p_holm"]) else f"{r['p_holm']:.2g}"
        where = " (FOV)" if r["roi"] == "fov" else ""
        hd95 = "-" if pd.isna(r["ensemble_hd95"]) else f"{r['ensemble_hd95']:.2f}"
        lines.append(
            f"| `{r['trained_on']}` → `{r['target']}`{where} | {r['class']} | `{r['model']}` | {r['cases']} "
            f"| {_pct(r['dice_mean'])}{spread} ({r['runs']} runs) | {_pct(r['ensemble_dice'])} "
            f"| {hd95} | {penalised_text(r['ensemble_penalised'], r['cases'])} | {delta} | {p} |"
        )
    return "\n".join(lines) + "\n"


def mlflow_transfer_metrics(results: list[dict], trained_on: str, entry: str) -> dict[str, float]:
    """The parent run's transfer metrics: `transfer_<target>_dice_<class>` (the ensemble's, post-processed
    where chosen) and `transfer_<target>_dice_runs_<class>` (mean over runs)."""
    metrics = {}
    for result in results:
        frame = result["entries"].get(entry)
        if result["trained_on"] != trained_on or frame is None:
            continue
        frame = frame[(frame["postprocess"] == _kind(frame)) & (frame["metric"] == "dice")]
        for region, by_class in frame.groupby("class"):
            runs = by_class[~by_class["run"].isin(ENSEMBLE_RUNS)].groupby("run")["value"].agg(strict_mean)
            ens = by_class[by_class["run"] == "ensemble"]["value"]
            metrics[f"transfer_{result['target']}_dice_runs_{region}"] = float(strict_mean(runs))
            if len(ens):
                metrics[f"transfer_{result['target']}_dice_{region}"] = float(strict_mean(ens))
    return metrics
