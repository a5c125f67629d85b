"""benchmarks/device_bench.py end to end on CPU at tiny widths: one CSV row per model, finite figures."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_device_bench():
    spec = importlib.util.spec_from_file_location("device_bench", REPO / "benchmarks" / "device_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_bench_cpu_quick(tmp_path: Path) -> None:
    bench = load_device_bench()
    argv = ["--device", "cpu", "--quick", "--models", "casnet,unet", "--size", "32", "--repeats", "3"]
    bench.main([*argv, "--out", str(tmp_path)])

    with open(tmp_path / "device_bench.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["casnet", "unet"]
    for name, row in rows.items():
        assert row["notes"] == "", f"{name}: {row['notes']}"
        for key in ("parameters_m", "ms_per_image_b1", "ms_per_image_b16", "train_ms_per_step_b16"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (name, key, value)
        for key in ("peak_infer_gb_b16", "peak_train_gb_b16"):  # CPU: RSS growth, may round to 0
            value = float(row[key])
            assert math.isfinite(value) and value >= 0, (name, key, value)
    assert rows["casnet"]["loss"].startswith("DRGO")  # params.yaml: model.drgo = true
    table = (tmp_path / "device_bench.md").read_text()
    assert "| casnet |" in table and "| unet |" in table and "RTX 3090" in table
