"""Statistics, tables, figures and claims on small fixed per-case tables with known answers."""

import io
import math
import socket

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats

from medfusion.claims import PAPER_DICE, claims_markdown
from medfusion.figures import learning_curves, metric_bars, qualitative_grid
from medfusion.report import (
    build_tables,
    global_dice_frame,
    metrics_json,
    mlflow_test_metrics,
    statistics_table,
    summarize_global,
    summarize_runs,
    table_csv,
)
from medfusion.stats import (
    COLUMNS,
    RUN_COLUMNS,
    cluster_comparison,
    compare_models,
    compare_runs,
    holm,
    paired_comparison,
)

COLS = ["dataset", "model", "run", "case_id", "class", "metric", "value", "postprocess"]
RUNS = ("fold0_seed0", "fold1_seed0")
MODELS = ["casnet", "casnet_wo_ca", "unet", "medt"]
ABLATIONS = {"casnet": {}, "casnet_wo_ca": {"use_attention": False}}
INFOS = {
    "kvasir_seg": {"distance_unit": "px", "image_size": 64, "kind": "image", "title": "Kvasir-SEG", "note": None},
    "lits17": {"distance_unit": "mm", "image_size": 64, "kind": "volume", "title": "LiTS17", "note": "30 test volumes"},
}  # fmt: skip

REF = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # per-case Dice of the reference, averaged over runs
GAP = {"casnet": 0.0, "casnet_wo_ca": np.array([0.1, 0.2, 0.15, 0.25, 0.05]), "unet": np.array([0.02, 0.01, 0.03, 0.04, 0.05]),
       "medt": np.array([0.3, 0.2, 0.25, 0.35, 0.1])}  # fmt: skip


def _rows(dataset, cls, model, metric, per_case, postprocess="post"):
    """Rows of two runs whose mean per case is `per_case` (+-0.01 around it), plus the ensemble run."""
    rows = []
    for run, noise in (*zip(RUNS, (0.01, -0.01), strict=True), ("ensemble", 0.0)):
        for i, v in enumerate(per_case):
            rows.append((dataset, model, run, f"c{i}", cls, metric, v + noise, postprocess))
    return rows


def fixed_table() -> pd.DataFrame:
    """kvasir_seg (polyp) and lits17 (liver, tumour): case means REF - GAP[model] for every metric
    (hd95 = 10 x (1 - dice)); "raw" rows are 0.1 lower and must never reach the statistics."""
    rows = []
    for dataset, classes in (("kvasir_seg", ["polyp"]), ("lits17", ["liver", "tumour"])):
        for cls in classes:
            for model in MODELS:
                dice = REF - GAP[model]
                for metric in ("dice", "iou", "precision", "recall"):
                    rows += _rows(dataset, cls, model, metric, dice)
                    rows += _rows(dataset, cls, model, metric, dice - 0.1, "raw")
                rows += _rows(dataset, cls, model, "hd95", 10 * (1 - dice))
                rows += _rows(dataset, cls, model, "assd", 3 * (1 - dice))
    return pd.DataFrame(rows, columns=COLS)


# --- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),  # step-down and monotone
        ([0.5, 0.6], [1.0, 1.0]),  # capped at 1
        ([0.02, math.nan, 0.01], [0.02, math.nan, 0.02]),  # NaN stays NaN and is not counted
        ([], []),
    ],
)
def test_holm_on_known_p_values(p, expected):
    np.testing.assert_allclose(holm(p), expected, equal_nan=True)


def test_paired_comparison_against_a_hand_computation():
    d = GAP["casnet_wo_ca"]  # mean 0.15, sd^2 = 0.025 / 4, so sem = sqrt(0.00125) and t = 3 sqrt(2)
    out = paired_comparison(REF, REF - d)  # the model is worse by d: Δ = model - reference < 0
    assert out["n_cases"] == 5 and out["n_missing"] == 0 and out["delta"] == pytest.approx(-0.15)
    assert out["t"] == pytest.approx(-3 * math.sqrt(2))
    half = 2.7764451051977934 * math.sqrt(0.00125)  # t(0.975, 4 df) x sem
    assert (out["delta_ci_low"], out["delta_ci_high"]) == pytest.approx((-0.15 - half, -0.15 + half))
    assert out["w"] == 0 and out["p_wilcoxon"] == pytest.approx(
        2 / 32
    )  # all 5 signs positive: exact 2 x 2^-5


