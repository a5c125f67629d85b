"""MLflow at the edge: the only module that imports mlflow.

Layout in the store: one experiment per dataset (`<mlflow.experiment_prefix>/<dataset>`), one
parent run per model and train stage, one nested child run per (fold, seed). Params are logged
flat; per-epoch metrics with the epoch as step; tags carry the git commit, the DVC stage and the
DVC experiment name. The evaluate stage adds test metrics to the same runs.

Where the store is: `MLFLOW_TRACKING_URI` if set, else `mlflow.tracking_uri` from params.yaml,
else `sqlite:///<repo root>/mlflow.db`, with the repo root taken from `DVC_ROOT`, which DVC points
at the main repository even inside `dvc exp run --queue`/`--temp` workspaces, so runs made there
land in the same store. If the store cannot be reached, training goes on untracked and says so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfusion.config import config_hash
from medfusion.data.io import read_json, write_json


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_tracking_uri(configured: str | None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()


class _RunLogger:
    """The `log(metrics, step)` callback for one run; `run_id` None when tracking is off."""

    def __init__(self, client: Any, run_id: str | None) -> None:
        self.client, self.run_id = client, run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )


class Tracker:
    """Parent run of one (dataset, model) stage, and child runs per (fold, seed).

    Args:
        uri: tracking URI (see `resolve_tracking_uri`).
        experiment: experiment name.
        run_name: the parent run's name (the model).
        params: flat params of the parent run.
        tags: extra tags (dataset, model).
        state_file: where the parent run id is kept so a resumed stage reuses its parent.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
    ) -> None:
        self.client, self.parent_id = None, None
        self.params, self.uri = params, uri
        root = repo_root()
        self.tags = {
            **tags,
            "mlflow.source.git.commit": _git_commit(root),
            "dvc.stage": os.environ.get("DVC_STAGE", ""),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        }
        try:
            _check_server(uri)
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found:
                self.experiment_id = found.experiment_id
            else:  # artifacts beside the sqlite store, not in the cwd (a DVC temp workspace would lose them)
                location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            # a resumed stage with the same params continues its parent run; changed params start a new one
            params_hash = config_hash(params)
            state = read_json(state_file) if state_file and state_file.exists() else {}
            previous = state.get("parent_run_id") if state.get("params_hash") == params_hash else None
            if previous and self._alive(previous):
                self.parent_id = previous
            else:
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=self.tags)
                self.parent_id = run.info.run_id
                self._log_params(self.parent_id, params)
            if state_file:
                write_json(
                    state_file,
                    {"parent_run_id": self.parent_id, "params_hash": params_hash, "tracking_uri": uri},
                )
        except Exception as err:  # tracking must never cost a training run
            print(
                f"MLflow tracking at {uri} is unavailable ({err}); training continues untracked",
                file=sys.stderr,
            )
            self.client, self.parent_id = None, None

    @classmethod
    def attach(cls, uri: str, parent_id: str | None) -> Tracker:
        """A tracker on an existing parent run (the evaluate stage adds test metrics to it)."""
        self = cls.__new__(cls)
        self.client, self.parent_id, self.params, self.uri, self.tags = None, parent_id, {}, uri, {}
        if parent_id:
            try:
                _quiet_mlflow()
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=uri)
                self.client.get_run(parent_id)
            except Exception as err:
                print(
                    f"MLflow run {parent_id} at {uri} is unavailable ({err}); test metrics not tracked",
                    file=sys.stderr,
                )
                self.client = None
        return self

    def _alive(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    @contextlib.contextmanager
    def child(self, fold: int, seed: int, run_params: dict[str, Any]) -> Iterator[_RunLogger]:
        """A nested run for one (fold, seed); marked FAILED if training raises."""
        if self.client is None:
            yield _RunLogger(None, None)
            return
        try:
            tags = {**self.tags, "mlflow.parentRunId": self.parent_id, "fold": str(fold), "seed": str(seed)}
            run = self.client.create_run(self.experiment_id, run_name=f"fold{fold}_seed{seed}", tags=tags)
            run_id = run.info.run_id
            self._log_params(run_id, {**self.params, **run_params})
        except Exception as err:
            print(
                f"MLflow: cannot create the run for fold {fold} seed {seed} ({err}); untracked",
                file=sys.stderr,
            )
            yield _RunLogger(None, None)
            return
        try:
            yield _RunLogger(self.client, run_id)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def finish(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.parent_id, status="FINISHED")

    def log_test_metrics(
        self, run_id: str | None, metrics: dict[str, float], artifacts: list[Path] = ()
    ) -> None:
        """Add test metrics (and files) to an existing run: a child by its id, or the parent with None."""
        if self.client is None:
            return
        run_id = run_id or self.parent_id
        try:
            _RunLogger(self.client, run_id)(metrics, 0)
            for path in artifacts:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.client.log_artifact(run_id, str(path))
        except Exception as err:
            print(f"MLflow: cannot log test metrics to run {run_id} ({err})", file=sys.stderr)
