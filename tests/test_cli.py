import re

import pytest
from conftest import REPO
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.training.tracking import resolve_tracking_uri

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["quickstart"],
        ["reproduce"],
        ["sensitivity", "queue"],
        ["sensitivity", "report"],
        ["fetch"],
        ["models"],
        ["predict"],
        ["check"],
    ],
)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_check_accepts_params_yaml_and_names_bad_keys(tmp_path):
    assert runner.invoke(app, ["check", str(REPO / "params.yaml")]).exit_code == 0
    bad = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    bad.write_text(re.sub(r"(?m)^  baselines: .*$", "  baselines: [unet, casnet]", text))
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 1
    assert (
        "models.baselines[1] = 'casnet'; expected one of ['attention_unet', 'deeplabv3', 'medt'"
        in result.output
    )


def test_models_prints_every_entry_with_parameters_and_flops():
    result = runner.invoke(
        app, ["models", "--no-time", "--size", "64", "--params-file", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "precision:" not in result.stdout
    )  # stdout: the table alone (the notice, once a process, on stderr)
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"model", "casnet", "casnet_wo_hfe", "casnet_wo_ca", "casnet_wo_br", "casnet_wo_drgo", "unet", "segnet",
                         "deeplabv3", "attention_unet", "transunet", "medt"}  # fmt: skip
    assert "| unet | unet | 31.04 |" in rows["unet"]  # U-Net at the paper's width 64
    assert "| casnet_wo_hfe | casnet |" in rows["casnet_wo_hfe"]
    assert "RTX 3090" in result.output


def test_fetch_unknown_and_registration_only(tmp_path):
    result = runner.invoke(app, ["fetch", "lits", "--params-file", str(REPO / "params.yaml")])
    assert result.exit_code != 0 and "unknown dataset 'lits'" in result.output
    result = runner.invoke(
        app, ["fetch", "lits17", "--out-dir", str(tmp_path / "x"), "--params-file", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 1 and "data.sources.lits17" in result.output


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # DVC points queued workers at the main repo
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "sqlite:////elsewhere.db"
