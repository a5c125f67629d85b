"""Tables for reports/: the paper's Tables 1-4 and the statistics table (Markdown + CSV), metrics.json.

Every table reads the long per-case table of evaluation (`dataset, model, run, case_id, class, metric,
value, postprocess`) and says above itself how its numbers were computed. The paper's tables:

- Table 1 (Kvasir-SEG, PROMISE12) and Table 2 (CHASE_DB1, LiTS17): CASNet and the baselines; the
  public stand-ins (MSD prostate, MSD liver) and the generated quickstart data take their place
  when they are what was run (`TABLE1_DATASETS`, `TABLE2_DATASETS`).
- Tables 3 and 4: the paper's ablation tables, split the same way (Table 3 on Kvasir-SEG and
  PROMISE12, Table 4 on CHASE_DB1 and LiTS17; paper section 4.4): full CASNet and its variants
  without HFE, CA and BR (our ablation entries), with the change in Dice against the full model and
  its Holm-corrected paired t-test and Wilcoxon p-values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medfusion.common import ENSEMBLE_RUNS, run_name
from medfusion.metrics import DISTANCE_METRICS, FLAGS, METRIC_NAMES, PENALISED, PRESENT
from medfusion.stats import strict_mean, strict_std

HEADLINE = ("dice", "iou", "hd95")
TABLE_METRICS = ("dice", "iou", "precision", "recall")  # the paper's columns, in %
# the rows of Tables 1-2 per model: the trained runs, the fold ensemble and, with eval.tta, the same with TTA
ESTIMATE_LABELS = {
    "runs": "mean ± std over runs",
    "ensemble": "fold ensemble",
    "ensemble_tta": "fold ensemble + flip TTA",
}
TABLE1_DATASETS = ("kvasir_seg", "promise12", "msd_prostate", "synthetic", "custom")
TABLE2_DATASETS = ("chase_db1", "lits17", "msd_liver", "synthetic_volumes")
TABLE_TITLES = {
    "table1": "Table 1: CASNet and the baselines on Kvasir-SEG and PROMISE12 (the paper's Table 1)",
    "table2": "Table 2: CASNet and the baselines on CHASE_DB1 and LiTS17 (the paper's Table 2)",
    "table3": "Table 3: CASNet ablations on Kvasir-SEG and PROMISE12 (the paper's Table 3)",
    "table4": "Table 4: CASNet ablations on CHASE_DB1 and LiTS17 (the paper's Table 4)",
}


# --- summaries ---------------------------------------------------------------------------------


def summarize_runs(per_case: pd.DataFrame, postprocess: str = "post") -> pd.DataFrame:
    """Per dataset, model, class and metric: mean ± std over runs of each run's mean over test cases.

    Uses the rows with `postprocess == postprocess` (all rows when the column is absent). No value is
    skipped: a NaN makes its run's mean NaN and is counted in `missing` (the pipeline's own tables have
    none: a missed or spurious structure has HD95/ASSD = the case's diagonal, `medfusion.metrics`).
    From the per-case indicator rows (`metrics.FLAGS`, where the table has them): `penalised` counts
    the (case, run) pairs whose HD95/ASSD is that penalty (0 for the other metrics), `absent` the
    test cases without the structure in the ground truth, and `mean_present` / `std_present` are the
    same mean ± std over the cases that contain it (NaN where every case does). std has ddof=1 (0 for
    one run). The "ensemble" run (and "ensemble_tta", eval.tta) is summarised on its own, as one
    value (estimate = the run, std NaN).

    Returns:
        Columns dataset, model, class, metric, estimate ("runs" | "ensemble" | "ensemble_tta"), mean,
        std, runs, cases, missing, penalised, absent, mean_present, std_present.
    """
    rows = per_case[per_case["postprocess"] == postprocess] if "postprocess" in per_case else per_case
    keys = ["dataset", "model", "class", "metric"]
    flags = rows[rows["metric"].isin(FLAGS)]
    rows = rows[~rows["metric"].isin(FLAGS)]
    where = ["dataset", "model", "class", "run", "case_id"]
    present = flags.loc[flags["metric"] == PRESENT, [*where, "value"]].rename(columns={"value": "present"})
    penalised = (
        flags[flags["metric"] == PENALISED]
        .groupby(where[:-1], as_index=False, sort=False)["value"]
        .sum()
        .rename(columns={"value": "pen"})
    )
    rows = rows.merge(present, on=where, how="left", validate="many_to_one")
    per_run = (
        rows.assign(missing=rows["value"].isna(), absent=rows["present"] == 0)
        .groupby([*keys, "run"], as_index=False, sort=False)
        .agg(
            value=("value", strict_mean),
            cases=("case_id", "nunique"),
            missing=("missing", "sum"),
            absent=("absent", "sum"),
        )
    )
    with_it = (  # each run's mean over the cases that contain the structure (a NaN among them: NaN)
        rows[rows["present"] == 1]
        .groupby([*keys, "run"], as_index=False, sort=False)["value"]
        .agg(strict_mean)
        .rename(columns={"value": "with_it"})
    )
    per_run = per_run.merge(with_it, on=[*keys, "run"], how="left", validate="one_to_one")
    per_run = per_run.merge(penalised, on=where[:-1], how="left", validate="many_to_one")
    recorded = bool((flags["metric"] == PENALISED).any())  # else unknown: NaN, shown as '-'
    per_run["penalised"] = np.where(
        per_run["metric"].isin(DISTANCE_METRICS), per_run["pen"].fillna(0) if recorded else np.nan, 0
    )
    per_run.loc[per_run["absent"] == 0, "with_it"] = np.nan  # every case has it: the plain mean says it all
    per_run["estimate"] = np.where(per_run["run"].isin(ENSEMBLE_RUNS), per_run["run"], "runs")
    out = per_run.groupby([*keys, "estimate"], as_index=False, sort=False).agg(
        mean=("value", strict_mean),
        std=("value", strict_std),
        runs=("run", "nunique"),
        cases=("cases", "max"),
        missing=("missing", "sum"),
        penalised=("penalised", lambda v: v.sum(min_count=1)),
        absent=("absent", "max"),
        mean_present=("with_it", strict_mean),
        std_present=("with_it", strict_std),
    )
    for column in ("missing", "absent"):
        out[column] = out[column].astype(int)
    single = (out["estimate"] == "runs") & (out["runs"] == 1)  # one run: std 0 where its mean is known
    out.loc[single & out["mean"].notna(), "std"] = 0.0
    out.loc[single & out["mean_present"].notna(), "std_present"] = 0.0
    out.loc[out["estimate"] != "runs", ["std", "std_present"]] = np.nan
    return out


STAGE_METRICS = ("dice", "iou")


def stage_metrics(per_case) -> dict:
    """{metric: {class: {post, raw[, ensemble, ensemble_raw][, ensemble_tta]}}} for Dice and IoU: the
    mean over the trained runs of each run's mean over test cases (post-processed and raw), and the
    fold ensemble's, as the tables compute them (`summarize_runs`)."""
    out: dict = {}
    for kind, suffix in (("post", ""), ("raw", "_raw")):
        summary = summarize_runs(per_case, kind)
        for r in summary[summary["metric"].isin(STAGE_METRICS)].itertuples():
            key = ("post" if kind == "post" else "raw") if r.estimate == "runs" else f"{r.estimate}{suffix}"
            out.setdefault(r.metric, {}).setdefault(r._3, {})[key] = round(float(r.mean), 6)
    return out


