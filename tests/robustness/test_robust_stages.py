"""A DVC stage started with bad params or an impossible split (`dvc exp run -S train.lr=fast`,
`-S cv.n_folds=50`): the stage process prints the one-line message alone on stderr, no traceback
before it, and exits non-zero; `medfusion check` refuses the split before any stage runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, tiny_raw_params, with_key
from typer.testing import CliRunner

from medfusion.cli import app


def _params(tmp_path: Path, key: str, value) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_key(tiny_raw_params(), key, value), sort_keys=False))
    return path


def _processed(tmp_path: Path, n_cases: int) -> Path:
    folder = tmp_path / "processed" / "synthetic"
    folder.mkdir(parents=True)
    cases = [{"case_id": f"case{i:02d}", "group": f"case{i:02d}"} for i in range(n_cases)]
    (folder / "cases.json").write_text(json.dumps(cases))
    return folder


def _split_stage(tmp_path: Path, params: Path, processed: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.split", "--dataset", "synthetic", "--processed-dir", str(processed),
           "--out", str(tmp_path / "split.json"), "--params-file", str(params)]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_a_mistyped_param_stops_the_stage_with_its_one_line(tmp_path):
    said = _one_line(_split_stage(tmp_path, _params(tmp_path, "train.lr", "fast"), _processed(tmp_path, 30)))
    assert said.startswith("split: ") and "train.lr: expected float, got str 'fast'" in said


def test_more_folds_than_patients_is_refused_by_the_stage_and_by_check(tmp_path):
    params, processed = _params(tmp_path, "cv.n_folds", 50), _processed(tmp_path, 30)
    said = _one_line(_split_stage(tmp_path, params, processed))
    assert "cv.n_folds = 50" in said and "set cv.n_folds to at most 24" in said  # 30 cases, 6 held out
    assert not (tmp_path / "split.json").exists()
    checked = CliRunner().invoke(app, ["check", str(params), "--processed", str(processed.parent)])
    assert checked.exit_code == 1 and "synthetic" in checked.stderr and "at most 24" in checked.stderr
    fine = CliRunner().invoke(app, ["check", str(_params(tmp_path, "cv.n_folds", 5)), "--processed",
                                    str(processed.parent)])  # fmt: skip
    assert fine.exit_code == 0, fine.output


def test_quickstart_refuses_an_unknown_entry_before_dvc_expands_the_stages(monkeypatch):
    """`-S models.baselines=[unett]`: DVC would say only "Parameters 'unett' are missing"; the command
    names the entries there are, and starts nothing."""
    import medfusion.quickstart

    def started(*args, **kwargs):
        raise AssertionError("the experiment was started")

    monkeypatch.setattr(medfusion.quickstart, "run_guarded", started)
    result = CliRunner().invoke(app, ["quickstart", "-S", "models.baselines=[unett]"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "quickstart: params.yaml with -S: models.baselines[0] = 'unett'; expected one of [" in result.stderr
    )
    assert "'unet'" in result.stderr
