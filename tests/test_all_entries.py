"""Every model entry of params.yaml, end to end through the library functions the DVC stages call:
trained (run_cv), evaluated (evaluate_model), compared (compare_models), tabled (build_tables) and
costed (efficiency_row). The quickstart runs only its default entries through DVC
(tests/test_pipeline_e2e.py); this keeps the other seven working too. Tiny widths (each section's
TINY), 32x32, 1 epoch, 2 folds."""

from __future__ import annotations

import pandas as pd
from conftest import RecordingTracker, fp32, raw_params, tiny_raw_params, train_cv

from medfusion.config import model_sections, params_from_dict
from medfusion.data.io import write_json
from medfusion.efficiency import efficiency_row
from medfusion.evaluation import evaluate_model
from medfusion.report import build_tables, efficiency_markdown
from medfusion.stats import compare_models


def _all_entries_tiny() -> dict:
    raw = tiny_raw_params()
    raw["models"] = raw_params()["models"]  # all eleven entries
    for section, cls in model_sections().items():
        raw[section].update(cls.TINY)
    raw["drgo"]["region_size"] = 16
    raw["train"]["epochs"] = 1
    return raw


def test_every_entry_trains_evaluates_and_is_reported(synthetic_processed, tmp_path):
    params = params_from_dict(_all_entries_tiny())
    processed, split = synthetic_processed
    write_json(tmp_path / "split.json", split)
    frames, infos = [], {}
    for name in params.model_names:
        runs_dir = tmp_path / "runs" / name
        runs = train_cv(
            params, "synthetic", name, processed, tmp_path / "split.json", runs_dir, RecordingTracker()
        )
        assert [(r["fold"], r["seed"]) for r in runs] == [(0, 0), (1, 0)]
        per_case, info, _ = evaluate_model(runs, runs_dir, processed, split, 8, fp32())
        frames.append(per_case.assign(dataset="synthetic", model=name))
        infos["synthetic"] = {**info, "title": "synthetic", "note": ""}
    per_case = pd.concat(frames, ignore_index=True)
    assert set(per_case["model"]) == set(params.model_names)

    tests = compare_models(per_case, params.model_names)
    assert set(tests["model"]) == set(params.model_names[1:])  # casnet against every other entry
    tables = build_tables(per_case, infos, params.model_names, params.ablations, tests)
    table1, table3 = tables["table1"][0], tables["table3"][0]
    for name in ["casnet", *params.models.baselines]:
        assert f"| {name} | blob | mean ± std over runs |" in table1, name
    for name in params.models.casnet[1:]:
        assert f"| {name} |" in table3, name

    rows = [efficiency_row(params, name, fp32(), size=32, timed=False) for name in params.model_names]
    efficiency = efficiency_markdown(rows)
    assert all(f"| {name} |" in efficiency for name in params.model_names)
