import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from medfusion.data.splits import SplitError, make_split
from medfusion.stats import paired_tests


def _groups(n_patients: int, per_patient: int) -> dict[str, str]:
    return {f"p{p:02d}_{i}": f"p{p:02d}" for p in range(n_patients) for i in range(per_patient)}


def test_split_is_complete_disjoint_grouped_and_deterministic():
    groups = _groups(20, 3)
    split = make_split(groups, "fraction", 5, seed=7, test_fraction=0.2)
    assert split == make_split(groups, "fraction", 5, seed=7, test_fraction=0.2)
    assert split != make_split(groups, "fraction", 5, seed=8, test_fraction=0.2)
    test = set(split["test"])
    assert len({groups[c] for c in test}) == 4  # 20% of 20 patients
    vals = [set(f["val"]) for f in split["folds"]]
    assert set().union(*vals) | test == set(groups)  # complete
    assert sum(len(v) for v in vals) + len(test) == len(groups)  # disjoint
    for fold in split["folds"]:
        assert not set(fold["train"]) & set(fold["val"]) and not set(fold["train"]) & test
        # a patient is never on both sides
        assert not {groups[c] for c in fold["train"]} & {groups[c] for c in fold["val"]}
    assert max(map(len, vals)) - min(map(len, vals)) <= 3  # balanced to within one patient


def test_chase_rule_holds_out_the_last_children():
    groups = {f"Image_{k:02d}{e}": f"{k:02d}" for k in range(1, 15) for e in "LR"}
    split = make_split(groups, "last:4", 5, seed=0, test_fraction=0.2)
    assert split["test"] == [f"Image_{k:02d}{e}" for k in range(11, 15) for e in "LR"]  # the last 8 images


def test_split_errors_are_clear():
    with pytest.raises(SplitError, match="cannot make 5 folds"):
        make_split(_groups(5, 1), "fraction", 5, 0, 0.2)
    with pytest.raises(SplitError, match="needs more than 30 patient groups"):
        make_split(_groups(10, 1), "count:30", 2, 0, 0.2)


def test_paired_t_test_matches_scipy_on_case_means():
    rng = np.random.default_rng(0)
    rows = []
    a = rng.uniform(0.7, 0.9, 12)
    for model, base in (("unet", a), ("other", a - 0.05 + rng.normal(0, 0.02, 12))):
        for run in ("fold0_seed0", "fold1_seed0"):
            for i, v in enumerate(base):
                noise = 0.01 if run == "fold0_seed0" else -0.01  # averages out over runs
                rows.append(("ds", model, run, f"c{i}", "fg", "dice", v + noise))
    table = pd.DataFrame(rows, columns=["dataset", "model", "run", "case_id", "class", "metric", "value"])
    out = paired_tests(table, ["unet", "other"])
    assert len(out) == 1
    row = out.iloc[0]
    b = table[(table.model == "other")].groupby("case_id")["value"].mean().sort_index().to_numpy()
    ref = table[(table.model == "unet")].groupby("case_id")["value"].mean().sort_index().to_numpy()
    expected = scipy_stats.ttest_rel(ref, b)
    assert row["n_cases"] == 12
    assert row["t"] == pytest.approx(expected.statistic) and row["p_value"] == pytest.approx(expected.pvalue)
    assert row["mean_diff"] == pytest.approx(0.05, abs=0.02) and row["p_value"] < 0.01


def test_single_model_has_no_comparison():
    table = pd.DataFrame(
        [("ds", "unet", "r", "c0", "fg", "dice", 0.5)],
        columns=["dataset", "model", "run", "case_id", "class", "metric", "value"],
    )
    assert paired_tests(table, ["unet"]).empty


def test_ablation_table_lists_variants_with_delta_and_p():
    from medfusion.report import ablation_table

    summary = pd.DataFrame(
        [("ds", m, "fg", metric, mean, 0.01, 2, 10)
         for m, mean in (("casnet", 0.8), ("casnet_wo_ca", 0.7), ("unet", 0.6)) for metric in ("dice", "iou")],
        columns=["dataset", "model", "class", "metric", "mean", "std", "runs", "cases"],
    )  # fmt: skip
    tests = pd.DataFrame(
        [("ds", "fg", "dice", "casnet", "casnet_wo_ca", 10, 0.8, 0.7, 0.1, 3.0, 0.004)],
        columns=["dataset", "class", "metric", "reference", "model", "n_cases", "mean_reference", "mean_model",
                 "mean_diff", "t", "p_value"],
    )  # fmt: skip
    table = ablation_table(
        summary, tests, ["casnet", "casnet_wo_ca"], {"casnet": {}, "casnet_wo_ca": {"use_attention": False}}
    )
    assert "| ds | fg | casnet | (full model) | 80.00 ± 1.00 | 80.00 ± 1.00 | - | - |" in table
    assert (
        "| ds | fg | casnet_wo_ca | use_attention=False | 70.00 ± 1.00 | 70.00 ± 1.00 | -10.00 | 0.004 |"
        in table
    )
    assert "unet" not in table.split("|---|")[-1]
    assert "No CASNet entry was run" in ablation_table(summary, tests, [], {})
