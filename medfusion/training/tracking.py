"""MLflow at the edge: with medfusion/mlflow_model.py (the fold ensemble as an MLflow model), the only module that imports mlflow.

Layout in the store: one experiment per dataset (`<mlflow.experiment_prefix>/<dataset>`), one
parent run per model and train stage, one nested child run per (fold, seed). Params are logged
flat; per-epoch metrics with the epoch as step, under grouped names (`mlflow_name`: train/loss,
val/dice, drgo/seg, test/dice_<class> ...; history.json and the report keep the flat names, and runs
logged before the grouping keep theirs); tags carry the git commit, the source (the stage's script),
the DVC stage and experiment name, and a note (`mlflow.note.content`) of the settings that differ
from the paper protocol. Each run's input is the processed dataset (name, meta.json's sha256 as
digest, source), and while a child trains, MLflow's system-metrics monitor logs CPU, memory, disk,
network and, with the NVIDIA library on a GPU machine, GPU use (system/..., every
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds, 10 by default). The evaluate stage adds test metrics
to the same runs.

Where the store is: `MLFLOW_TRACKING_URI` if set, else `mlflow.tracking_uri` from params.yaml,
else `sqlite:///<repo root>/mlflow.db`, with the repo root taken from `DVC_ROOT`, which DVC points
at the main repository even inside `dvc exp run --queue`/`--temp` workspaces, so runs made there
land in the same store (a relative `sqlite:///` path is taken from that root too). An http:// URI
names an MLflow tracking server, the store for many concurrent writers (`dvc queue start -j N`, slurm
jobs); MLflow's client retries its transient errors (5xx, 429, dropped connections) with backoff. If
the store cannot be reached, training goes on untracked and says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfusion.common import run_name, telemetry_off
from medfusion.config import config_hash
from medfusion.data.io import file_sha256, read_json, write_json
from medfusion.provenance import git_state, installed

# flat names (history.json, the report) -> MLflow's grouped ones; the charts group by the prefix
_GROUPS = {"train_loss": "train/loss", "val_loss": "val/loss", "val_dice": "val/dice", "lr": "train/lr",
           "seconds": "train/epoch_seconds"}  # fmt: skip
_PREFIXES = (("drgo_", "drgo/"), ("test_", "test/"), ("transfer_", "transfer/"))


def mlflow_name(name: str) -> str:
    """The MLflow metric name of a flat one: train_loss -> train/loss, val_dice -> val/dice,
    drgo_seg -> drgo/seg, test_dice_polyp -> test/dice_polyp, test_ensemble_iou_polyp ->
    test/ensemble_iou_polyp, transfer_<target>_... -> transfer/<target>_...; others unchanged."""
    if name in _GROUPS:
        return _GROUPS[name]
    for flat, grouped in _PREFIXES:
        if name.startswith(flat):
            return grouped + name[len(flat) :]
    return name


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_tracking_uri(configured: str | None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _anchor_sqlite(os.environ["MLFLOW_TRACKING_URI"])
    if configured:
        return _anchor_sqlite(configured)
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _anchor_sqlite(uri: str) -> str:
    """A relative sqlite path (`sqlite:///mlflow.db`) taken from the repo root, not the cwd: stages of
    a queued experiment run in a temporary copy of the repo, and runs logged there would go with it."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :] if uri.startswith(prefix) else ""
    if not path or path.startswith(":memory:") or Path(path).is_absolute():
        return uri
    return f"{prefix}{repo_root() / path}"


def _quiet_mlflow() -> None:
    telemetry_off()
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()


@contextlib.contextmanager
def _sqlite_open_lock(uri: str, timeout: float = 300.0) -> Iterator[None]:
    """Held while a process opens a sqlite store. MLflow creates and migrates a new sqlite file's
    schema unguarded, so processes opening it at once (`dvc queue start -j N` before the first run)
    fail with "table ... already exists" or "duplicate column name" and would go on untracked.
    A lock file in the temp dir covers one machine; across machines, use a tracking server."""
    if not uri.startswith("sqlite:") or os.name == "nt":
        yield
        return
    import fcntl
    import hashlib
    import tempfile

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"medfusion-mlflow-{digest}.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has held {lock.name} for over {timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client(uri: str) -> Any:
    """An MlflowClient with its store opened (where a new sqlite file gets its schema), one process
    at a time per sqlite file."""
    from mlflow.tracking import MlflowClient

    with _sqlite_open_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client


