"""`medfusion sensitivity`: a grid of DVC experiments, one key at a time, turned into a table from
the experiment commits (made here as DVC makes them: commits under refs/exps/)."""

import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from conftest import REPO

from medfusion.config import read_yaml
from medfusion.plan import apply_overrides
from medfusion.reproduce import ProfileError
from medfusion.sensitivity import (
    load_grid,
    queue_commands,
    sensitivity_figure,
    sensitivity_frame,
    sensitivity_markdown,
)

GRID = {
    "base_profile": "cpu-budget",
    "params": {"datasets": ["kvasir_seg"], "models.casnet": ["casnet"], "models.baselines": []},
    "grid": {"train.lr": [0.0003, 0.001, 0.003], "drgo.alpha": [0.25, 0.5]},
}
DICE = {
    "small-base": 0.70,
    "small-train_lr-0.0003": 0.60,
    "small-train_lr-0.003": 0.65,
    "small-drgo_alpha-0.25": 0.72,
}


def _git(repo, *args, **kw):
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, **kw
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "profiles").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "profiles" / "cpu-budget.yaml", tmp_path / "profiles" / "cpu-budget.yaml")
    (tmp_path / "profiles" / "small.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    _git(tmp_path, "init", "-q")
    return tmp_path


def _experiment_commit(repo, name, overrides, dice):
    """A commit holding the experiment's params.yaml and reports/summary.csv, under refs/exps/ as DVC keeps it."""
    work = repo / ".exp"
    shutil.rmtree(work, ignore_errors=True)
    (work / "reports").mkdir(parents=True)
    (work / "params.yaml").write_text(
        yaml.safe_dump(apply_overrides(read_yaml(repo / "params.yaml"), overrides))
    )
    summary = pd.DataFrame([
        {"dataset": "kvasir_seg", "model": "casnet", "class": "polyp", "metric": m, "estimate": e, "mean": v,
         "std": 0.02, "runs": 4, "cases": 200, "undefined": 0}
        for m, v in (("dice", dice), ("iou", dice - 0.1)) for e in ("runs", "ensemble")
    ])  # fmt: skip
    summary.to_csv(work / "reports" / "summary.csv", index=False)
    env = {"GIT_DIR": str(repo / ".git"), "GIT_WORK_TREE": str(work), "GIT_INDEX_FILE": str(repo / ".exp-index"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    subprocess.run(["git", "add", "-A", "."], cwd=work, env=env, check=True)
    tree = subprocess.run(
        ["git", "write-tree"], cwd=work, env=env, check=True, capture_output=True, text=True
    ).stdout
    commit = subprocess.run(["git", "commit-tree", tree.strip(), "-m", name], cwd=work, env=env, check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    _git(repo, "update-ref", f"refs/exps/ab/{'c' * 38}/{name}", commit)


def test_a_grid_varies_one_key_at_a_time_around_the_base_profile(repo):
    grid = load_grid(repo, "small")
    assert grid["base"] == {"train.lr": 0.001, "drgo.alpha": 0.5}  # cpu-budget's lr, params.yaml's alpha
    names = [e["name"] for e in grid["experiments"]]
    assert names == ["small-base", "small-train_lr-0.0003", "small-train_lr-0.003", "small-drgo_alpha-0.25"]
    commands = queue_commands(grid)
    assert commands[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "small-base"]
    keys = [a.split("=")[0] for a in commands[1][6:] if a != "-S"]
    assert len(keys) == len(set(keys))  # each key once: the grid's value replaces the base's
    assert "datasets=[kvasir_seg]" in commands[1] and "train.lr=0.0003" in commands[1]
    bad = dict(GRID, grid={"train.lr": [0.01, 0.1]})
    (repo / "profiles" / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ProfileError, match="does not hold the base value 0.001"):
        load_grid(repo, "bad")


def test_the_report_reads_each_finished_experiment_commit(repo, tmp_path):
    grid = load_grid(repo, "small")
    for e in grid["experiments"]:
        if e["name"] in DICE:
            _experiment_commit(repo, e["name"], e["overrides"], DICE[e["name"]])
    frame, missing = sensitivity_frame(repo, grid)
    assert missing == []  # all four experiments of the grid finished
    lr = frame[frame["key"] == "train.lr"]
    assert list(lr["value"]) == [0.0003, 0.001, 0.003]
    assert list(lr["mean"]) == [0.60, 0.70, 0.65] and list(lr["base"]) == [False, True, False]
    assert set(lr["runs"]) == {4} and set(lr["std"]) == {0.02}
    alpha = frame[frame["key"] == "drgo.alpha"]
    assert list(alpha["value"]) == [0.25, 0.5] and list(alpha["mean"]) == [0.72, 0.70]
    markdown = sensitivity_markdown(frame, grid, missing)
    assert "| train.lr | 0.001 * | kvasir_seg | casnet | polyp | 70.00 | 2.00 | 4 | small-base |" in markdown
    assert "/work/shared" not in markdown  # data paths are not part of the setting
    figure = sensitivity_figure(frame, tmp_path / "out" / "sensitivity.png")
    assert figure.stat().st_size > 1000


def test_unfinished_experiments_are_named(repo):
    grid = load_grid(repo, "small")
    _experiment_commit(repo, "small-base", grid["experiments"][0]["overrides"], 0.7)
    frame, missing = sensitivity_frame(repo, grid)
    assert missing == ["small-train_lr-0.0003", "small-train_lr-0.003", "small-drgo_alpha-0.25"]
    assert set(frame["experiment"]) == {"small-base"}  # the base point of every key
    assert "Not finished" in sensitivity_markdown(frame, grid, missing)
