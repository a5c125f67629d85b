"""Tables for reports/: a markdown table per dataset, metrics.json for `dvc metrics show`."""

from __future__ import annotations

import math

import pandas as pd

from medfusion.data.registry import DatasetSpec
from medfusion.metrics import METRICS

HEADLINE = ("dice", "iou")


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def dataset_table(
    summary: pd.DataFrame, tests: pd.DataFrame, dataset: str, image_size: int, spec: DatasetSpec
) -> str:
    """Markdown: one row per (model, class), mean ± std over runs of the per-run mean over test cases, in %."""
    rows = summary[summary["dataset"] == dataset]
    unit = "volume (slices stacked)" if spec.kind == "volume" else "image"
    runs = ", ".join(sorted({str(r) for r in rows["runs"]}))
    cases = ", ".join(sorted({str(c) for c in rows["cases"]}))
    lines = [
        f"## {spec.title} (`{dataset}`)",
        "",
        *([spec.note, ""] if spec.note else []),
        f"Per test case = one {unit}, at {image_size}x{image_size} in-plane; foreground classes only; "
        f"mean ± std over {runs} runs (folds x seeds) of each run's mean over {cases} test cases; values in %.",
        "",
        "| model | class | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for (model, cls), group in rows.groupby(["model", "class"], sort=False):
        by_metric = group.set_index("metric")
        cells = [_fmt(by_metric.loc[m, "mean"], by_metric.loc[m, "std"]) for m in METRICS]
        lines.append(f"| {model} | {cls} | " + " | ".join(cells) + " |")
    tests = tests[tests["dataset"] == dataset]
    lines += [
        "",
        "Paired t-test on per-case Dice averaged over runs (reference: the first model entry, CASNet by default):",
        "",
    ]
    if tests.empty:
        lines.append("No comparison: only one model was run.")
    else:
        lines += [
            "| reference | model | class | cases | mean diff (pts) | t | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in tests.itertuples():
            p = "n/a" if math.isnan(r.p_value) else f"{r.p_value:.3g}"
            t = "n/a" if math.isnan(r.t) else f"{r.t:.3f}"
            lines.append(
                f"| {r.reference} | {r.model} | {r._2} | {r.n_cases} | {100 * r.mean_diff:.2f} | {t} | {p} |"
            )
    return "\n".join(lines) + "\n"


def metrics_json(summary: pd.DataFrame) -> dict:
    """Headline test metrics for `dvc metrics show`: {dataset: {model: {class: {dice, iou}}}} in [0, 1].

    Means over runs of each run's mean over test cases. Precision, recall and every std are in the
    tables and summary.csv; keeping them out keeps `dvc exp show` readable.
    """
    out: dict = {}
    for r in summary[summary["metric"].isin(HEADLINE)].itertuples():
        cell = out.setdefault(r.dataset, {}).setdefault(r.model, {}).setdefault(r._3, {})
        cell[r.metric] = round(float(r.mean), 6)
    return out


def ablation_table(
    summary: pd.DataFrame, tests: pd.DataFrame, entries: list[str], settings: dict[str, dict]
) -> str:
    """Markdown: the CASNet entries (full model first, then its ablations) per dataset and class, as the
    paper's Tables 3-4: Dice and IoU mean ± std over runs, the Dice change against the full model and the
    paired t-test p-value from the stats stage. `settings` maps an entry to its override of `model`."""
    rows = summary[summary["model"].isin(entries)]
    lines = [
        "## CASNet ablations",
        "",
        "Each variant is CASNet with one part switched off (its override of the `model` section in "
        "params.yaml), trained under the same protocol. Values in %: mean ± std over runs of each run's "
        "mean over the test cases; Δ Dice = variant - full model on per-case Dice averaged over runs; "
        "p = paired t-test (stats stage).",
        "",
        "| dataset | class | model | switched off | Dice | IoU | Δ Dice (pts) | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not entries:
        return "\n".join(lines[:2] + ["No CASNet entry was run (`models.casnet` is empty)."]) + "\n"
    reference = entries[0]
    for (dataset, cls), group in rows.groupby(["dataset", "class"], sort=False):
        stats_rows = tests[(tests["dataset"] == dataset) & (tests["class"] == cls)]
        for entry in entries:
            cell = group[group["model"] == entry].set_index("metric")
            if cell.empty:
                continue
            test = stats_rows[(stats_rows["reference"] == reference) & (stats_rows["model"] == entry)]
            delta = p = "-"
            if len(test):
                delta = f"{-100 * test['mean_diff'].item():.2f}"
                p = "n/a" if math.isnan(test["p_value"].item()) else f"{test['p_value'].item():.3g}"
            off = ", ".join(f"{k}={v}" for k, v in settings.get(entry, {}).items()) or "(full model)"
            dice = _fmt(cell.loc["dice", "mean"], cell.loc["dice", "std"])
            iou = _fmt(cell.loc["iou", "mean"], cell.loc["iou", "std"])
            lines.append(f"| {dataset} | {cls} | {entry} | {off} | {dice} | {iou} | {delta} | {p} |")
    return "\n".join(lines) + "\n"
