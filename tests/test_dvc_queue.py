"""Parallel ablations with the DVC queue: two queued experiments, two workers, one MLflow store.

In a temporary copy of the repository (git + DVC, as tests/test_pipeline_e2e.py makes it), the
CASNet ablation `model.use_boundary=false` and its reference are queued on the `synthetic` dataset
with tiny settings and run by `dvc queue start -j 2`. Both must succeed, and both sets of MLflow
runs must land in the main copy's mlflow.db, not in the workers' temporary workspaces.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import copy_repo

from medfusion.quickstart import quickstart_overrides

pytestmark = pytest.mark.slow

JOBS = 2  # queue workers; each runs one experiment at a time in its own temporary workspace
WAIT_S = 1800  # both experiments, on a busy 2-core machine
POLL_S = 3
EXPERIMENTS = {"q-boundary": "model.use_boundary=true", "q-noboundary": "model.use_boundary=false"}
TINY = {
    "datasets": "[synthetic]",
    "models.casnet": "[casnet]",
    "models.baselines": "[]",
    "data.synthetic.num_images": "40",
    "train.epochs": "1",
}


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, (
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _overrides(extra: str) -> list[str]:
    """The quickstart's overrides (tiny widths, train.compile=off) with TINY and `extra` replacing their
    keys: -S takes each key once."""
    merged = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in quickstart_overrides()}
    merged.update(TINY)
    key, value = extra.split("=", 1)
    merged[key] = value
    return [a for k, v in merged.items() for a in ("-S", f"{k}={v}")]


def _queue_state(repo: Path, env: dict) -> tuple[dict[str, str], str]:
    """({experiment: status}, the worker status line) from `dvc queue status`."""
    out = _run(["dvc", "queue", "status"], repo, env).stdout
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in EXPERIMENTS:
            states[parts[1]] = parts[-1]
    workers = next((line for line in out.splitlines() if line.startswith("Worker status")), "")
    return states, workers


def _wait_for_queue(repo: Path, env: dict) -> dict[str, str]:
    """Poll until no experiment is queued or running and the (temporary) workers have gone."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        states, workers = _queue_state(repo, env)
        done = set(states) == set(EXPERIMENTS) and not {"Queued", "Running"} & set(states.values())
        if done and workers.startswith("Worker status: 0 active"):
            return states
        time.sleep(POLL_S)
    pytest.fail(f"the DVC queue did not finish within {WAIT_S} s: {states}, {workers}")


def _shown(repo: Path, env: dict) -> dict[str, dict]:
    """{experiment name: its `dvc exp show --json` data} for our experiments."""
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") in EXPERIMENTS and isinstance(node.get("data"), dict):
                found[node["name"]] = node["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    return found


def test_two_queued_ablations_run_in_parallel_into_one_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    env = copy_repo(repo)
    for name, extra in EXPERIMENTS.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, *_overrides(extra)], repo, env)
    start = time.perf_counter()
    try:
        _run(["dvc", "queue", "start", "-j", str(JOBS)], repo, env)
        states = _wait_for_queue(repo, env)
    finally:
        if "states" not in locals():  # timed out or failed: leave no worker or experiment running
            _run(["dvc", "queue", "stop", "--kill"], repo, env, check=False)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(EXPERIMENTS)} queued experiments with -j {JOBS}: {minutes:.1f} min")
    logs = {n: _run(["dvc", "queue", "logs", n], repo, env, check=False).stdout[-3000:] for n in EXPERIMENTS}
    assert set(states.values()) == {"Success"}, f"queue states {states}; logs:\n{logs}"

    shown = _shown(repo, env)
    assert set(shown) == set(EXPERIMENTS), (
        f"dvc exp show lists {sorted(shown)}, expected {sorted(EXPERIMENTS)}"
    )
    for name, extra in EXPERIMENTS.items():
        model = shown[name]["params"]["params.yaml"]["data"]["model"]
        assert f"model.use_boundary={str(model['use_boundary']).lower()}" == extra, (name, model)
        assert shown[name]["metrics"], f"{name}: no metrics (reports/metrics.json) in dvc exp show"

    db = repo / "mlflow.db"
    assert db.exists(), f"no MLflow store at {db}: the queued stages logged elsewhere"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("medfusion/synthetic")
    assert experiment is not None, f"no experiment medfusion/synthetic in {db}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    for name, extra in EXPERIMENTS.items():
        mine = [r for r in runs if r.data.tags.get("dvc.exp_name") == name]
        parents = [r for r in mine if "mlflow.parentRunId" not in r.data.tags]
        children = [
            r for r in mine if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}
        ]
        assert len(parents) == 1 and len(children) == 2, (
            f"{name}: expected 1 parent and 2 child runs (2 folds x 1 seed), got {len(parents)} and {len(children)}"
        )
        parent = parents[0]
        assert parent.data.params["drgo.use_boundary"] == str(extra.endswith("true")), parent.data.params
        assert parent.data.tags["dvc.stage"] == "train_casnet@synthetic-casnet"
        assert "test/dice_blob" in parent.data.metrics, (
            f"{name}: evaluate added no test metrics to its parent"
        )
        for child in children:
            assert child.info.status == "FINISHED", (name, child.info.run_name, child.info.status)
            assert [m.step for m in client.get_metric_history(child.info.run_id, "val/dice")] == [0]
