"""`medfusion plan`: the cost of the current params before any training, checked by hand."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, tiny_raw_params

import medfusion.plan as plan
from medfusion.config import params_from_dict


def _fixed_calibration(monkeypatch, step_s=0.5, predict_s=0.01, parameters=1_000_000):
    def calibrate(params, entry, in_channels, num_classes, batch, steps):
        return {"step_s": step_s, "predict_s_per_sample": predict_s, "parameters": parameters,
                "activation_bytes": 10_000_000, "precision": "cpu, float32", "device": "cpu"}  # fmt: skip

    monkeypatch.setattr(plan, "calibrate", calibrate)


def test_plan_counts_every_run_and_its_hours(monkeypatch, tmp_path):
    """synthetic (24 images), 2 folds x 1 seed, entries unet + casnet, 2 epochs, batch 4 (calibrated at
    batch 4, so no scaling). Test 20% -> 4.8 images; the training part 19.2: 9.6 train and 9.6 validation
    per run; 3 steps per epoch. Per run: 2 x (3 x 0.5 + 9.6 x 0.01) s; evaluation per entry: 2 runs x
    (9.6 + 4.8) x 0.01 s."""
    _fixed_calibration(monkeypatch)
    raw = tiny_raw_params()
    raw["models"] = {"casnet": ["casnet"], "baselines": ["unet"]}
    params = params_from_dict(raw)
    out = plan.make_plan(params, tmp_path / "none", steps=1, max_batch=4)
    (row,) = out["datasets"]
    assert row["runs"] == 2 * 2 and out["runs"] == 4
    assert row["steps_per_epoch"] == math.ceil(9.6 / 4) == 3
    per_run = 2 * (3 * 0.5 + 9.6 * 0.01)
    evaluation = 2 * (9.6 + 4.8) * 0.01
    assert row["hours_serial"] == pytest.approx(2 * (2 * per_run + evaluation) / 3600)
    assert out["hours_with_executor"] == pytest.approx(out["hours_serial"])  # one CPU: no parallel gain
    assert row["processed_bytes"] == 24 * (3 + 1) * 32 * 32
    assert out["disk_bytes"] == row["processed_bytes"] + 2 * 2 * 4 * 1_000_000
    assert out["peak_memory_bytes"]["train"] == 16 * 1_000_000 + 10_000_000
    text = plan.plan_markdown(out)
    assert "| synthetic | 24 (data.synthetic) |" in text and "4 runs" in text


def test_plan_reads_processed_sizes_and_published_ones(tmp_path, monkeypatch):
    _fixed_calibration(monkeypatch)
    raw = tiny_raw_params()
    params = params_from_dict(raw)
    lits = plan.dataset_size(params, "lits17", tmp_path)
    assert (lits.cases, lits.samples, lits.depth) == (131, 58638, 987) and lits.source == "published size"
    (tmp_path / "kvasir_seg").mkdir()
    meta = {"kind": "image", "num_cases": 3, "num_samples": 3,
            "cases": {"a": {"shape": [100, 200]}, "b": {"shape": [300, 150]}, "c": {"shape": [50, 50]}}}  # fmt: skip
    (tmp_path / "kvasir_seg" / "meta.json").write_text(json.dumps(meta))
    kvasir = plan.dataset_size(params, "kvasir_seg", tmp_path)
    assert (kvasir.samples, kvasir.depth, kvasir.size) == (3, 1, (300, 200))
    with pytest.raises(plan.PlanError, match=r"dataset 'custom': .*dvc repro preprocess@custom"):
        plan.dataset_size(params, "custom", tmp_path)


def test_plan_overrides_and_their_errors():
    raw = {"train": {"epochs": 100}, "datasets": ["kvasir_seg"]}
    plan.apply_overrides(raw, ["train.epochs=3", "datasets=[lits17, chase_db1]"])
    assert raw == {"train": {"epochs": 3}, "datasets": ["lits17", "chase_db1"]}
    with pytest.raises(plan.PlanError, match="expected key.path=value"):
        plan.apply_overrides(raw, ["train.epochs"])
    with pytest.raises(plan.PlanError, match="'nope' of 'nope.x' is not a section"):
        plan.apply_overrides(raw, ["nope.x=1"])


def test_plan_command_measures_and_prints_json(tmp_path):
    """The real command, calibrating two tiny entries on this CPU."""
    cmd = [sys.executable, "-m", "medfusion.cli", "plan", "--json", "--steps", "1", "--processed", str(tmp_path),
           "-S", "datasets=[synthetic]", "-S", "data.image_size=32", "-S", "drgo.region_size=16",
           "-S", "models.casnet=[casnet]", "-S", "models.baselines=[unet]", "-S", "model.base_channels=4",
           "-S", "model.transformer_dim=32", "-S", "unet.base_channels=4"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # the data alone on stdout: `medfusion plan --json | python -m json.tool`
    assert set(result["calibration"]["entries"]) == {"casnet", "unet"}
    assert all(
        e["step_s"] > 0 and e["predict_s_per_sample"] > 0 for e in result["calibration"]["entries"].values()
    )
    assert result["runs"] == 2 * 5 * 3 and "ISA" in result["machine"]
    bad = subprocess.run(
        [*cmd[:4], "-S", "train.epochs=0"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "train.epochs" in bad.stderr


def test_plan_counts_sliding_windows_for_native_images(monkeypatch, tmp_path):
    """Native synthetic images (96x96 as generated) with 32-pixel patches: 5 windows per axis at half
    overlap, so every predicted image costs 25 forward passes; the canvas is 96x96."""
    _fixed_calibration(monkeypatch)
    raw = tiny_raw_params()
    raw["models"] = {"casnet": ["casnet"], "baselines": []}
    raw["data"].update(image_size="native", patch_size=32)
    raw["drgo"]["region_size"] = 16
    out = plan.make_plan(params_from_dict(raw), tmp_path / "none", steps=1, max_batch=4)
    (row,) = out["datasets"]
    per_run = 2 * (3 * 0.5 + 9.6 * 0.01 * 25)
    evaluation = 2 * (9.6 + 4.8) * 0.01 * 25
    assert row["hours_serial"] == pytest.approx((2 * per_run + evaluation) / 3600)
    assert row["processed_bytes"] == 24 * (3 + 1) * 96 * 96