def global_dice_frame(dataset: str, model: str, global_dice: Mapping) -> pd.DataFrame:
    """Long rows (dataset, model, run, class, postprocess, value) of one evaluation's pooled Dice,
    eval.json's `global_dice` {run: {"raw" | "post": {region: value}}}."""
    rows = [
        {"dataset": dataset, "model": model, "run": run, "class": region, "postprocess": kind, "value": value}
        for run, kinds in global_dice.items()
        for kind, regions in kinds.items()
        for region, value in regions.items()
    ]
    return pd.DataFrame(rows, columns=["dataset", "model", "run", "class", "postprocess", "value"])


def summarize_global(frame: pd.DataFrame | None, postprocess: str = "post") -> pd.DataFrame:
    """The global (pooled over all test cases) Dice per dataset, model and class: mean ± std over
    the trained runs (estimate "runs", std ddof=1) and the fold ensemble's value ("ensemble").

    Returns:
        Columns dataset, model, class, estimate, mean, std, runs (empty when `frame` is None).
    """
    columns = ["dataset", "model", "class", "estimate", "mean", "std", "runs"]
    if frame is None or frame.empty:
        return pd.DataFrame(columns=columns)
    rows = frame[frame["postprocess"] == postprocess].assign(
        estimate=lambda f: np.where(f["run"].isin(ENSEMBLE_RUNS), f["run"], "runs")
    )
    out = rows.groupby(["dataset", "model", "class", "estimate"], as_index=False, sort=False).agg(
        mean=("value", "mean"), std=("value", "std"), runs=("run", "nunique")
    )
    out.loc[out["estimate"] == "runs", "std"] = out.loc[out["estimate"] == "runs", "std"].fillna(0.0)
    out.loc[out["estimate"].isin(ENSEMBLE_RUNS), "std"] = np.nan
    return out[columns]


def _global_cell(global_summary: pd.DataFrame, dataset: str, cls: str, model: str, estimate: str):
    g = global_summary
    rows = g[
        (g["dataset"] == dataset) & (g["class"] == cls) & (g["model"] == model) & (g["estimate"] == estimate)
    ]
    return (np.nan, np.nan) if rows.empty else (float(rows["mean"].iloc[0]), float(rows["std"].iloc[0]))


def metrics_json(summary: pd.DataFrame) -> dict:
    """Headline test metrics for `dvc metrics show`: {dataset: {model: {class: {dice, iou, hd95}}}}.

    `summary` is `summarize_runs(per_case)` (post-processed; only its "runs" rows are used) or the
    older summary without `estimate`. Means over runs of each run's mean over test cases; Dice and
    IoU in [0, 1], HD95 in the dataset's distance unit; a NaN mean (a NaN value in the table) is left out. The stds, the
    other metrics and the ensemble are in the tables; keeping them out keeps `dvc exp show` readable.
    """
    if "estimate" in summary:
        summary = summary[summary["estimate"] == "runs"]
    out: dict = {}
    for r in summary[summary["metric"].isin(HEADLINE)].itertuples(index=False):
        row = dict(zip(summary.columns, r, strict=True))
        if math.isnan(row["mean"]):
            continue
        cell = out.setdefault(row["dataset"], {}).setdefault(row["model"], {}).setdefault(row["class"], {})
        cell[row["metric"]] = round(float(row["mean"]), 6)
    return out


