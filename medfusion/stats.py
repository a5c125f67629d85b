"""Paired statistics on the long per-case table: CASNet against every other model entry.

Input: the long table of evaluation, columns `dataset, model, run, case_id, class, metric, value`
and, where post-processing was evaluated, `postprocess` ("raw" / "post"). `run` is "fold{k}_seed{s}"
for a trained run or "ensemble" for the fold ensemble.

What is compared (METHOD.md section 3, "statistics"):

- the post-processed rows ("post"; all rows when the table has no `postprocess` column), without
  the "ensemble" run: the ensemble is one more prediction, not a repeat;
- per dataset, class and metric, each test case's value averaged over the runs. No value is dropped:
  HD95/ASSD of a missed or spurious structure are the case's diagonal (`medfusion.metrics`), so a
  case missed in 14 runs of 15 is averaged with 14 penalties, and a NaN (a table from elsewhere)
  makes that case's mean NaN and is counted (`n_missing`), never skipped silently;
- the reference (the first model entry, CASNet) against each other entry (ablations and baselines),
  on the cases where both have a value (`n_cases`; `n_missing` the cases left out, 0 for the
  pipeline's own tables);
- paired t-test (scipy.stats.ttest_rel, the paper's test) and Wilcoxon signed-rank
  (scipy.stats.wilcoxon, its defaults: two-sided, zero differences dropped), each Holm-corrected
  within a family = one dataset x class x metric (all entries compared with the reference);
- one direction for every difference in every table: Δ = model - reference (`delta`, with its
  t-based 95% CI `delta_ci_low/high`), so a worse entry has a negative Δ on Dice/IoU and a positive
  one on HD95/ASSD (lower is better there). `t` is ttest_rel(model, reference), of Δ's sign.
- the penalised cases: for HD95/ASSD, `penalised_reference` / `penalised_model` count the case x
  run pairs of each model whose distance is the diagonal penalty (the per-case table's `penalised`
  rows), shown beside the means;
- patients, not cases (METHOD.md section 3): where the table has a `group` column (the patient of
  each case, from the split's cases.json) and some patient gives several cases (CHASE_DB1: two eyes
  of a child), `cluster_comparison` adds an interval and a test over patients (`n_groups`,
  `patient_ci_low/high`, `patient_ci_method`, `p_t_groups`): with fewer than `MIN_BOOTSTRAP_PATIENTS`
  (10) patients a t-interval on the per-patient mean differences (df = patients - 1; a bootstrap of
  4 patients has 35 distinct resamples and covers 0 about 79% of the time at a nominal 95%), above
  that a cluster bootstrap of the mean per-case difference (percentile, 10,000 draws, seeded); the
  test is a t-test on the per-patient mean differences. Where every case is its own patient these
  are NaN: the per-case test already is the patient test.
- training variance (`compare_runs`): the per-run mean over test cases, reference against model in
  the same run (fold and seed), paired t-test and Wilcoxon over runs, Holm-corrected per family.
  The runs' training sets overlap (folds of one training part), so this test understates the
  variance (Nadeau and Bengio 2003); the tables say so and it is not the paper's test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from medfusion.common import ENSEMBLE_RUNS
from medfusion.metrics import DISTANCE_METRICS, PENALISED

DEFAULT_METRICS = ("dice", "iou", "hd95")
COLUMNS = [
    "dataset", "class", "metric", "reference", "model", "n_cases", "mean_reference", "mean_model",
    "delta", "delta_ci_low", "delta_ci_high", "t", "p_t", "p_t_holm", "w", "p_wilcoxon", "p_wilcoxon_holm",
    "n_missing", "penalised_reference", "penalised_model",
    "n_groups", "patient_delta", "patient_ci_low", "patient_ci_high", "patient_ci_method", "p_t_groups",
]  # fmt: skip
RUN_COLUMNS = ["n_runs" if c == "n_cases" else c for c in COLUMNS[:20]]
BOOTSTRAP_DRAWS = 10_000
MIN_BOOTSTRAP_PATIENTS = 10  # fewer patients: a t-interval on the per-patient means (METHOD.md section 3)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values of one family of tests (same order as the input).

    Sorted ascending, the i-th smallest (0-based) of m becomes max over j <= i of (m - j) p_(j),
    capped at 1. NaN p-values (tests that could not be run) stay NaN and do not count in m.

    Example: [0.01, 0.04, 0.03, 0.005] -> [0.03, 0.06, 0.06, 0.02].
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def paired_comparison(reference: np.ndarray, other: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Paired tests of two per-case vectors (same cases, same order); pairs with a NaN are left out
    and counted (`n_missing`).

    Returns:
        n_cases, n_missing, mean_reference, mean_model, delta (mean of other - reference: the one
        direction of every table), delta_ci_low, delta_ci_high (t-based CI of delta), t and p_t
        (ttest_rel(other, reference)), w and p_wilcoxon (wilcoxon). t/p_t are NaN with fewer than 2
        pairs or constant differences (up to rounding: the t statistic is undefined); w/p_wilcoxon are
        NaN when every difference is zero (nothing to rank) or there are no pairs.
    """
    a, b = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    diff = b - a
    n = len(diff)
    out = dict.fromkeys(["mean_reference", "mean_model", "delta", "delta_ci_low", "delta_ci_high", "t", "p_t",
                         "w", "p_wilcoxon"], np.nan)  # fmt: skip
    out.update(n_cases=n, n_missing=int((~keep).sum()))
    if n == 0:
        return out
    out.update(mean_reference=float(a.mean()), mean_model=float(b.mean()), delta=float(diff.mean()))
    if n >= 2:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / np.sqrt(n)
        out.update(delta_ci_low=float(diff.mean() - half), delta_ci_high=float(diff.mean() + half))
        if np.ptp(diff) > 1e-12 * max(1.0, float(np.abs(diff).max())):  # constant up to rounding: no t
            t, p = stats.ttest_rel(b, a)
            out.update(t=float(t), p_t=float(p))
    if np.any(diff != 0):
        w, p = stats.wilcoxon(b, a)
        out.update(w=float(w), p_wilcoxon=float(p))
    return out


