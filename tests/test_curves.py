"""Learning curves as DVC plot data (medfusion/curves.py) and the offline plots page (.dvc/plots)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import yaml

from medfusion.curves import DRGO_PLOTTED, write_curves
from medfusion.data.io import write_json

REPO = Path(__file__).resolve().parents[1]


def _history(path: Path, drgo: bool, boundary: bool = True) -> None:
    rows = []
    for epoch in range(3):
        row = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_loss": 0.9 / (epoch + 1),
               "val_dice": 0.3 * epoch, "lr": 1e-4, "seconds": 2.5}  # fmt: skip
        if drgo:
            row |= {
                "drgo_seg": 0.5,
                "drgo_ada": 0.4,
                "drgo_drs": 0.3,
                "drgo_gamma": 0.6,
                "drgo_confidence": 0.7,
            }
            if boundary:
                row["drgo_bnd"] = 0.2
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"precision": "fp32", "epochs": rows})


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_one_tsv_per_run_keyed_by_epoch_and_drgo_terms_apart(tmp_path):
    runs = [{"fold": 0, "seed": 0}, {"fold": 1, "seed": 0}]
    _history(tmp_path / "runs" / "fold0_seed0" / "history.json", drgo=True)
    _history(tmp_path / "runs" / "fold1_seed0" / "history.json", drgo=True, boundary=False)
    write_curves(tmp_path / "runs", runs, tmp_path / "curves", tmp_path / "drgo")
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["fold0_seed0.tsv", "fold1_seed0.tsv"]
    rows = _read(tmp_path / "curves" / "fold0_seed0.tsv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # the first epoch is 1
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"]
    assert float(rows[1]["train_loss"]) == 0.5 and float(rows[2]["val_dice"]) == 0.6
    terms = _read(tmp_path / "drgo" / "fold1_seed0.tsv")
    assert list(terms[0])[: 1 + len(DRGO_PLOTTED)] == ["epoch", *DRGO_PLOTTED]
    assert terms[0]["drgo_bnd"] == "NaN" and terms[0]["drgo_confidence"] == "0.7"  # no such term: NaN


def test_entries_without_drgo_leave_their_drgo_folder_empty_and_old_files_go(tmp_path):
    _history(tmp_path / "runs" / "fold0_seed0" / "history.json", drgo=False)
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "fold9_seed9.tsv").write_text("stale")
    write_curves(tmp_path / "runs", [{"fold": 0, "seed": 0}], tmp_path / "curves", tmp_path / "drgo")
    assert [p.name for p in (tmp_path / "curves").iterdir()] == ["fold0_seed0.tsv"]  # replaced as a whole
    assert (tmp_path / "drgo").is_dir() and not any((tmp_path / "drgo").iterdir())


def test_dvc_yaml_plots_every_curve_file_and_draws_offline():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    defs = {next(iter(p)): next(iter(p.values())) for p in dvc["plots"] if isinstance(p, dict)}
    assert defs["data/curves"]["x"] == "epoch" and defs["data/curves"]["y"] == [
        "train_loss",
        "val_loss",
        "val_dice",
    ]
    assert defs["data/drgo_curves"]["y"] == list(DRGO_PLOTTED)
    for stage in ("train", "train_casnet"):
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"][stage]["outs"]]
        assert "data/curves/${item.dataset}/${item.model}" in outs
        assert "data/drgo_curves/${item.dataset}/${item.model}" in outs
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"html_template\s*=\s*plots/offline.html", config)
    page = (REPO / ".dvc" / "plots" / "offline.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN <script> tags have nowhere to go
    assert not re.search(r"<script[^>]+src=", page) and "window.vegaEmbed" in page
