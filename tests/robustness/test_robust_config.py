"""Robustness of params.yaml handling, as the user meets it: `medfusion check` and a stage started with
bad params (`medfusion fetch`). The message names the file, the dotted key, the value found and what is
allowed; nothing is written (params are checked before any work)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw_params, with_key
from typer.testing import CliRunner

from medfusion.cli import app

runner = CliRunner()


def _with(path: str, value=None, delete: bool = False) -> dict:
    return with_key(tiny_raw_params(), path, value, delete)


BAD_PARAMS = {
    # case: (params.yaml text, what the message must say)
    "epochs as a word": (_with("train.epochs", "ten"), "train.epochs: expected int, got str 'ten'"),
    "fractional image size": (
        _with("data.image_size", 1.5),
        "data.image_size: expected int or 'native', got float 1.5",
    ),
    "negative epochs": (_with("train.epochs", -3), "train.epochs = -3; expected an integer >= 1"),
    "image size not a multiple of 16": (
        _with("data.image_size", 100),
        "data.image_size = 100; expected a multiple of 16",
    ),
    "unknown dataset name": (_with("datasets", ["kvasir"]), "datasets[0] = 'kvasir'; expected one of ["),
    "unknown model name": (
        _with("models.baselines", ["unet", "vnet"]),
        "models.baselines[1] = 'vnet'; expected one of ['attention_unet', 'deeplabv3'",
    ),
    "unknown key (a typo)": (_with("train.epoch", 3), "unknown key(s) ['train.epoch']; allowed in train: ["),
    "missing key": (_with("train.lr", delete=True), "missing key(s) ['train.lr'] in train"),
    "unknown device": (
        _with("train.device", "gpu"),
        "train.device = 'gpu'; expected one of ['auto', 'cpu', 'cuda']",
    ),
    "YAML syntax error": ("train:\n  epochs: [2\n  lr: 0.1\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "top level: expected a mapping, got list"),
}


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_params_are_named_and_stop_the_stage_before_it_writes(case, tmp_path):
    content, expected = BAD_PARAMS[case]
    params_file = _write(tmp_path, content)
    checked = runner.invoke(app, ["check", str(params_file)])
    assert checked.exit_code == 1, checked.output
    assert f"{params_file}: " in checked.output and expected in checked.output, checked.output
    out = tmp_path / "data" / "raw" / "synthetic"
    fetched = runner.invoke(
        app, ["fetch", "synthetic", "--params-file", str(params_file), "--out-dir", str(out)]
    )
    assert fetched.exit_code == 1 and expected in fetched.output, fetched.output
    assert "Traceback" not in fetched.output
    assert not (tmp_path / "data").exists()  # nothing written, not even the partial folder


def test_yaml_error_says_where(tmp_path):
    params_file = _write(tmp_path, "train:\n  epochs: [2\n  lr: 0.1\n")
    result = runner.invoke(app, ["check", str(params_file)])
    assert "line " in result.output and "column " in result.output  # the YAML parser's position


def test_unknown_dataset_on_the_command_line(tmp_path):
    result = runner.invoke(app, ["fetch", "kvasir", "--out-dir", str(tmp_path / "raw")])
    assert result.exit_code == 2
    assert "unknown dataset 'kvasir'; choose from [" in result.output and "'kvasir_seg'" in result.output
    assert not (tmp_path / "raw").exists()


def test_unknown_model_in_the_registry():
    from medfusion.models import build_model

    with pytest.raises(KeyError, match=r"unknown model 'vnet'; choose from \['attention_unet', 'casnet'"):
        build_model("vnet", 3, 2)


def test_good_params_pass(tmp_path):
    result = runner.invoke(app, ["check", str(_write(tmp_path, tiny_raw_params()))])
    assert result.exit_code == 0 and ": ok (1 datasets" in result.output, result.output
