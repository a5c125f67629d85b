"""`medfusion reproduce --profile`: the committed profiles, how their overrides reach DVC, and how the
outputs are kept."""

import pytest
from conftest import REPO
from hydra.core.override_parser.overrides_parser import OverridesParser
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.config import params_from_dict, read_yaml
from medfusion.plan import apply_overrides
from medfusion.reproduce import ProfileError, keep_outputs, load_profile, run_record

runner = CliRunner()


def test_the_cpu_budget_profile_reaches_dvc_as_written(tmp_path):
    """Every override parses under DVC's (Hydra's) grammar to the profile's value, and the params
    it makes are valid, with ${data_root} replaced by --data-root."""
    profile = load_profile(REPO, "cpu-budget", data_root=tmp_path)
    written = read_yaml(REPO / "profiles" / "cpu-budget.yaml")["params"]
    parsed = {
        o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(profile["overrides"])
    }
    assert list(parsed) == list(written)
    for key, value in written.items():
        expected = value.replace("${data_root}", str(tmp_path)) if isinstance(value, str) else value
        assert parsed[key] == expected, key
    assert parsed["data.custom.group_pattern"] == r"^(?:flipped|mirrored)_(\d+)_"
    assert parsed["train.compile"] == "off"  # a string, not YAML's boolean
    assert len(profile["missing"]) == 3 and "data.sources.kvasir_seg" in profile["missing"][0]
    params = params_from_dict(apply_overrides(read_yaml(REPO / "params.yaml"), profile["overrides"]))
    assert params.datasets == ["kvasir_seg", "chase_db1", "custom"]
    assert params.cv.n_folds == 2 and params.cv.seeds == [0, 1, 2]  # 3 seeds: DRGO's effect over seeds
    assert "casnet_wo_drgo" in params.model_names and len(params.model_names) == 11
    assert profile["out_dir"] == REPO / "reports" / "cpu-budget"


def test_an_unknown_profile_or_missing_data_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ProfileError, match=r"profile 'nope'.*'cpu-budget'"):
        load_profile(REPO, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: []\n")
    with pytest.raises(ProfileError, match="expected a `params:` mapping"):
        load_profile(REPO, str(bad))
    result = runner.invoke(app, ["reproduce", "--profile", "cpu-budget", "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert "--data-root" in result.output and "kvasir_seg" in result.output


def test_kept_outputs_replace_the_folder_whole_with_their_record(tmp_path):
    (tmp_path / "reports" / "tables").mkdir(parents=True)
    (tmp_path / "reports" / "tables" / "table1.md").write_text("# Table 1\n")
    (tmp_path / "reports" / "claims.md").write_text("claims\n")
    out = tmp_path / "reports" / "cpu-budget"
    out.mkdir()
    (out / "stale.md").write_text("from an older run\n")
    profile = {"path": REPO / "profiles" / "cpu-budget.yaml", "overrides": ["train.epochs=6"],
               "data_root": tmp_path}  # fmt: skip
    record = run_record(
        profile, "medfusion reproduce --profile cpu-budget", "AMD EPYC, ISA AVX2", 61.5, "abc123", "now"
    )
    copied = keep_outputs(tmp_path, out, record)
    assert copied == ["tables", "claims.md"]
    assert sorted(p.name for p in out.iterdir()) == ["RUN.md", "claims.md", "tables"]
    text = (out / "RUN.md").read_text()
    assert (
        "AMD EPYC, ISA AVX2" in text
        and "61.5 min" in text
        and "`abc123`" in text
        and "-S train.epochs=6" in text
    )


def test_outputs_are_kept_from_the_experiment_commit_whatever_the_workspace_holds(tmp_path):
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    (tmp_path / "reports" / "tables").mkdir(parents=True)
    (tmp_path / "reports" / "tables" / "table1.md").write_text("# from the experiment\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "exp"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    (tmp_path / "reports" / "tables" / "table1.md").write_text("# the workspace's own\n")
    profile = {"path": REPO / "profiles" / "cpu-budget.yaml", "overrides": [], "data_root": tmp_path}
    out = tmp_path / "kept"
    assert keep_outputs(tmp_path, out, run_record(profile, "c", "m", 1.0, commit, "now"), commit) == [
        "tables"
    ]
    assert (out / "tables" / "table1.md").read_text() == "# from the experiment\n"