# The experiment kind MLflow 3's UI reads (its kind selector; without it a 3.x UI may open the GenAI
# traces overview). MLflow 3.17's GenAI / Model-training toggle overrides it in a link that does not
# ask for the training view: the quickstart prints links with `cli.MLFLOW_RUNS_VIEW`
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: Any, name: str, location: str | None) -> str:
    """The id of experiment `name`, created if missing, and marked a model-training experiment
    (`EXPERIMENT_KIND`; also on an experiment an older version created). Concurrent stages (`dvc queue
    start -j N`, slurm jobs) race to create a new dataset's experiment: the losers get
    RESOURCE_ALREADY_EXISTS and take the winner's experiment instead of going on untracked."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:  # not the race: a real failure
                raise
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's system-metrics monitor on `run_id` (a thread; None where it cannot start): CPU and
    memory through psutil, GPU through the NVIDIA library where there is one. A continued run goes on
    from its last system step."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as err:
        print(f"MLflow: no system metrics for run {run_id} ({err})", file=sys.stderr)
        return None


def _stop(monitor: Any) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as err:
            print(f"MLflow: the system-metrics monitor did not stop cleanly ({err})", file=sys.stderr)


class _RunLogger:
    """The `log(metrics, step)` callback for one run, and `tag(tags)`; `run_id` None when tracking is off."""

    def __init__(self, client: Any, run_id: str | None) -> None:
        self.client, self.run_id = client, run_id

    def tag(self, tags: dict[str, Any]) -> None:
        """Set run tags (how the run computed: precision, compile, and why)."""
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as err:
            print(f"MLflow: cannot tag run {self.run_id} ({err})", file=sys.stderr)

    def files(self, run_dir: Path, config: dict[str, Any]) -> None:
        """The run's own artifacts: history.json, config.json (what it was trained with: the entry's
        resolved settings, fold, seed, config hash), environment.txt (every installed package's
        version: the environment's pip freeze) and checkpoint.json, a link to its weights
        (path in the repository and on this machine, bytes, sha256) instead of a second copy of
        model.pt, which DVC already stores (`dvc pull` fetches it)."""
        if self.run_id is None:
            return
        import tempfile

        run_dir = Path(run_dir)
        weights = run_dir / "model.pt"
        in_repo = None  # relative to the workspace (a `dvc exp run --temp` copy) or the repository
        for root in (Path.cwd(), repo_root()):
            if weights.resolve().is_relative_to(root.resolve()):
                in_repo = str(weights.resolve().relative_to(root.resolve()))
                break
        try:  # the run is trained and recorded: a missing file or a busy store must not fail it now
            link = {"path": in_repo, "absolute_path": str(weights.resolve()), "bytes": weights.stat().st_size,
                    "sha256": file_sha256(weights)}  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                write_json(Path(tmp) / "config.json", config)
                write_json(Path(tmp) / "checkpoint.json", link)
                (Path(tmp) / "environment.txt").write_text("\n".join(installed()) + "\n")  # pip freeze
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for path in (
                        run_dir / "history.json",
                        Path(tmp) / "config.json",
                        Path(tmp) / "checkpoint.json",
                        Path(tmp) / "environment.txt",
                    ):
                        self.client.log_artifact(self.run_id, str(path))
        except Exception as err:
            print(f"MLflow: cannot log the files of run {self.run_id} ({err})", file=sys.stderr)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:  # runs in parallel processes share the store: a locked sqlite file must not end a run
            self.client.log_batch(
                self.run_id, metrics=[Metric(mlflow_name(k), float(v), now, step) for k, v in metrics.items()]
            )
        except Exception as err:
            print(
                f"MLflow: cannot log step {step} of run {self.run_id} ({err}); training goes on",
                file=sys.stderr,
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
        dataset: the processed dataset the runs train on, {name, digest, source} (`log_input`).
        note: the runs' description (`mlflow.note.content`), e.g. `protocol_note`.
        source: the script the runs come from (the runs table's Source column).
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
        dataset: dict[str, str] | None = None,
        note: str | None = None,
        source: str = "pipeline/train.py",
    ) -> None:
        self.client, self.parent_id = None, None
        self.params, self.uri, self.dataset = params, uri, dataset
        root = repo_root()
        self.tags = {
            **tags,
            **({"mlflow.note.content": note} if note else {}),
            "mlflow.source.name": source,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_state(root)["commit"],
            "dvc.stage": os.environ.get("DVC_STAGE", ""),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        }
        try:
            _check_server(uri)
            _quiet_mlflow()
            self.client = _client(uri)
            # artifacts beside the sqlite store, not in the cwd (a DVC temp workspace would lose them)
            location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            self.experiment_id = _experiment_id(self.client, experiment, location)
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
                self._log_input(self.parent_id)
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
    def attach(cls, uri: str, parent_id: str | None, client: Any = None) -> Tracker:
        """A tracker on an existing parent run (the evaluate stage adds test metrics to it). Trackers
        attached one after another may share the first one's `client` (opening a store costs seconds)."""
        self = cls.__new__(cls)
        self.client, self.parent_id, self.params, self.uri, self.tags = None, parent_id, {}, uri, {}
        self.dataset = None
        if parent_id:
            try:
                if client is None:
                    _check_server(uri)  # else get_run retries an unreachable server for minutes
                    _quiet_mlflow()
                    client = _client(uri)
                self.client = client
                self.client.get_run(parent_id)
            except Exception as err:
                print(
                    f"MLflow run {parent_id} at {uri} is unavailable ({err}); test metrics not tracked",
                    file=sys.stderr,
                )
                self.client = None
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its MLflow client: submitit sends `tracker.child` to other processes or
        slurm nodes (medfusion/training/executor.py), which reconnect by URI in `__setstate__` and open
        their own child runs under the same parent."""
        state = dict(self.__dict__)
        state["client"], state["_connected"] = None, self.client is not None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        connected = state.pop("_connected", False)
        self.__dict__.update(state)
        if not connected:
            return
        try:
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as err:
            print(
                f"MLflow tracking at {self.uri} is unavailable here ({err}); this run is untracked",
                file=sys.stderr,
            )

    def _alive(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def _log_input(self, run_id: str) -> None:
        """The run's training data as an MLflow dataset input (the runs table's Dataset column)."""
        if not self.dataset:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        d = self.dataset
        dataset = Dataset(d["name"], d["digest"], "local", d["source"])
        context = InputTag("mlflow.data.context", "training")
        try:
            self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])
        except Exception as err:
            print(f"MLflow: cannot record the dataset of run {run_id} ({err})", file=sys.stderr)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    @contextlib.contextmanager
    def child(self, fold: int, seed: int, run_params: dict[str, Any]) -> Iterator[_RunLogger]:
        """A nested run for one (fold, seed); marked FAILED if training raises.

        A run of the same parent, fold, seed and config hash that never finished (killed, or FAILED) is
        continued instead of starting another: training resumes after its last finished epoch
        (run_fold's last.pt), so its metric history goes on where it stopped."""
        if self.client is None:
            yield _RunLogger(None, None)
            return
        try:
            run_id = self._unfinished_child(fold, seed, run_params.get("config_hash"))
            if run_id is None:
                tags = {
                    **self.tags,
                    "mlflow.parentRunId": self.parent_id,
                    "fold": str(fold),
                    "seed": str(seed),
                }
                run = self.client.create_run(self.experiment_id, run_name=run_name(fold, seed), tags=tags)
                run_id = run.info.run_id
                self._log_params(run_id, {**self.params, **run_params})
                self._log_input(run_id)
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:
            print(
                f"MLflow: cannot create the run for fold {fold} seed {seed} ({err}); untracked",
                file=sys.stderr,
            )
            yield _RunLogger(None, None)
            return
        monitor = _system_metrics(run_id, self.uri)
        try:
            yield _RunLogger(self.client, run_id)
        except BaseException:
            _stop(monitor)
            self.client.set_terminated(run_id, status="FAILED")
            raise
        _stop(monitor)
        try:  # the run is trained and recorded: a busy store (parallel jobs) must not fail it now
            self.client.set_terminated(run_id, status="FINISHED")
        except Exception as err:
            print(f"MLflow: cannot mark run {run_id} finished ({err})", file=sys.stderr)

    def _unfinished_child(self, fold: int, seed: int, config_hash: str | None) -> str | None:
        if not config_hash:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.fold = '{fold}' "
                f"and tags.seed = '{seed}' and params.config_hash = '{config_hash}'"
            ),
            max_results=10,
        )
        unfinished = [r for r in runs if r.info.status in ("RUNNING", "FAILED", "KILLED")]
        return unfinished[0].info.run_id if unfinished else None

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
