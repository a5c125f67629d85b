"""METHOD.md section 3, "Rules for the hard cases": missed structures, tumour-free volumes and one
direction for every Δ, from the metrics through the statistics to every table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medfusion.claims import claims_markdown
from medfusion.generalisation import generalisation_table
from medfusion.metrics import diagonal, region_metrics
from medfusion.report import build_tables, summarize_runs
from medfusion.stats import compare_models

RUNS = [f"fold{f}_seed{s}" for f in range(5) for s in range(3)]  # 15 runs
SIDE = 64


def _square(y: int, x: int, r: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[y - r : y + r, x - r : x + r] = 1
    return mask


def _case_rows(dataset, model, run, case_id, pred, target, regions, spacing=None) -> list[dict]:
    """Per-case rows exactly as evaluation writes them (region_metrics; counts left out)."""
    rows = []
    for region, values in region_metrics(pred, target, regions, spacing).items():
        rows += [
            {"dataset": dataset, "model": model, "run": run, "case_id": case_id, "class": region,
             "metric": k, "value": v, "postprocess": "post"}
            for k, v in values.items() if k not in ("tp", "fp", "fn")
        ]  # fmt: skip
    return rows


def _missed_table() -> pd.DataFrame:
    """4 cases x 15 runs. Three easy cases both models segment exactly. The hard one: CASNet finds it in
    every run with a shifted square (HD95 > 0); U-Net misses it in 14 runs and is exact in one."""
    rows = []
    truth = {f"c{i}": _square(20 + 5 * i, 30, 6) for i in range(3)} | {"hard": _square(40, 40, 3)}
    for run in RUNS:
        for case_id, target in truth.items():
            casnet = _square(42, 42, 3) if case_id == "hard" else target
            unet = target if case_id != "hard" or run == RUNS[0] else np.zeros_like(target)
            for model, pred in (("casnet", casnet), ("unet", unet)):
                rows += _case_rows("kvasir_seg", model, run, case_id, pred, target, {"polyp": [1]})
    return pd.DataFrame(rows)


def test_one_empty_mask_scores_the_diagonal_in_mm_or_pixels():
    target = _square(40, 40, 3)
    empty = np.zeros_like(target)
    assert diagonal((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.01)  # BraTS
    for pred, truth in ((empty, target), (target, empty)):  # missed, spurious
        m = region_metrics(pred, truth, {"fg": [1]})["fg"]
        assert m["hd95"] == m["assd"] == pytest.approx(SIDE * math.sqrt(2)) and m["penalised"] == 1
        mm = region_metrics(pred[None], truth[None], {"fg": [1]}, (2.0, 0.5, 0.25))["fg"]
        assert mm["hd95"] == pytest.approx(math.sqrt(2.0**2 + 32.0**2 + 16.0**2))
    both = region_metrics(empty, empty, {"fg": [1]})["fg"]
    assert both["hd95"] == both["assd"] == 0 and both["penalised"] == 0 and both["present"] == 0
    hit = region_metrics(target, target, {"fg": [1]})["fg"]
    assert hit["penalised"] == 0 and hit["present"] == 1 and not any(math.isnan(v) for v in hit.values())


def test_a_model_that_misses_ranks_worse_with_the_penalty_in_its_mean():
    table = _missed_table()
    summary = summarize_runs(table).set_index(["model", "metric", "estimate"])
    casnet, unet = summary.loc[("casnet", "hd95", "runs")], summary.loc[("unet", "hd95", "runs")]
    worst = SIDE * math.sqrt(2)
    assert unet["mean"] == pytest.approx(14 / 15 * worst / 4)  # 14 penalties, one exact run
    assert unet["mean"] > casnet["mean"] > 0
    assert (unet["penalised"], casnet["penalised"], unet["missing"]) == (14, 0, 0)
    stats = compare_models(table, ["casnet", "unet"], metrics=("dice", "hd95"))
    hd95 = stats[stats["metric"] == "hd95"].iloc[0]
    assert hd95["n_cases"] == 4 and hd95["delta"] > 0  # U-Net's distances are larger: worse
    assert (hd95["penalised_reference"], hd95["penalised_model"]) == (0, 14)
    tables = build_tables(table, {}, ["casnet", "unet"], {"casnet": {}}, stats)
    md1, csv1 = tables["table1"]
    row = csv1[(csv1["model"] == "unet") & (csv1["estimate"] == "runs")].iloc[0]
    assert row["penalised"] == 14 and "| 14/60 |" in md1 and "| 0/60 |" in md1
    assert "| penalised |" in md1 and "diagonal" in md1
    assert "| 0 / 14 |" in tables["statistics"][0]


def _tumour_free_table() -> pd.DataFrame:
    """LiTS-like volumes (2 slices): 4 with a tumour, 2 tumour-free. CASNet finds every tumour
    half-way (Dice 2/3) and predicts nothing where there is none (Dice 1); U-Net is worse on tumours."""
    rows = []
    regions = {"liver": [1, 2], "tumour": [2]}
    for run in RUNS[:2]:
        for i in range(6):
            target = np.zeros((2, SIDE, SIDE), np.uint8)
            target[:, 10:50, 10:50] = 1
            if i < 4:
                target[:, 20:30, 20:30] = 2
            for model, width in (("casnet", 5), ("unet", 2)):  # the tumour voxels found: rows 20..20+width
                pred = np.where(target > 0, 1, 0).astype(np.uint8)
                if i < 4:
                    pred[:, 20 : 20 + width, 20:30] = 2
                rows += _case_rows("lits17", model, run, f"v{i}", pred, target, regions, (2.0, 1.0, 1.0))
    return pd.DataFrame(rows)


def test_tumour_free_volumes_are_counted_and_the_mean_over_tumour_volumes_given():
    table = _tumour_free_table()
    infos = {"lits17": {"distance_unit": "mm", "kind": "volume", "title": "LiTS17", "image_size": SIDE}}
    stats = compare_models(table, ["casnet", "unet"])
    md2, csv2 = build_tables(table, infos, ["casnet", "unet"], {"casnet": {}}, stats)["table2"]
    casnet = csv2[(csv2["model"] == "casnet") & (csv2["class"] == "tumour") & (csv2["estimate"] == "runs")]
    tumour_dice = 2 * 50 / (50 + 100)  # 5 of 10 rows found
    assert casnet.iloc[0]["absent"] == 2
    assert casnet.iloc[0]["dice_mean"] == pytest.approx((4 * tumour_dice + 2 * 1.0) / 6)
    assert casnet.iloc[0]["dice_present_mean"] == pytest.approx(tumour_dice)
    assert "tumour: 2 of 6 test volumes have none" in md2 and "| Dice (with it) |" in md2
    assert "the LiTS challenge's per-case score" in md2
    liver = csv2[(csv2["class"] == "liver") & (csv2["estimate"] == "runs")]
    assert liver["dice_present_mean"].isna().all()  # every volume has a liver: nothing to add
    claims = claims_markdown(table, stats, infos)
    assert "2 of 6 test cases without it" in claims


def test_a_worse_entry_gets_a_negative_delta_in_every_table():
    table = _tumour_free_table()
    infos = {"lits17": {"distance_unit": "mm", "kind": "volume", "title": "LiTS17", "image_size": SIDE}}
    models = ["casnet", "unet"]
    stats = compare_models(table, models)
    dice = stats[(stats["metric"] == "dice") & (stats["class"] == "tumour")].iloc[0]
    assert dice["delta"] < 0 and dice["delta_ci_high"] <= 0 and dice["t"] < 0
    statistics = build_tables(table, infos, models, {"casnet": {}}, stats)["statistics"][0]
    tumour_line = next(line for line in statistics.splitlines() if "| tumour | Dice (%) | unet |" in line)
    assert f"| {100 * dice['delta']:+.2f} [" in tumour_line and "| -" in tumour_line
    # the ablation table: U-Net standing in as a variant of CASNet
    md4 = build_tables(table, infos, models, {"casnet": {}, "unet": {"x": 1}}, stats)["table4"][0]
    assert f"| {100 * dice['delta']:+.2f} [" in md4
    # the generalisation table (transfer): the same rows read as a transfer target
    result = {"trained_on": "kvasir_seg", "target": "lits17", "stats": stats, "info": {},
              "entries": {m: table[table["model"] == m] for m in models}}  # fmt: skip
    markdown, frame = generalisation_table([result], models)
    unet = frame[(frame["model"] == "unet") & (frame["class"] == "tumour")].iloc[0]
    assert unet["delta"] == pytest.approx(dice["delta"]) and unet["delta"] < 0
    assert f"| {100 * dice['delta']:+.2f} [" in markdown


# --- nested regions with thresholds (LiTS liver and tumour) ----------------------------------------


def _weak_false_tumour() -> tuple[np.ndarray, np.ndarray]:
    """A validation volume (1 slice): liver with a real tumour (p_tumour 0.85) and, in healthy liver, a
    weak false tumour (p = 0.05, 0.40, 0.55: argmax says tumour)."""
    target = np.zeros((1, 40, 40), np.uint8)
    target[0, 8:32, 8:32] = 1
    target[0, 10:15, 10:15] = 2
    probs = np.empty((3, 1, 40, 40))
    probs[:] = np.array([0.9, 0.05, 0.05])[:, None, None, None]
    probs[:, target > 0] = np.array([0.05, 0.9, 0.05])[:, None]
    probs[:, target == 2] = np.array([0.05, 0.1, 0.85])[:, None]
    false = np.zeros_like(target, bool)
    false[0, 22:30, 22:30] = True
    probs[:, false] = np.array([0.05, 0.40, 0.55])[:, None]
    return probs, target


def test_a_rejected_tumour_falls_back_to_liver_and_thresholds_are_chosen_on_scored_regions():
    from medfusion.data.registry import DATASETS
    from medfusion.postprocess import Selector, apply, nesting

    regions = DATASETS["lits17"].scored_regions()
    parents = nesting(regions, 3)
    assert parents == (0, 1)
    probs, target = _weak_false_tumour()
    selector = Selector(3, parents=parents)
    selector.add(probs, target)
    chosen = selector.result().postprocess
    assert chosen.thresholds == (None, 0.6) and chosen.parents == (0, 1)
    labels = apply(chosen, probs, target.shape)
    scored = region_metrics(labels, target, regions, distances=False)
    assert scored["liver"]["dice"] == 1.0 and scored["tumour"]["dice"] == 1.0
    assert np.array_equal(labels, target)


def test_nested_rule_is_the_argmax_without_thresholds_and_thresholds_the_region():
    from medfusion.resample import apply_thresholds

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(30, 30)).transpose(2, 0, 1)
    for thresholds in (None, (None, None)):
        assert np.array_equal(apply_thresholds(probs, thresholds, (0, 1)), probs.argmax(0))
    # a liver threshold applies to p(liver region) = p1 + p2: a voxel (0.45, 0.3, 0.25) is liver at 0.5
    voxel = np.array([0.45, 0.3, 0.25])[:, None, None]
    assert apply_thresholds(voxel, (0.5, None), (0, 1))[0, 0] == 1
    assert apply_thresholds(voxel, (0.6, None), (0, 1))[0, 0] == 0
    # a tumour rejected by its threshold where background dominates the liver region stays background
    weak = np.array([0.6, 0.1, 0.3])[:, None, None]
    assert apply_thresholds(weak, (None, 0.5), (0, 1))[0, 0] == 0


# --- post-processing: sizes relative to the image, the largest component ------------------------------


def _blob_cases(spurious: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """200 x 200 images: a 60 x 60 target found exactly plus a spurious square of side `spurious`."""
    preds, targets = [], []
    for shift in (0, 5):
        target = np.zeros((200, 200), np.uint8)
        target[20 + shift : 80 + shift, 20:80] = 1
        pred = target.copy()
        pred[140 : 140 + spurious, 140 : 140 + spurious] = 1
        preds.append(pred)
        targets.append(target)
    return preds, targets


def test_relative_component_sizes_and_the_largest_component_are_candidates():
    from medfusion.postprocess import PostProcess, apply, choose_binary

    # 25 x 25 = 625 px: above every absolute size (500 px); 2% of the image (800 px) removes it
    preds, targets = _blob_cases(25)
    chosen = choose_binary(preds, targets).postprocess
    assert chosen == PostProcess(min_fraction=0.02) and chosen.size_for(200 * 200) == 800
    assert all(np.array_equal(apply(chosen, _onehot(p)), t) for p, t in zip(preds, targets, strict=True))
    # 32 x 32 = 1024 px: above 2% too; keeping the largest component removes it
    preds, targets = _blob_cases(32)
    selection = choose_binary(preds, targets)
    assert selection.postprocess == PostProcess(largest=True) and selection.dice_after == 1.0
    assert all(
        np.array_equal(apply(selection.postprocess, _onehot(p)), t)
        for p, t in zip(preds, targets, strict=True)
    )


def _onehot(mask: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - mask, mask.astype(float)])


def test_a_table_without_the_indicator_rows_shows_unknown_not_zero_penalised():
    """A per-case table written before the `penalised` rows existed: the count is unknown ('-'), not 0."""
    table = _missed_table()
    table = table[~table["metric"].isin(["penalised", "present"])]
    summary = summarize_runs(table)
    assert summary.loc[summary["metric"] == "hd95", "penalised"].isna().all()
    stats = compare_models(table, ["casnet", "unet"], metrics=("hd95",))
    md1 = build_tables(table, {}, ["casnet", "unet"], {"casnet": {}}, stats)["table1"][0]
    unet = next(line for line in md1.splitlines() if line.startswith("| unet | polyp | mean"))
    assert "/60" not in unet and "| - |" in unet