def cluster_comparison(
    reference: np.ndarray,
    other: np.ndarray,
    groups: np.ndarray,
    confidence: float = 0.95,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> dict[str, float]:
    """The paired comparison with patients, not cases, as the unit (pairs with a NaN dropped).

    The interval of Δ (other - reference), by the number of patients P (METHOD.md section 3):
    - P < MIN_BOOTSTRAP_PATIENTS (10): a t-interval on the P per-patient mean differences, df = P - 1,
      centred on their mean (method "t"). With equal cases per patient (CHASE_DB1: two eyes each) that
      centre is the per-case mean difference; otherwise it weighs patients equally.
    - P >= 10: a cluster bootstrap (method "bootstrap"): each of `draws` resamples takes P patients with
      replacement and all their cases; the statistic is the mean per-case difference, the interval its
      percentile interval. Memory: draws x patients indices (80 MB at 1,000 patients).
    The test is a one-sample t-test of the per-patient mean differences against 0 (either way).

    Returns:
        n_groups, patient_delta (the interval's centre: the mean of the per-patient means for "t", the
        per-case mean for "bootstrap"), patient_ci_low, patient_ci_high, patient_ci_method, p_t_groups;
        NaN (method "") where
        every patient gives one case (the per-case figures are then the patient figures) or fewer than 2
        patients remain; p_t_groups NaN also when the per-patient differences are constant.
    """
    a, b, g = np.asarray(reference, dtype=float), np.asarray(other, dtype=float), np.asarray(groups)
    keep = ~(np.isnan(a) | np.isnan(b))
    patients, inverse = np.unique(g[keep], return_inverse=True)
    out = {
        "n_groups": len(patients),
        "patient_delta": np.nan,
        "patient_ci_low": np.nan,
        "patient_ci_high": np.nan,
        "patient_ci_method": "",
        "p_t_groups": np.nan,
    }
    if len(patients) < 2 or len(patients) == int(keep.sum()):
        return out
    sums = np.bincount(inverse, weights=(b - a)[keep])
    counts = np.bincount(inverse).astype(float)
    per_patient = sums / counts
    if len(patients) < MIN_BOOTSTRAP_PATIENTS:
        n = len(per_patient)
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * per_patient.std(ddof=1) / np.sqrt(n)
        low, high = per_patient.mean() - half, per_patient.mean() + half
        out.update(patient_ci_method="t", patient_delta=float(per_patient.mean()))
    else:
        picks = np.random.default_rng(seed).integers(0, len(patients), size=(draws, len(patients)))
        boot = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
        low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
        out.update(patient_ci_method="bootstrap", patient_delta=float(sums.sum() / counts.sum()))
    out.update(patient_ci_low=float(low), patient_ci_high=float(high))
    if np.ptp(per_patient) > 1e-12 * max(1.0, float(np.abs(per_patient).max())):
        out["p_t_groups"] = float(stats.ttest_1samp(per_patient, 0.0).pvalue)
    return out


def strict_mean(values: pd.Series) -> float:
    """The mean of `values` where any NaN makes it NaN: no value is skipped to make a mean look better
    (a groupby reduction's own `skipna` needs pandas 3; this works on 2.x too)."""
    return values.mean(skipna=False)


def strict_std(values: pd.Series) -> float:
    """The std (ddof=1) of `values`, NaN where any value is NaN (as `strict_mean`)."""
    return values.std(skipna=False)


def _trained_rows(per_case: pd.DataFrame, postprocess: str) -> pd.DataFrame:
    """The trained runs' rows (the ensembles, ENSEMBLE_RUNS, left out) with `postprocess` (all when absent)."""
    rows = per_case[~per_case["run"].isin(ENSEMBLE_RUNS)]
    if "postprocess" in rows:
        rows = rows[rows["postprocess"] == postprocess]
    return rows


def case_means(per_case: pd.DataFrame, postprocess: str = "post") -> pd.DataFrame:
    """Each test case's value averaged over the trained runs (the ensembles left out).

    Uses the rows with `postprocess == postprocess` (all rows when the column is absent). Every run
    counts: a NaN value makes the case's mean NaN (no run is skipped to make a case look better; the
    pipeline's own tables have none: see `medfusion.metrics`). Returns columns dataset, class,
    metric, model, case_id, value, and group where the table has it.
    """
    rows = _trained_rows(per_case, postprocess)
    keys = ["dataset", "class", "metric", "model", "case_id", *(["group"] if "group" in rows else [])]
    return rows.groupby(keys, as_index=False, sort=True)["value"].agg(strict_mean)


def run_means(per_case: pd.DataFrame, postprocess: str = "post") -> pd.DataFrame:
    """Each trained run's mean over its test cases (a NaN value makes the run's mean NaN, as in
    `case_means`). Columns dataset, class, metric, model, run, value."""
    rows = _trained_rows(per_case, postprocess)
    return rows.groupby(["dataset", "class", "metric", "model", "run"], as_index=False, sort=True)[
        "value"
    ].agg(strict_mean)


def penalised_counts(per_case: pd.DataFrame, postprocess: str = "post") -> pd.Series:
    """The number of penalised case x run pairs (HD95/ASSD = the case's diagonal: a missed or
    spurious structure) of the trained runs, per (dataset, class, model); empty where the table
    has no `penalised` rows (a table from before they were recorded)."""
    rows = _trained_rows(per_case, postprocess)
    rows = rows[rows["metric"] == PENALISED]
    return rows.groupby(["dataset", "class", "model"], sort=True)["value"].sum().astype(int)


def compare_models(
    per_case: pd.DataFrame,
    models: Sequence[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    postprocess: str = "post",
) -> pd.DataFrame:
    """The reference `models[0]` (CASNet) against every other entry of `models` present in the table.

    Args:
        per_case: the long per-case table (see the module docstring); with a `group` column (the
            patient of each case) the patient-level columns are filled where a patient has several cases.
        models: model entries, reference first; entries absent from a dataset are skipped.
        metrics: metrics compared, each its own Holm family per dataset and class.
        postprocess: which rows to compare ("post": post-processing chosen on validation).

    Returns:
        One row per dataset, class, metric and compared model, columns `COLUMNS`; rows follow the
        order of `models`. Empty (with the columns) when fewer than two models were run.
    """
    means = case_means(per_case[per_case["metric"].isin(metrics)], postprocess)
    penalised = penalised_counts(per_case, postprocess)

    def by_patient(group: pd.DataFrame, wide: pd.DataFrame):
        if "group" not in group:
            return None
        patients = group.groupby("case_id")["group"].first().reindex(wide.index).to_numpy()
        return lambda a, b: cluster_comparison(a, b, patients)

    out = pd.DataFrame(_families(means, "case_id", models, by_patient, penalised), columns=COLUMNS)
    out["n_cases"] = out["n_cases"].astype(int)
    return _in_model_order(out, models, metrics)


def compare_runs(
    per_case: pd.DataFrame,
    models: Sequence[str],
    metrics: Sequence[str] = ("dice",),
    postprocess: str = "post",
) -> pd.DataFrame:
    """Training variance: the reference `models[0]` against every other entry over runs.

    Each trained run's (fold x seed) mean over the test cases (`run_means`) is paired with the other
    entry's run of the same name, so both saw the same training fold and seed; paired t-test and
    Wilcoxon over those runs, Holm-corrected within dataset x class x metric, the mean difference
    with its t-based 95% CI. Returns columns `RUN_COLUMNS` (n_runs = pairs used).
    """
    means = run_means(per_case[per_case["metric"].isin(metrics)], postprocess)
    rows = _families(means, "run", models, penalised=penalised_counts(per_case, postprocess))
    for row in rows:
        row["n_runs"] = row.pop("n_cases")
    out = pd.DataFrame(rows, columns=RUN_COLUMNS)
    out["n_runs"] = out["n_runs"].astype(int)
    return _in_model_order(out, models, metrics)


def _families(
    means: pd.DataFrame, index: str, models: Sequence[str], extra=None, penalised: pd.Series | None = None
) -> list[dict]:
    """The reference models[0] against each other entry, per dataset x class x metric (a Holm
    family), paired over `index` (case_id or run); `extra(group, wide)` may return a function of the
    two paired vectors whose dict is added to each comparison; `penalised` (`penalised_counts`) fills
    the penalised columns of the distance metrics."""
    reference = models[0] if models else None
    rows = []
    for (dataset, cls, metric), group in means.groupby(["dataset", "class", "metric"], sort=True):
        wide = group.pivot(index=index, columns="model", values="value")  # (cases or runs, models)
        if reference not in wide:
            continue
        more = extra(group, wide) if extra else None
        family = []
        for other in [m for m in models[1:] if m in wide]:
            a, b = wide[reference].to_numpy(), wide[other].to_numpy()
            result = paired_comparison(a, b) | (more(a, b) if more else {})
            result |= _penalised(penalised, dataset, cls, metric, reference, other)
            family.append({"dataset": dataset, "class": cls, "metric": metric, "reference": reference,
                           "model": other, **result})  # fmt: skip
        rows += _holm_family(family)
    return rows


def _penalised(penalised: pd.Series | None, dataset, cls, metric, reference, other) -> dict[str, float]:
    """penalised_reference / penalised_model of one comparison: counts for HD95/ASSD, NaN otherwise
    (and where the table does not record them)."""
    out = {"penalised_reference": np.nan, "penalised_model": np.nan}
    if metric in DISTANCE_METRICS and penalised is not None and len(penalised):
        for key, model in (("penalised_reference", reference), ("penalised_model", other)):
            out[key] = float(penalised.get((dataset, cls, model), np.nan))
    return out


def _holm_family(family: list[dict]) -> list[dict]:
    """Holm-adjusted p_t and p_wilcoxon of one family of comparisons, in place."""
    for key in ("p_t", "p_wilcoxon"):
        for row, adjusted in zip(family, holm([r[key] for r in family]), strict=True):
            row[f"{key}_holm"] = float(adjusted)
    return family


def _in_model_order(out: pd.DataFrame, models: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(models)}
    metric_order = {m: i for i, m in enumerate(metrics)}
    out = out.sort_values(
        ["dataset", "class", "metric", "model"],
        key=lambda s: s.map(metric_order) if s.name == "metric" else s.map(order) if s.name == "model" else s,
        kind="stable",
    )
    return out.reset_index(drop=True)