def test_compare_models_matches_scipy_on_case_means():
    out = compare_models(fixed_table(), MODELS)
    assert list(out.columns) == COLUMNS
    assert len(out) == 3 * 3 * 3  # (polyp, liver, tumour) x (dice, iou, hd95) x three other models
    family = out[(out["dataset"] == "kvasir_seg") & (out["metric"] == "dice")]
    assert list(family["model"]) == MODELS[1:] and set(family["reference"]) == {"casnet"}
    p_t, p_w = [], []
    for model, row in zip(MODELS[1:], family.to_dict("records"), strict=True):
        other = REF - GAP[model]  # the "post" case means; the ensemble and "raw" rows are left out
        t = scipy_stats.ttest_rel(other, REF)  # of Δ's sign: model - reference
        w = scipy_stats.wilcoxon(other, REF)
        assert row["n_cases"] == 5
        assert row["mean_reference"] == pytest.approx(REF.mean()) and row["mean_model"] == pytest.approx(
            other.mean()
        )
        assert (row["t"], row["p_t"]) == pytest.approx((t.statistic, t.pvalue))
        assert (row["w"], row["p_wilcoxon"]) == pytest.approx((w.statistic, w.pvalue))
        p_t.append(t.pvalue)
        p_w.append(w.pvalue)
    np.testing.assert_allclose(family["p_t_holm"], holm(p_t))
    np.testing.assert_allclose(family["p_wilcoxon_holm"], holm(p_w))
    hd95 = out[(out["dataset"] == "kvasir_seg") & (out["metric"] == "hd95") & (out["model"] == "medt")].iloc[
        0
    ]
    assert hd95["delta"] == pytest.approx(10 * GAP["medt"].mean())  # lower is better: positive, MedT worse


def test_a_nan_run_makes_its_case_missing_never_a_better_mean():
    rows = []
    ref = [1.0, 2.0, math.nan, 4.0, 5.0]  # case c2 undefined in every run: dropped
    other = [1.5, 2.5, 3.0, 4.5, 5.0]
    rows += _rows("ds", "fg", "casnet", "hd95", ref)
    rows += _rows("ds", "fg", "unet", "hd95", other)
    rows += _rows("ds", "fg", "medt", "hd95", ref)  # identical to the reference: nothing to test
    table = pd.DataFrame(rows, columns=COLS)
    table.loc[
        (table["model"] == "unet") & (table["case_id"] == "c0") & (table["run"] == RUNS[0]), "value"
    ] = np.nan
    out = compare_models(table, ["casnet", "unet", "medt"], metrics=("hd95",)).set_index("model")
    # c0 is NaN in one run of unet: its mean is NaN (not the other run's value), left out and counted
    assert out.loc["unet", "n_cases"] == 3 and out.loc["unet", "n_missing"] == 2
    assert out.loc["unet", "mean_model"] == pytest.approx((2.5 + 4.5 + 5.0) / 3)
    assert out.loc["medt", "n_cases"] == 4 and out.loc["medt", "delta"] == 0
    assert math.isnan(out.loc["medt", "t"]) and math.isnan(out.loc["medt", "p_wilcoxon"])
    assert math.isnan(out.loc["medt", "p_t_holm"]) and math.isnan(out.loc["medt", "p_wilcoxon_holm"])
    assert out.loc["unet", "p_t_holm"] == pytest.approx(out.loc["unet", "p_t"])  # a family of one valid test
    assert compare_models(table, ["casnet"]).empty


