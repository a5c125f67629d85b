"""Paired statistics on the long per-case table.

Per dataset and class: each test case's Dice averaged over runs (folds x seeds), then the first
model of `models` against each other one with a paired t-test (scipy.stats.ttest_rel, the paper's
test), on the cases both models have.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def paired_tests(per_case: pd.DataFrame, models: list[str], metric: str = "dice") -> pd.DataFrame:
    """Rows: dataset, class, reference, model, n_cases, mean_reference, mean_model, mean_diff, t, p_value.

    mean_diff = reference - model. p_value is NaN when fewer than 2 cases are shared or all differences
    are equal (the t statistic is undefined).
    """
    table = per_case[per_case["metric"] == metric]
    case_means = table.groupby(["dataset", "class", "model", "case_id"], as_index=False)["value"].mean()
    rows = []
    reference = models[0]
    for (dataset, cls), group in case_means.groupby(["dataset", "class"]):
        wide = group.pivot(index="case_id", columns="model", values="value")
        if reference not in wide:
            continue
        for other in [m for m in models[1:] if m in wide]:
            pair = wide[[reference, other]].dropna()
            a, b = pair[reference].to_numpy(), pair[other].to_numpy()
            t, p = (np.nan, np.nan)
            if len(pair) >= 2 and np.ptp(a - b) > 0:
                t, p = stats.ttest_rel(a, b)
            rows.append(
                {
                    "dataset": dataset,
                    "class": cls,
                    "metric": metric,
                    "reference": reference,
                    "model": other,
                    "n_cases": len(pair),
                    "mean_reference": float(a.mean()) if len(a) else np.nan,
                    "mean_model": float(b.mean()) if len(b) else np.nan,
                    "mean_diff": float((a - b).mean()) if len(a) else np.nan,
                    "t": float(t),
                    "p_value": float(p),
                }
            )
    columns = ["dataset", "class", "metric", "reference", "model", "n_cases", "mean_reference", "mean_model",
               "mean_diff", "t", "p_value"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