def mlflow_test_metrics(
    per_case: pd.DataFrame, summary: pd.DataFrame, runs: list[dict], pooled: pd.DataFrame | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """One (dataset, model)'s MLflow test metrics, from its per_case rows, its `summarize_runs` rows
    and its pooled Dice (`global_dice_frame` rows, logged as `test_global_dice_<class>`): per child
    run id, and for the parent."""
    post = per_case[per_case["postprocess"] == "post"]
    pooled = global_dice_frame("", "", {}) if pooled is None else pooled
    pooled = pooled[pooled["postprocess"] == "post"]
    children = {}
    for run in runs:
        if run.get("mlflow_run_id"):
            name = run_name(run["fold"], run["seed"])
            rows = post[(post["run"] == name) & ~post["metric"].isin(FLAGS)]
            means = rows.groupby(["class", "metric"])["value"].agg(strict_mean)
            children[run["mlflow_run_id"]] = {f"test_{m}_{c}": v for (c, m), v in means.items()}
            for r in pooled[pooled["run"] == name].itertuples():
                children[run["mlflow_run_id"]][f"test_global_dice_{r._4}"] = r.value
    trained, ensemble = summary[summary["estimate"] == "runs"], summary[summary["estimate"] == "ensemble"]
    parent = {f"test_{r.metric}_{r._3}": r.mean for r in trained.itertuples()}
    parent |= {f"test_{r.metric}_{r._3}_std": r.std for r in trained.itertuples()}
    for prefix, rows in (("test_penalised", trained), ("test_ensemble_penalised", ensemble)):
        hd95 = rows[(rows["metric"] == "hd95") & rows["penalised"].notna()]  # pairs given the diagonal
        parent |= {f"{prefix}_{r._3}": float(r.penalised) for r in hd95.itertuples()}
    parent |= {f"test_ensemble_{r.metric}_{r._3}": r.mean for r in ensemble.itertuples()}
    tta = summary[summary["estimate"] == "ensemble_tta"]
    parent |= {f"test_ensemble_tta_{r.metric}_{r._3}": r.mean for r in tta.itertuples()}
    g = summarize_global(pooled)
    parent |= {f"test_global_dice_{r._3}": r.mean for r in g[g["estimate"] == "runs"].itertuples()}
    parent |= {f"test_global_dice_{r._3}_std": r.std for r in g[g["estimate"] == "runs"].itertuples()}
    parent |= {
        f"test_ensemble_global_dice_{r._3}": r.mean for r in g[g["estimate"] == "ensemble"].itertuples()
    }
    return children, parent


# --- formatting --------------------------------------------------------------------------------


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _pct(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f}" if std is None or math.isnan(std) else _fmt(mean, std)


def _dist(mean: float, std: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def penalised_text(penalised: float, total: int) -> str:
    """'k/N': the case x run pairs whose HD95/ASSD is the diagonal penalty, of all scored; '-' where the
    table does not record it (a per-case table from before the `penalised` rows)."""
    return "-" if not total or pd.isna(penalised) else f"{int(penalised)}/{int(total)}"


def delta_text(metric: str, delta: float, low: float, high: float) -> str:
    """'Δ [low, high]' in table units, signed: the one formatter of every table's Δ (`stats`:
    Δ = model - reference, in that one direction everywhere)."""
    if delta is None or math.isnan(delta):
        return "-"
    scale = 1 if metric in DISTANCE_METRICS else 100
    bounds = "" if math.isnan(low) else f" [{scale * low:+.2f}, {scale * high:+.2f}]"
    return f"{scale * delta:+.2f}{bounds}"


def _p(p: float) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.2g}" if p < 1e-3 else f"{p:.3f}"


def _value(metric: str, x: float, unit: str) -> str:
    """A mean in table units: percent for overlap metrics, `unit` for distances."""
    if math.isnan(x):
        return "n/a"
    return f"{x:.2f}" if metric in DISTANCE_METRICS else f"{100 * x:.2f}"


def table_csv(frame: pd.DataFrame) -> str:
    """CSV text of a table from `build_tables`, headed by its `how` note as `# ` lines.

    Read it back with `pd.read_csv(path, comment="#")`.
    """
    how = frame.attrs.get("how", "")
    head = "".join(f"# {line.lstrip('# ')}\n" for line in how.splitlines() if line.strip())
    return head + frame.to_csv(index=False)


def _how(dataset: str, info: Mapping, summary: pd.DataFrame, with_ensemble: bool = True) -> str:
    """How the numbers of one dataset's section were computed."""
    rows = summary[(summary["dataset"] == dataset) & (summary["estimate"] == "runs")]
    runs = ", ".join(str(r) for r in sorted(set(rows["runs"])))
    cases = ", ".join(str(c) for c in sorted(set(rows["cases"])))
    classes = ", ".join(dict.fromkeys(rows["class"]))
    where = (
        info.get("resolution_text")
        or f"at {info.get('image_size', '?')}x{info.get('image_size', '?')} in-plane"
    )
    unit = (
        "one volume rebuilt from its slice predictions" if info.get("kind") == "volume" else "one 2-D image"
    )
    processing = (
        "post-processed (post-processing chosen on validation; 'Dice raw' is without it); "
        "'fold ensemble' = the mean of the runs' probabilities, one value; "
        if with_ensemble
        else "post-processed (post-processing chosen on validation); "
    )
    nested = {r: labels for r, labels in info.get("regions", {}).items() if len(labels) > 1}
    if nested:  # LiTS-like: a region is the union of labels (liver = liver + tumour)
        parts = [f"{r} = labels {'+'.join(map(str, labels))}" for r, labels in nested.items()]
        classes += (
            f"; scored as the field scores LiTS: {', '.join(parts)} (tumour included), the others alone"
        )
    pooled = (
        "'Dice global' = 2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN)) over all test volumes pooled (the "
        "LiTS challenge's global Dice), per run, then mean ± std over runs; "
        if info.get("kind") == "volume"
        else ""
    )
    return (
        f"Per test case = {unit}, {where}; foreground classes ({classes}); "
        f"mean ± std over {runs} runs (folds x seeds) of each run's mean over {cases} test cases; {processing}"
        f"{pooled}Dice, IoU, precision, recall in %; HD95 (the 95th percentile of the surface distances of "
        f"both directions pooled, medpy's definition) and ASSD in {info.get('distance_unit', 'px')}. "
        f"{HARD_CASES_NOTE}"
    )


HARD_CASES_NOTE = (
    "A missed or spurious structure (one mask empty, the other not) has HD95 = ASSD = the diagonal of "
    "the case's image (the largest distance it can have; the BraTS convention), so it counts against the "
    "model in every mean; 'penalised' = the case x run pairs given that penalty, of all. Both empty: "
    "Dice 1, HD95 0."
)


def _absent_note(summary: pd.DataFrame, dataset: str, unit_name: str) -> list[str]:
    """Where some test cases lack a structure (tumour-free volumes): how many, how they are scored, and
    that 'Dice (with it)' is the mean over the others."""
    rows = summary[(summary["dataset"] == dataset) & (summary["metric"] == "dice") & (summary["absent"] > 0)]
    if rows.empty:
        return []
    parts = [
        f"{cls}: {int(g['absent'].max())} of {int(g['cases'].max())} test {unit_name}s have none"
        for cls, g in rows.groupby("class", sort=False)
    ]
    return [
        f"Cases without the structure ({'; '.join(parts)}) score Dice 1 when predicted empty and 0 otherwise "
        "(the LiTS challenge's per-case score), which moves the mean by 1/n per such case; 'Dice (with it)' "
        "is the same mean ± std over the test cases that contain the structure only.",
        "",
    ]


def _section_head(
    dataset: str, info: Mapping, summary: pd.DataFrame, with_ensemble: bool = True
) -> list[str]:
    note = info.get("note")
    return [
        f"## {info.get('title', dataset)} (`{dataset}`)",
        "",
        *([note, ""] if note else []),
        _how(dataset, info, summary, with_ensemble),
        "",
    ]


def _datasets_of(table: str, present: Sequence[str], infos: Mapping[str, Mapping] | None = None) -> list[str]:
    """The datasets of `present` that go in table1/3 or table2/4, in the tables' order; a custom
    dataset that stands in for a paper dataset (eval info `stands_for`) goes in that one's table."""
    infos = infos or {}
    stands = {d: infos.get(d, {}).get("stands_for") for d in present}
    second = [d for d in present if d in TABLE2_DATASETS or stands[d] in TABLE2_DATASETS]
    if table in ("table2", "table4"):
        return sorted(
            second, key=lambda d: TABLE2_DATASETS.index(d) if d in TABLE2_DATASETS else len(TABLE2_DATASETS)
        )
    first = [d for d in TABLE1_DATASETS if d in present and d not in second]
    return first + sorted(
        d for d in present if d not in TABLE1_DATASETS + TABLE2_DATASETS and d not in second
    )


def _cell(summary: pd.DataFrame, metric: str, estimate: str = "runs") -> pd.Series | None:
    rows = summary[(summary["metric"] == metric) & (summary["estimate"] == estimate)]
    return rows.iloc[0] if len(rows) else None


def _stat(stats: pd.DataFrame, dataset: str, cls: str, metric: str, model: str) -> pd.Series | None:
    rows = stats[
        (stats["dataset"] == dataset) & (stats["class"] == cls) & (stats["metric"] == metric)
        & (stats["model"] == model)
    ]  # fmt: skip
    return rows.iloc[0] if len(rows) else None


# --- Tables 1-2: CASNet and the baselines --------------------------------------------------------


def _model_row(summary: pd.DataFrame, raw: pd.DataFrame, estimate: str, unit: str) -> dict:
    """The CSV fields of one (dataset, class, model) for the "runs" or "ensemble" estimate."""
    row: dict = {}
    for metric in (*TABLE_METRICS, *DISTANCE_METRICS):
        cell = _cell(summary, metric, estimate)
        row[f"{metric}_mean"] = np.nan if cell is None else float(cell["mean"])
        row[f"{metric}_std"] = np.nan if cell is None else float(cell["std"])
    dice, hd95 = _cell(summary, "dice", estimate), _cell(summary, "hd95", estimate)
    row["runs"] = 0 if dice is None else int(dice["runs"])
    row["cases"] = 0 if dice is None else int(dice["cases"])
    row["penalised"] = np.nan if hd95 is None else float(hd95["penalised"])
    row["absent"] = 0 if dice is None else int(dice["absent"])
    row["dice_present_mean"] = np.nan if dice is None else float(dice["mean_present"])
    row["dice_present_std"] = np.nan if dice is None else float(dice["std_present"])
    raw_dice = _cell(raw, "dice", estimate)
    row["dice_raw_mean"] = np.nan if raw_dice is None else float(raw_dice["mean"])
    row["dice_raw_std"] = np.nan if raw_dice is None else float(raw_dice["std"])
    row["distance_unit"] = unit
    return row


def _model_md(r: dict, label: str, with_global: bool = False, with_present: bool = False) -> str:
    overlap = [_pct(r[f"{m}_mean"], r[f"{m}_std"]) for m in TABLE_METRICS]
    if with_global:
        overlap.insert(1, _pct(r["dice_global_mean"], r["dice_global_std"]))
    if with_present:
        overlap.insert(1, _pct(r["dice_present_mean"], r["dice_present_std"]))
    dist = [_dist(r[f"{m}_mean"], r[f"{m}_std"]) for m in DISTANCE_METRICS]
    dist.append(penalised_text(r["penalised"], r["runs"] * r["cases"]))
    cells = [r["model"], r["class"], label, *overlap, *dist, _pct(r["dice_raw_mean"], r["dice_raw_std"])]
    return "| " + " | ".join([*cells, _p(r["p_dice_t_holm"]), _p(r["p_dice_wilcoxon_holm"])]) + " |"


def comparison_table(
    table: str,
    summary: pd.DataFrame,
    raw_summary: pd.DataFrame,
    infos: Mapping[str, Mapping],
    models: Sequence[str],
    stats: pd.DataFrame,
    global_summary: pd.DataFrame | None = None,
    observers: pd.DataFrame | None = None,
) -> tuple[str, pd.DataFrame]:
    """Table 1 or 2: per dataset and class, CASNet (`models[0]`) first, then the other entries of
    `models` (the ablation entries excluded by the caller), each as mean ± std over runs and as its
    fold ensemble, with the Holm-corrected p-values of CASNet against it on per-case Dice. Volume
    datasets get a 'Dice global' column (`summarize_global`: pooled over the test volumes). Where
    `observers` (evaluation's observer.csv rows) has the dataset, a last row per class: the second
    observer scored against the first, mean ± std over the test images (the human reference)."""
    global_summary = summarize_global(None) if global_summary is None else global_summary
    datasets = _datasets_of(table, list(dict.fromkeys(summary["dataset"])), infos)
    reference = models[0] if models else "-"
    lines = [f"# {TABLE_TITLES[table]}", ""]
    records = []
    if not datasets:
        lines.append("No dataset of this table was run.")
    for dataset in datasets:
        info = infos.get(dataset, {})
        unit = info.get("distance_unit", "px")
        with_global = info.get("kind") == "volume"
        absent = _absent_note(summary, dataset, "volume" if with_global else "image")
        lines += _section_head(dataset, info, summary)
        lines += [
            *absent,
            f"p = CASNet (`{reference}`) vs the model on per-case Dice averaged over runs, paired t-test and "
            "Wilcoxon signed-rank, Holm-corrected over every entry compared with CASNet (see statistics.md).",
            *_observer_note(observers, dataset),
            "",
            f"| model | class | estimate | Dice |{' Dice (with it) |' if absent else ''}"
            f"{' Dice global |' if with_global else ''} IoU | Precision | Recall | HD95 ({unit}) | ASSD ({unit}) "
            "| penalised | Dice raw | p (t, Holm) | p (Wilcoxon, Holm) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (with_global + bool(absent)),
        ]
        rows = summary[summary["dataset"] == dataset]
        raw = raw_summary[raw_summary["dataset"] == dataset]
        for cls in dict.fromkeys(rows["class"]):
            for model in [m for m in models if m in set(rows["model"])]:
                here = rows[(rows["class"] == cls) & (rows["model"] == model)]
                here_raw = raw[(raw["class"] == cls) & (raw["model"] == model)]
                test = _stat(stats, dataset, cls, "dice", model)
                for estimate, label in ESTIMATE_LABELS.items():
                    if not (here["estimate"] == estimate).any():
                        continue
                    r = {"table": table, "dataset": dataset, "class": cls, "model": model, "estimate": estimate,
                         **_model_row(here, here_raw, estimate, unit)}  # fmt: skip
                    r["dice_global_mean"], r["dice_global_std"] = _global_cell(
                        global_summary, dataset, cls, model, estimate
                    )
                    on_runs = test is not None and estimate == "runs"
                    r["p_dice_t_holm"] = float(test["p_t_holm"]) if on_runs else np.nan
                    r["p_dice_wilcoxon_holm"] = float(test["p_wilcoxon_holm"]) if on_runs else np.nan
                    records.append(r)
                    lines.append(_model_md(r, label, with_global, bool(absent)))
            human = _observer_record(observers, dataset, cls, unit)
            if human is not None:
                records.append({"table": table, **human})
                lines.append(
                    _model_md(human, "over test images (human reference)", with_global, bool(absent))
                )
        lines.append("")
    frame = pd.DataFrame(records, columns=_COMPARISON_COLUMNS)
    frame.attrs["how"] = "\n".join(line for line in lines if not line.startswith("|"))
    return "\n".join(lines).rstrip() + "\n", frame


def _observer_note(observers: pd.DataFrame | None, dataset: str) -> list[str]:
    if observers is None or observers.empty or not (observers["dataset"] == dataset).any():
        return []
    return [
        "`second_observer`: the second human observer's labels scored against the first observer's (the "
        "ground truth of every model) with the same metrics and resolution, mean ± std over the test "
        "images: the human reference."
    ]


def _observer_record(observers: pd.DataFrame | None, dataset: str, cls: str, unit: str) -> dict | None:
    """The second observer's row of one (dataset, class): mean ± std (ddof=1) over the test images of
    its per-image metrics against the first observer; None where there is no second observer."""
    if observers is None or observers.empty:
        return None
    rows = observers[(observers["dataset"] == dataset) & (observers["class"] == cls)]
    if rows.empty:
        return None
    r: dict = {"dataset": dataset, "class": cls, "model": "second_observer", "estimate": "human"}
    for metric in (*TABLE_METRICS, *DISTANCE_METRICS):
        values = rows.loc[rows["metric"] == metric, "value"]
        r[f"{metric}_mean"], r[f"{metric}_std"] = float(strict_mean(values)), float(strict_std(values))
    flag = rows.loc[rows["metric"] == PENALISED, "value"]
    penalised = float(flag.sum()) if len(flag) else np.nan
    r.update(runs=1, cases=int(rows["case_id"].nunique()), distance_unit=unit, penalised=penalised)
    nan = float("nan")
    r.update(absent=0, dice_present_mean=nan, dice_present_std=nan)
    r.update(dice_raw_mean=nan, dice_raw_std=nan, dice_global_mean=nan, dice_global_std=nan)
    r.update(p_dice_t_holm=nan, p_dice_wilcoxon_holm=nan)
    return r


_COMPARISON_COLUMNS = [
    "table", "dataset", "class", "model", "estimate", "runs", "cases",
    *(f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")),
    *(f"{m}_{s}" for m in DISTANCE_METRICS for s in ("mean", "std")),
    "penalised", "absent", "dice_present_mean", "dice_present_std", "distance_unit", "dice_raw_mean", "dice_raw_std", "dice_global_mean", "dice_global_std",
    "p_dice_t_holm", "p_dice_wilcoxon_holm",
]  # fmt: skip


# --- Tables 3-4: ablations -----------------------------------------------------------------------


def ablation_section_table(
    table: str,
    summary: pd.DataFrame,
    infos: Mapping[str, Mapping],
    entries: Sequence[str],
    settings: Mapping[str, Mapping],
    stats: pd.DataFrame,
    global_summary: pd.DataFrame | None = None,
) -> tuple[str, pd.DataFrame]:
    """Table 3 or 4: full CASNet (`entries[0]`) and each ablation entry, per dataset and class: the
    paper's four overlap metrics and HD95 (mean ± std over runs), Δ Dice = variant - full model on
    per-case Dice averaged over runs with its 95% CI, and Holm-corrected paired t-test and Wilcoxon p."""
    datasets = _datasets_of(table, list(dict.fromkeys(summary["dataset"])), infos)
    global_summary = summarize_global(None) if global_summary is None else global_summary
    lines = [f"# {TABLE_TITLES[table]}", ""]
    lines += [
        "Each variant is CASNet with one part switched off (its override of the `model` section in "
        "params.yaml), trained under the same protocol. Δ Dice = variant - full model in points (negative: "
        "the variant is worse), with the 95% CI of the paired per-case differences; p = full model vs variant, Holm-corrected over "
        "every entry compared with CASNet (statistics.md).",
        "",
    ]
    records = []
    present = [e for e in entries if e in set(summary["model"])]
    if len(present) < 2:
        lines.append("No ablation entry was run (`models.casnet` holds only the full model).")
    elif not datasets:
        lines.append("No dataset of this table was run.")
    for dataset in datasets if len(present) >= 2 else []:
        info = infos.get(dataset, {})
        unit = info.get("distance_unit", "px")
        with_global = info.get("kind") == "volume"
        absent = _absent_note(summary, dataset, "volume" if with_global else "image")
        lines += _section_head(dataset, info, summary, with_ensemble=False)
        lines += [
            *absent,
            f"| model | switched off | class | Dice |{' Dice (with it) |' if absent else ''}"
            f"{' Dice global |' if with_global else ''} IoU | Precision | Recall | HD95 ({unit}) | penalised "
            "| Δ Dice (pts) [95% CI] | p (t, Holm) | p (Wilcoxon, Holm) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (with_global + bool(absent)),
        ]
        rows = summary[(summary["dataset"] == dataset) & (summary["estimate"] == "runs")]
        for cls in dict.fromkeys(rows["class"]):
            for entry in present:
                here = rows[(rows["class"] == cls) & (rows["model"] == entry)]
                if here.empty:
                    continue
                off = ", ".join(f"{k}={v}" for k, v in settings.get(entry, {}).items()) or "(full model)"
                r = {"table": table, "dataset": dataset, "class": cls, "model": entry, "switched_off": off,
                     "runs": int(here["runs"].max()), "cases": int(here["cases"].max())}  # fmt: skip
                row = _model_row(here, here.iloc[:0], "runs", unit)
                r |= {k: row[k] for k in _ABLATION_COLUMNS if k in row}
                r["dice_global_mean"], r["dice_global_std"] = _global_cell(
                    global_summary, dataset, cls, entry, "runs"
                )
                test = _stat(stats, dataset, cls, "dice", entry)
                for key in ("delta", "delta_ci_low", "delta_ci_high", "p_t_holm", "p_wilcoxon_holm"):
                    r[key if key.startswith("p_") else key.replace("delta", "delta_dice", 1)] = (
                        np.nan if test is None else float(test[key])
                    )
                records.append(r)
                delta = delta_text("dice", r["delta_dice"], r["delta_dice_ci_low"], r["delta_dice_ci_high"])
                overlap = [_pct(r[f"{m}_mean"], r[f"{m}_std"]) for m in TABLE_METRICS]
                if with_global:
                    overlap.insert(1, _pct(r["dice_global_mean"], r["dice_global_std"]))
                if absent:
                    overlap.insert(1, _pct(r["dice_present_mean"], r["dice_present_std"]))
                cells = [entry, off, cls, *overlap, _dist(r["hd95_mean"], r["hd95_std"]),
                         penalised_text(r["penalised"], r["runs"] * r["cases"]), delta,
                         "-" if test is None else _p(r["p_t_holm"]),
                         "-" if test is None else _p(r["p_wilcoxon_holm"])]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    frame = pd.DataFrame(records, columns=_ABLATION_COLUMNS)
    frame.attrs["how"] = "\n".join(line for line in lines if not line.startswith("|"))
    return "\n".join(lines).rstrip() + "\n", frame


_ABLATION_COLUMNS = [
    "table", "dataset", "class", "model", "switched_off", "runs", "cases",
    *(f"{m}_{s}" for m in (*TABLE_METRICS, "hd95") for s in ("mean", "std")),
    "penalised", "absent", "dice_present_mean", "dice_present_std", "dice_global_mean", "dice_global_std",
    "delta_dice", "delta_dice_ci_low", "delta_dice_ci_high", "p_t_holm", "p_wilcoxon_holm", "distance_unit",
]  # fmt: skip


# --- statistics table ----------------------------------------------------------------------------


PATIENT_NOTE = (
    "Patients: where one patient gives several test cases (CHASE_DB1: two eyes of a child), the "
    "per-case test treats them as independent. The patient columns take patients as the unit: with "
    "fewer than 10 patients a t-interval on the per-patient mean differences (df = patients - 1; 't'; "
    "its Δ is the mean of the per-patient means, which is the per-case mean where every patient gives "
    "as many cases), "
    "from 10 on a cluster bootstrap of the mean per-case difference over patients (10,000 draws, "
    "percentile; 'bootstrap'): a bootstrap of a handful of patients has few distinct resamples and covers "
    "too rarely. p (t, patients): a t-test on the per-patient mean differences. Datasets where every case "
    "is its own patient have no patient columns: their per-case test is the patient test."
)
RUNS_NOTE = (
    "Over runs (training variance): each trained run's (fold x seed) mean Dice over the test cases, "
    "CASNet against the model's run of the same fold and seed; paired t-test and Wilcoxon over those "
    "runs, Holm-corrected per dataset x class, Δ = model - CASNet in points with its t-based 95% CI. "
    "The runs' training sets overlap (folds of one training part, the same test set), so these runs "
    "are not independent and this test understates the variance (Nadeau and Bengio, 2003): read it as "
    "a description of training variance, not as the paper's test, which is the per-case one above."
)
STATISTICS_HOW = (
    "Post-processed test predictions of the trained runs (the fold ensemble left out); each test case's "
    "value averaged over all runs (none dropped: a missed or spurious structure has HD95 = ASSD = the "
    "case's diagonal; 'penalised' = the case x run pairs given that penalty, CASNet / model; n = cases "
    "paired). Paired t-test (scipy ttest_rel, the paper's test) and Wilcoxon signed-rank (scipy wilcoxon, "
    "zero differences dropped), Holm-corrected within each dataset x class x metric over every entry "
    "compared with CASNet. Δ = model - CASNet (points for Dice/IoU, where negative: the model is worse; "
    "distance unit for HD95/ASSD, where positive: the model is worse) with the t-based 95% CI of the "
    "paired differences."
)


def statistics_table(
    stats: pd.DataFrame, infos: Mapping[str, Mapping], runs: pd.DataFrame | None = None
) -> tuple[str, pd.DataFrame]:
    """Markdown of `medfusion.stats.compare_models`'s output per dataset (the per-case test, and the
    patient-level interval and test where patients give several cases), then `compare_runs`'s output
    (`runs`) where given; the CSV is compare_models's output."""
    lines = ["# Statistics: CASNet against every other entry", "", STATISTICS_HOW, ""]
    if stats.empty:
        lines.append("No comparison: fewer than two models were run.")
    patients_shown = False
    for dataset, group in stats.groupby("dataset", sort=False):
        info = infos.get(dataset, {})
        patients = "patient_ci_low" in group and bool(group["patient_ci_low"].notna().any())
        patients_shown |= patients
        lines += [
            f"## {info.get('title', dataset)} (`{dataset}`)",
            "",
            *_stats_rows(group, info, patients),
            "",
        ]
    if patients_shown:
        lines += [PATIENT_NOTE, ""]
    if runs is not None and not runs.empty:
        lines += _runs_section(runs, infos)
    frame = stats.copy()
    frame.attrs["how"] = "\n".join(lines[2:3])
    return "\n".join(lines).rstrip() + "\n", frame


def _stats_rows(group: pd.DataFrame, info: Mapping, patients: bool) -> list[str]:
    """The per-case test's table of one dataset, with the patient-level columns when `patients`."""
    unit = info.get("distance_unit", "px")
    extra = " patients | Δ [95% CI], patients | p (t, patients) |" if patients else ""
    lines = [
        f"| class | metric | model | n | {group['reference'].iloc[0]} | model | penalised | Δ [95% CI] | t "
        "| p (t) | p (t, Holm) | W | p (W) | p (W, Holm) |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" * 3 if patients else ""),
    ]
    for r in group.to_dict("records"):
        metric = r["metric"]
        name = METRIC_NAMES.get(metric, metric) + (f" ({unit})" if metric in DISTANCE_METRICS else " (%)")
        t = "n/a" if math.isnan(r["t"]) else f"{r['t']:.3f}"
        w = "n/a" if math.isnan(r["w"]) else f"{r['w']:.1f}"
        cells = [r["class"], name, r["model"], str(r["n_cases"]), _value(metric, r["mean_reference"], unit),
                 _value(metric, r["mean_model"], unit), _penalised_pair(r),
                 delta_text(metric, r["delta"], r["delta_ci_low"], r["delta_ci_high"]), t, _p(r["p_t"]),
                 _p(r["p_t_holm"]), w, _p(r["p_wilcoxon"]), _p(r["p_wilcoxon_holm"])]  # fmt: skip
        if patients:
            n_groups = "n/a" if pd.isna(r["n_groups"]) else str(int(r["n_groups"]))
            method = f" ({r['patient_ci_method']})" if isinstance(r.get("patient_ci_method"), str) and r[
                "patient_ci_method"] else ""  # fmt: skip
            interval = delta_text(metric, r["patient_delta"], r["patient_ci_low"], r["patient_ci_high"])
            cells += [n_groups, interval + method, _p(r["p_t_groups"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _penalised_pair(r: Mapping) -> str:
    """'k / k'' penalised case x run pairs of the reference and the model (distance metrics), '-' otherwise."""
    low, high = r.get("penalised_reference", np.nan), r.get("penalised_model", np.nan)
    if pd.isna(low) or pd.isna(high):
        return "-"
    return f"{int(low)} / {int(high)}"


def _runs_section(runs: pd.DataFrame, infos: Mapping[str, Mapping]) -> list[str]:
    """`medfusion.stats.compare_runs`'s output per dataset."""
    lines = ["## Over runs", "", RUNS_NOTE, ""]
    for dataset, group in runs.groupby("dataset", sort=False):
        unit = infos.get(dataset, {}).get("distance_unit", "px")
        lines += [
            f"### {infos.get(dataset, {}).get('title', dataset)} (`{dataset}`)",
            "",
            f"| class | metric | model | runs | {group['reference'].iloc[0]} | model | Δ [95% CI] | p (t) "
            "| p (t, Holm) | p (W) | p (W, Holm) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group.to_dict("records"):
            metric = r["metric"]
            cells = [r["class"], METRIC_NAMES.get(metric, metric), r["model"], str(r["n_runs"]),
                     _value(metric, r["mean_reference"], unit), _value(metric, r["mean_model"], unit),
                     delta_text(metric, r["delta"], r["delta_ci_low"], r["delta_ci_high"]), _p(r["p_t"]),
                     _p(r["p_t_holm"]), _p(r["p_wilcoxon"]), _p(r["p_wilcoxon_holm"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# --- everything at once --------------------------------------------------------------------------


def build_tables(
    per_case: pd.DataFrame,
    infos: Mapping[str, Mapping],
    models: Sequence[str],
    ablations: Mapping[str, Mapping],
    stats: pd.DataFrame,
    global_dice: pd.DataFrame | None = None,
    runs: pd.DataFrame | None = None,
    observers: pd.DataFrame | None = None,
) -> dict[str, tuple[str, pd.DataFrame]]:
    """The paper's Tables 1-4 and the statistics table, as (markdown, CSV frame) each.

    Args:
        per_case: the long per-case table (with `postprocess`; "post" rows feed the tables,
            "raw" rows the 'Dice raw' column).
        infos: per dataset, its eval info: distance_unit, image_size, kind, title, note.
        models: every model entry, CASNet first (params `model_names`: CASNet entries, then baselines).
        ablations: params `ablations` (entry -> its override of `model`); the entries of `models` that
            are keys here, after the first, are the ablation variants (Tables 3-4), the others
            (baselines) go in Tables 1-2.
        stats: `medfusion.stats.compare_models(per_case, models)`.
        global_dice: the pooled Dice of every evaluation (`global_dice_frame` rows); volume datasets
            show it as 'Dice global'.
        runs: `medfusion.stats.compare_runs(per_case, models)`, shown in the statistics table.
        observers: the second observer's per-case rows (evaluation's observer.csv), the human
            reference row of Tables 1-2.

    Returns:
        {"table1", "table2", "table3", "table4", "statistics"}: (markdown text, frame); write the
        frame with `table_csv` to keep its header note.
    """
    summary = summarize_runs(per_case, "post")
    raw = summarize_runs(per_case, "raw") if "postprocess" in per_case else summary.iloc[:0]
    reference = models[0] if models else None
    variants = [m for m in models[1:] if m in ablations]
    compared = [m for m in models if m not in variants]
    casnet = [reference, *variants] if reference else []
    pooled = summarize_global(global_dice)
    out = {
        t: comparison_table(t, summary, raw, infos, compared, stats, pooled, observers)
        for t in ("table1", "table2")
    }
    for t in ("table3", "table4"):
        out[t] = ablation_section_table(t, summary, infos, casnet, ablations, stats, pooled)
    out["statistics"] = statistics_table(stats, infos, runs)
    return out


# --- efficiency --------------------------------------------------------------------------------

PAPER_EFFICIENCY = "MedFusion-TransNet as published: 35 ms/image and 7.8 GB peak memory on an NVIDIA RTX 3090 (paper, sec. 4)"


def efficiency_markdown(rows: Sequence[Mapping]) -> str:
    """The efficiency table (rows of `medfusion.efficiency.efficiency_row`) as markdown, with how and
    where it was measured and the paper's figures beside it."""
    first = rows[0] if rows else {}
    timed = "ms_per_image" in first
    size, channels = first.get("size", 256), first.get("in_channels", 3)
    head = "| model | architecture | parameters (M) | GFLOPs |" + (" ms/image |" if timed else "")
    how = (
        f" ms/image: median of 10 eval-mode forward passes at batch 1 after 2 warm-ups, on {first['machine']}; "
        f"{first['precision']}."
        if timed
        else ""
    )
    lines = [
        "## Model efficiency",
        "",
        f"Widths from params.yaml; {channels}-channel {size}x{size} input, 2 classes. GFLOPs: one forward pass "
        f"of one image (torch.utils.flop_counter, a multiply-add = 2 FLOPs).{how}",
        "",
        head,
        "|---|---|---|---|" + ("---|" if timed else ""),
    ]
    for r in rows:
        line = f"| {r['model']} | {r['architecture']} | {r['parameters'] / 1e6:.2f} | {r['gflops']:.2f} |"
        if timed:
            line += f" {r['ms_per_image']:.1f} |"
        lines.append(line)
    lines += ["", f"For comparison, {PAPER_EFFICIENCY}. Peak memory is not measured on CPU.", ""]
    return "\n".join(lines)