def test_cluster_comparison_t_interval_below_ten_patients():
    # 3 patients with 2 eyes each: Δ = other - reference per patient (0.1, 0.3), (0.5, 0.2), (0.0, 0.1)
    diff = np.array([0.1, 0.3, 0.5, 0.2, 0.0, 0.1])
    groups = np.array(["p1", "p1", "p2", "p2", "p3", "p3"])
    out = cluster_comparison(np.zeros(6), diff, groups)
    per_patient = np.array([0.2, 0.35, 0.05])
    half = scipy_stats.t.ppf(0.975, 2) * per_patient.std(ddof=1) / math.sqrt(3)
    assert (
        out["n_groups"] == 3
        and out["patient_ci_method"] == "t"
        and out["patient_delta"] == pytest.approx(0.2)
    )
    assert (out["patient_ci_low"], out["patient_ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert out["p_t_groups"] == pytest.approx(scipy_stats.ttest_1samp(per_patient, 0).pvalue)
    # one case per patient: the per-case test is the patient test, nothing to add
    single = cluster_comparison(np.zeros(6), diff, np.array(list("abcdef")))
    assert (
        single["n_groups"] == 6 and math.isnan(single["patient_ci_low"]) and math.isnan(single["p_t_groups"])
    )


def test_cluster_comparison_bootstraps_patients_from_ten_on():
    rng = np.random.default_rng(3)
    diff = rng.normal(0.1, 0.05, 24)
    groups = np.repeat([f"p{i:02d}" for i in range(12)], 2)  # sorted as np.unique sorts
    out = cluster_comparison(np.zeros(24), diff, groups, draws=20_000)
    sums, counts = diff.reshape(12, 2).sum(1), np.full(12, 2.0)
    picks = np.random.default_rng(0).integers(0, 12, size=(20_000, 12))
    expected = np.quantile(sums[picks].sum(1) / counts[picks].sum(1), [0.025, 0.975])
    assert out["patient_ci_method"] == "bootstrap"
    assert (out["patient_ci_low"], out["patient_ci_high"]) == pytest.approx(tuple(expected))


def test_patient_interval_covers_at_four_patients():
    """CHASE_DB1's test set: 4 children x 2 eyes, true Δ 0. The bootstrap's 35 distinct resamples
    covered 0.79 of the time; the t-interval on per-patient means must reach the nominal level."""
    rng = np.random.default_rng(7)
    groups = np.repeat(["a", "b", "c", "d"], 2)
    covered, trials = 0, 1000
    for _ in range(trials):
        patient = np.repeat(rng.normal(0, 0.05, 4), 2)  # a child's effect shared by both eyes
        diff = patient + rng.normal(0, 0.02, 8)
        out = cluster_comparison(np.zeros(8), diff, groups)
        covered += out["patient_ci_low"] <= 0 <= out["patient_ci_high"]
    assert covered / trials >= 0.93


def test_compare_models_adds_patient_columns_from_the_group_column():
    table = fixed_table()
    table = table[table["dataset"] == "kvasir_seg"].copy()
    table["group"] = table["case_id"].map({"c0": "a", "c1": "a", "c2": "b", "c3": "b", "c4": "c"})
    out = compare_models(table, MODELS)
    assert list(out.columns) == COLUMNS
    row = out[(out["metric"] == "dice") & (out["model"] == "casnet_wo_ca")].iloc[0]
    d = GAP["casnet_wo_ca"]  # per-patient mean differences (0.15, 0.2, 0.05)
    assert row["n_groups"] == 3 and row["n_cases"] == 5
    assert row["p_t_groups"] == pytest.approx(scipy_stats.ttest_1samp([0.15, 0.2, 0.05], 0).pvalue)
    assert row["patient_ci_low"] <= -d.mean() <= row["patient_ci_high"] and row["patient_ci_method"] == "t"
    markdown = statistics_table(out, INFOS)[0]
    assert "| patients | Δ [95% CI], patients | p (t, patients) |" in markdown
    assert "patients as the unit" in markdown and "(t) |" in markdown  # 3 patients: the t-interval
    plain = statistics_table(compare_models(fixed_table(), MODELS), INFOS)[0]  # no group column
    assert "patients |" not in plain and "patients as the unit" not in plain


def test_compare_runs_pairs_the_same_fold_and_seed():
    table = fixed_table()
    # run means: fold0 = case mean + 0.01, fold1 = case mean - 0.01 for every model, so the
    # per-run differences are both REF.mean() - (REF - GAP).mean() = GAP.mean()
    shift = table["run"].eq("fold1_seed0") & table["model"].eq("unet")
    table.loc[shift, "value"] -= 0.02  # unet's second run is worse by 2 points
    out = compare_runs(table, MODELS)
    assert list(out.columns) == RUN_COLUMNS and set(out["metric"]) == {"dice"}
    row = out[(out["dataset"] == "kvasir_seg") & (out["model"] == "unet")].iloc[0]
    assert row["n_runs"] == 2
    gap = GAP["unet"].mean()
    assert row["delta"] == pytest.approx(-(gap + 0.01))  # differences -gap and -(gap + 0.02)
    t = scipy_stats.ttest_rel([REF.mean() + 0.01, REF.mean() - 0.01],
                              [REF.mean() + 0.01 - gap, REF.mean() - 0.03 - gap])  # fmt: skip
    assert row["p_t"] == pytest.approx(t.pvalue)
    family = out[(out["dataset"] == "kvasir_seg")]
    np.testing.assert_allclose(family["p_t_holm"], holm(family["p_t"]))
    markdown = statistics_table(compare_models(table, MODELS), INFOS, out)[0]
    assert "## Over runs" in markdown and "| polyp | Dice | unet | 2 |" in markdown


# --- tables --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_case() -> pd.DataFrame:
    return fixed_table()


@pytest.fixture(scope="module")
def tables(per_case):
    return build_tables(per_case, INFOS, MODELS, ABLATIONS, compare_models(per_case, MODELS))


def test_tables_1_and_2_list_casnet_first_with_ensemble_rows(tables):
    assert set(tables) == {"table1", "table2", "table3", "table4", "statistics"}
    md1, csv1 = tables["table1"]
    assert "Kvasir-SEG (`kvasir_seg`)" in md1 and "LiTS17" not in md1
    assert "one 2-D image, at 64x64 in-plane" in md1 and "over 2 runs" in md1 and "over 5 test cases" in md1
    assert "HD95 (px)" in md1 and "post-processed" in md1
    assert list(csv1["model"].unique()) == ["casnet", "unet", "medt"]  # CASNet first, no ablation entry
    assert list(csv1["estimate"]) == ["runs", "ensemble"] * 3
    casnet = csv1.iloc[0]
    assert casnet["dice_mean"] == pytest.approx(REF.mean())
    assert casnet["dice_std"] == pytest.approx(0.02 / math.sqrt(2))  # runs' means REF.mean() +- 0.01
    assert casnet["dice_raw_mean"] == pytest.approx(REF.mean() - 0.1) and casnet["runs"] == 2
    assert "| casnet | polyp | mean ± std over runs | 70.00 ± 1.41 |" in md1
    assert "| casnet | polyp | fold ensemble |" in md1
    md2, csv2 = tables["table2"]
    assert "mm" in md2 and "30 test volumes" in md2 and "volume rebuilt" in md2
    assert list(csv2.drop_duplicates("class")["class"]) == ["liver", "tumour"]
    assert csv2.groupby("class")["model"].first().eq("casnet").all()
    unet = csv2[(csv2["model"] == "unet") & (csv2["estimate"] == "runs")].iloc[0]
    assert unet["p_dice_t_holm"] == pytest.approx(
        holm([scipy_stats.ttest_rel(REF, REF - GAP[m]).pvalue for m in MODELS[1:]])[1]
    )


def test_tables_3_and_4_are_the_ablations_split_like_the_paper(tables):
    md3, csv3 = tables["table3"]
    md4, csv4 = tables["table4"]
    assert list(csv3["model"]) == ["casnet", "casnet_wo_ca"] and set(csv3["dataset"]) == {"kvasir_seg"}
    assert set(csv4["dataset"]) == {"lits17"} and len(csv4) == 4
    variant = csv3.iloc[1]
    assert variant["switched_off"] == "use_attention=False"
    assert variant["delta_dice"] == pytest.approx(-0.15)
    half = 2.7764451051977934 * math.sqrt(0.00125)
    assert (variant["delta_dice_ci_low"], variant["delta_dice_ci_high"]) == pytest.approx(
        (-0.15 - half, -0.15 + half)
    )
    assert "| casnet_wo_ca | use_attention=False | polyp |" in md3 and "-15.00 [" in md3
    assert "unet" not in md3 + md4


def test_statistics_table_and_csv_headers(tables):
    md, frame = tables["statistics"]
    assert len(frame) == 27 and "Holm" in md and "Wilcoxon" in md and "none dropped" in md
    assert "| polyp | HD95 (px) | medt | 5 |" in md
    for name, (_, frame) in tables.items():
        text = table_csv(frame)
        assert text.startswith("# ") and "##" not in text.split("\n")[0], name
        back = pd.read_csv(io.StringIO(text), comment="#")
        assert back.shape == frame.shape, name


def test_tables_say_when_nothing_was_run(per_case):
    only_kvasir = per_case[(per_case["dataset"] == "kvasir_seg") & per_case["model"].isin(["casnet", "unet"])]
    out = build_tables(
        only_kvasir,
        INFOS,
        ["casnet", "unet"],
        {"casnet": {}},
        compare_models(only_kvasir, ["casnet", "unet"]),
    )
    assert "No dataset of this table was run." in out["table2"][0] and out["table2"][1].empty
    assert "No ablation entry was run" in out["table3"][0] and out["table4"][1].empty


def test_global_dice_has_its_own_column_for_volumes_only(per_case):
    """lits17's tumour global Dice: casnet's runs 0.70 and 0.74 (mean 0.72 ± 0.0283), ensemble 0.75."""
    pooled = pd.concat(
        [
            global_dice_frame(
                "lits17",
                model,
                {
                    run: {"post": {"liver": 0.95, "tumour": v}, "raw": {"liver": 0.9, "tumour": v - 0.1}}
                    for run, v in zip((*RUNS, "ensemble"), (0.70 - gap, 0.74 - gap, 0.75 - gap), strict=True)
                },
            )  # fmt: skip
            for model, gap in (("casnet", 0.0), ("unet", 0.1), ("casnet_wo_ca", 0.2), ("medt", 0.3))
        ]
    )
    g = summarize_global(pooled).set_index(["model", "class", "estimate"])
    assert g.loc[("casnet", "tumour", "runs"), "mean"] == pytest.approx(0.72)
    assert g.loc[("casnet", "tumour", "runs"), "std"] == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert g.loc[("casnet", "tumour", "ensemble"), "mean"] == pytest.approx(0.75)
    out = build_tables(per_case, INFOS, MODELS, ABLATIONS, compare_models(per_case, MODELS), pooled)
    md2, csv2 = out["table2"]
    lits = md2.split("(`lits17`)")[1]
    assert "| Dice | Dice global | IoU |" in lits and "LiTS challenge's global Dice" in lits
    row = csv2[(csv2["model"] == "casnet") & (csv2["class"] == "tumour") & (csv2["estimate"] == "runs")].iloc[
        0
    ]
    assert row["dice_global_mean"] == pytest.approx(0.72)
    assert "| casnet | tumour | mean ± std over runs | 70.00 ± 1.41 | 72.00 ± 2.83 |" in lits
    assert "Dice global" not in out["table1"][0]  # Kvasir-SEG: per image only
    md4, csv4 = out["table4"]
    assert "Dice global" in md4
    assert csv4.set_index(["model", "class"]).loc[
        ("casnet_wo_ca", "tumour"), "dice_global_mean"
    ] == pytest.approx(0.52)


def test_mlflow_test_metrics_carry_the_global_dice(per_case):
    mine = per_case[(per_case["dataset"] == "lits17") & (per_case["model"] == "casnet")]
    pooled = global_dice_frame(
        "lits17", "casnet", {"fold0_seed0": {"post": {"tumour": 0.7}}, "fold1_seed0": {"post": {"tumour": 0.74}},
                             "ensemble": {"post": {"tumour": 0.75}}},
    )  # fmt: skip
    runs = [{"fold": 0, "seed": 0, "mlflow_run_id": "a"}, {"fold": 1, "seed": 0, "mlflow_run_id": "b"}]
    children, parent = mlflow_test_metrics(mine, summarize_runs(mine), runs, pooled)
    assert children["a"]["test_global_dice_tumour"] == pytest.approx(0.7)
    assert children["b"]["test_global_dice_tumour"] == pytest.approx(0.74)
    assert parent["test_global_dice_tumour"] == pytest.approx(0.72)
    assert parent["test_ensemble_global_dice_tumour"] == pytest.approx(0.75)
    assert children["a"]["test_dice_tumour"] == pytest.approx(np.mean(REF + 0.01))


def test_metrics_json_is_small_and_post_processed(per_case):
    out = metrics_json(summarize_runs(per_case))
    assert set(out) == {"kvasir_seg", "lits17"} and set(out["lits17"]["casnet"]) == {"liver", "tumour"}
    assert set(out["kvasir_seg"]["casnet"]["polyp"]) == {"dice", "iou", "hd95"}
    assert out["kvasir_seg"]["casnet"]["polyp"]["dice"] == pytest.approx(REF.mean())


# --- figures -------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("figures must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
        return image.size


def test_figures_write_deterministic_pngs(tmp_path, per_case, no_network):
    summary = summarize_runs(per_case)
    bars = metric_bars(summary, "lits17", MODELS, tmp_path / "bars.png")
    w, h = _png_size(bars)
    assert 500 <= w <= 3000 and 500 <= h <= 3000  # two class panels
    rng = np.random.default_rng(0)
    target = np.zeros((32, 32), dtype=np.uint8)
    target[8:20, 8:20], target[10:14, 10:14] = 1, 2
    cases = [
        {"case_id": "c0", "image": rng.integers(0, 255, (3, 32, 32), dtype=np.uint8), "target": target,
         "preds": {m: np.roll(target, k, axis=0) for k, m in enumerate(MODELS)}},
        {"case_id": "c1", "image": rng.normal(size=(1, 32, 32)).astype(np.float32), "target": np.zeros_like(target),
         "preds": {"casnet": target}},  # z-scored grey image, empty truth, a model missing
    ]  # fmt: skip
    grid = qualitative_grid(cases, MODELS, tmp_path / "qualitative.png")
    w, h = _png_size(grid)
    assert w > h > 200  # 2 rows x 6 columns
    histories = {m: [[{"epoch": e, "train_loss": 1 / (e + 1) + r / 50, "val_loss": 1.2 / (e + 1), "val_dice": e / 10}
                      for e in range(8 - r)] for r in range(3)] for m in MODELS[:2]}  # fmt: skip
    curves = learning_curves(histories, tmp_path / "curves.png", title="fixed")
    assert _png_size(curves) == (1000, 380)
    first = {p: p.read_bytes() for p in (bars, grid, curves)}
    metric_bars(summary, "lits17", MODELS, bars)
    qualitative_grid(cases, MODELS, grid)
    learning_curves(histories, curves, title="fixed")
    assert all(p.read_bytes() == b for p, b in first.items())  # same inputs, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bars.png",
        "curves.png",
        "qualitative.png",
    ]  # no temp files


# --- claims --------------------------------------------------------------------------------------


def test_claims_list_every_claim_beside_ours(tmp_path, per_case):
    pd.DataFrame(
        [{"model": "casnet", "architecture": "casnet", "parameters": 1, "gflops": 1.0, "ms_per_image": 121.8}]
    ).to_csv(tmp_path / "efficiency.csv", index=False)
    bench = {"model": "casnet", "architecture": "casnet", "parameters_m": 14.2, "ms_per_image_b1": 8.99,
             "ms_per_image_b16": 0.96, "peak_infer_gb_b16": 0.97, "train_ms_per_step_b16": 62.9, "peak_train_gb_b16": 2.8}  # fmt: skip
    pd.DataFrame([bench]).to_csv(tmp_path / "device_bench.csv", index=False)
    synthetic = per_case[per_case["dataset"] == "kvasir_seg"].assign(dataset="synthetic")
    table = pd.concat([per_case, synthetic])
    infos = {**INFOS, "synthetic": {**INFOS["kvasir_seg"], "title": "synthetic"}}
    md = claims_markdown(
        table,
        compare_models(table, MODELS),
        infos,
        pd.read_csv(tmp_path / "efficiency.csv"),
        pd.read_csv(tmp_path / "device_bench.csv"),
    )
    for claim in PAPER_DICE:
        assert f"| {claim.title} Dice (%) | {claim.dice:.2f} |" in md
    assert (
        "| PROMISE12 Dice (%) | 92.10 | not run |" in md and "| CHASE_DB1 Dice (%) | 92.67 | not run |" in md
    )
    assert "| Kvasir-SEG Dice (%) | 93.45 | polyp: 70.00 ± 1.41 (fold ensemble 70.00)" in md
    assert "liver:" in md and "tumour:" in md and "64x64" in md
    assert "CASNet vs MedT on `kvasir_seg`" in md and "CASNet better than every baseline on `lits17`" in md
    assert "removing contextual attention" in md and "removing boundary refinement" in md
    assert "not run (`casnet_wo_hfe` is not in this run)" in md
    assert "121.8 ms" in md and "8.99 ms" in md and "| 35 ms (RTX 3090) |" in md
    assert "| 7.8 GB (RTX 3090) |" in md and "2.80 GB" in md
    assert "Dice (%) on `synthetic`" in md and "no comparison with the paper is meaningful" in md
    without = claims_markdown(per_case, compare_models(per_case, MODELS), INFOS, None, None)
    assert "| not measured |" in without and "not measured (no GPU benchmark)" in without


def test_a_custom_dataset_standing_in_for_a_paper_dataset_is_listed_beside_its_number(per_case):
    liver = per_case[per_case["dataset"] == "kvasir_seg"].assign(dataset="custom")
    table = pd.concat([per_case[per_case["dataset"] == "kvasir_seg"], liver])
    title = "Liver CT 2-D slices: a stand-in for LiTS17"
    infos = {
        "kvasir_seg": INFOS["kvasir_seg"],
        "custom": {**INFOS["kvasir_seg"], "title": title, "stands_for": "lits17"},
    }
    md = claims_markdown(table, compare_models(table, MODELS), infos)
    assert "| LiTS17 Dice (%) | 91.56 | not run |" in md  # the paper's own dataset was not run
    row = next(line for line in md.splitlines() if line.startswith("| LiTS17 Dice (%) via `custom`"))
    assert (
        "polyp: 70.00 ± 1.41" in row
        and f"no: a stand-in ({title.replace('|', '/')}), not LiTS17 itself" in row
    )
    assert "Dice (%) on `custom`" not in md  # listed once, beside the number it stands in for
    assert "partly: the same test on a stand-in for `lits17`" in md
    plain = claims_markdown(table, compare_models(table, MODELS), {**infos, "custom": INFOS["kvasir_seg"]})
    assert "Dice (%) on `custom`" in plain and "via `custom`" not in plain
    tables = build_tables(table, infos, MODELS, ABLATIONS, compare_models(table, MODELS))
    assert "(`custom`)" in tables["table2"][0] and "(`custom`)" not in tables["table1"][0]  # beside LiTS17
    assert "(`custom`)" in tables["table4"][0] and "(`kvasir_seg`)" in tables["table1"][0]


def test_the_second_observer_is_the_human_reference_row_of_its_dataset(per_case):
    """Second observer on lits17's liver: per-image Dice 0.6, 0.8 (mean 0.7 ± 0.1414 over images)."""
    rows = [
        {"dataset": "lits17", "model": "second_observer", "run": "second_observer", "case_id": c, "class": "liver",
         "metric": m, "value": v, "postprocess": "none", "resolution": "original", "group": c}
        for c, dice in (("v0", 0.6), ("v1", 0.8))
        for m, v in (("dice", dice), ("iou", dice / (2 - dice)), ("precision", 0.7), ("recall", 0.7),
                     ("hd95", 3.0 if c == "v0" else 50.0), ("assd", 1.0), ("penalised", float(c == "v1")))
    ]  # fmt: skip
    observers = pd.DataFrame(rows)
    out = build_tables(
        per_case, INFOS, MODELS, ABLATIONS, compare_models(per_case, MODELS), None, None, observers
    )
    md2, csv2 = out["table2"]
    human = csv2[csv2["model"] == "second_observer"]
    assert len(human) == 1 and human.iloc[0]["class"] == "liver" and human.iloc[0]["estimate"] == "human"
    assert human.iloc[0]["dice_mean"] == pytest.approx(0.7)
    assert human.iloc[0]["dice_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert human.iloc[0]["penalised"] == 1 and human.iloc[0]["cases"] == 2
    assert human.iloc[0]["hd95_mean"] == pytest.approx(26.5)  # the penalised image counts, with its diagonal
    assert "| second_observer | liver | over test images (human reference) | 70.00 ± 14.14 |" in md2
    assert "the human reference" in md2.split("(`lits17`)")[1]
    assert "second_observer" not in out["table1"][0]  # kvasir_seg has no second observer
    # the liver rows of the models come first; the human row closes the class
    liver = csv2[csv2["class"] == "liver"]
    assert liver.iloc[-1]["model"] == "second_observer"


def test_the_tta_ensemble_is_its_own_row_and_never_a_run(per_case):
    """eval.tta flip adds run "ensemble_tta": a row 'fold ensemble + flip TTA' after the fold ensemble,
    summarised as one value, and left out of every statistic as the ensemble is."""
    ens = per_case[per_case["run"] == "ensemble"]
    with_tta = pd.concat([per_case, ens.assign(run="ensemble_tta", value=ens["value"] + 0.005)])
    summary = summarize_runs(with_tta)
    tta = summary[(summary["estimate"] == "ensemble_tta") & (summary["metric"] == "dice")]
    assert len(tta) == 3 * len(MODELS) and tta["std"].isna().all() and (tta["runs"] == 1).all()
    casnet = tta[(tta["model"] == "casnet") & (tta["class"] == "polyp")].iloc[0]
    assert casnet["mean"] == pytest.approx(REF.mean() + 0.005)
    md1, csv1 = build_tables(with_tta, INFOS, MODELS, ABLATIONS, compare_models(with_tta, MODELS))["table1"]
    assert list(csv1["estimate"]) == ["runs", "ensemble", "ensemble_tta"] * 3
    assert "fold ensemble + flip TTA" in md1
    pd.testing.assert_frame_equal(compare_models(with_tta, MODELS), compare_models(per_case, MODELS))


def test_the_evaluate_stage_metrics_are_the_tables_numbers(per_case):
    """data/metrics/<dataset>/<model>.json (DVC metrics of each evaluate stage): Dice and IoU per class,
    runs post and raw, and the ensemble's, the values of summarize_runs."""
    from medfusion.report import stage_metrics

    one = per_case[(per_case["dataset"] == "kvasir_seg") & (per_case["model"] == "unet")]
    out = stage_metrics(one)
    assert set(out) == {"dice", "iou"} and set(out["dice"]) == {"polyp"}
    dice = out["dice"]["polyp"]
    assert set(dice) == {"post", "raw", "ensemble", "ensemble_raw"}
    expected = (REF - GAP["unet"]).mean()
    assert dice["post"] == pytest.approx(expected, abs=1e-6)
    assert dice["raw"] == pytest.approx(expected - 0.1, abs=1e-6)  # raw rows are 0.1 lower
    assert dice["ensemble"] == pytest.approx(expected, abs=1e-6)
