"""Concurrent tracking through an MLflow tracking server (http://), and an unreachable one.

A real `mlflow server` (sqlite backend, proxied artifacts, both in tmp_path) takes 8 writer
processes at once, each doing what one train stage does through `Tracker`: a parent run, a child
run per fold, per-epoch metrics. Every run and every step must arrive.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfusion.training.tracking import Tracker, _experiment_id, mlflow_name, resolve_tracking_uri

WRITERS, FOLDS, STEPS = 8, 2, 20
METRICS = ("train_loss", "val_loss", "val_dice")
EXPERIMENT = "medfusion/synthetic"
START_TIMEOUT_S = 120  # a cold server (schema migrations, 2 workers importing mlflow) on a busy 2-core box
STOP_TIMEOUT_S = 20


def _free_port() -> int:
    """A port nothing listens on right now (the OS picks it; closed again at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _live_group_members(pgid: int) -> list[str]:
    """Processes of group `pgid` still running (zombies are dead: they only wait to be reaped)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        comm, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{stat.parent.name} ({comm})")
    return alive


@dataclass
class Server:
    """An `mlflow server` started in its own session, so that its uvicorn workers share its group."""

    proc: subprocess.Popen
    uri: str
    log: Path
    root: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def wait_until_up(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll /health: the server takes seconds to tens of seconds to migrate its schema and start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {self.proc.returncode} before answering:\n{self.log_tail()}"
                )
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.3)
        pytest.fail(
            f"mlflow server at {self.uri} did not answer /health within {timeout} s:\n{self.log_tail()}"
        )

    def stop(self) -> list[str]:
        """SIGTERM the whole group (CLI, uvicorn, its workers), SIGKILL what is left; returns survivors."""
        with_group = lambda sig: os.killpg(self.proc.pid, sig)  # noqa: E731
        try:
            with_group(signal.SIGTERM)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            with_group(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _live_group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = _live_group_members(self.proc.pid)
        if survivors:
            with_group(signal.SIGKILL)
        return survivors


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[Server]:
    """`mlflow server` on a free local port; the test waits for it (so writers warm up meanwhile)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2",  # two server processes write one sqlite file, at half the start-up cost of 4
        # uvicorn kills (and restarts, forever) a worker that misses a 5 s health ping: on a busy box a
        # worker still importing mlflow does
        "--uvicorn-opts", "--timeout-worker-healthcheck 120",
    ]  # fmt: skip
    # no server-side job runner: the pipeline uses none, and it is 7 more processes (huey consumers)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log, root)
    try:
        yield server
    finally:
        survivors = server.stop()
        assert not survivors, f"mlflow server processes outlived SIGTERM and were killed: {survivors}"


def _write(uri: str, writer: int, barrier) -> None:
    """One train stage's logging, in its own process: what pipeline/train.py and run_cv do through
    Tracker, minus the training. All writers pass the barrier together, so that they also race to
    create the experiment."""
    barrier.wait(timeout=START_TIMEOUT_S + 60)
    model = f"model{writer}"
    tracker = Tracker(
        uri, EXPERIMENT, run_name=model, params={"model": model, "train.lr": 0.003},
        tags={"dataset": "synthetic", "model": model},
    )  # fmt: skip
    if tracker.client is None:
        raise SystemExit(f"writer {writer}: Tracker went untracked at {uri} (see its stderr above)")
    for fold in range(FOLDS):
        with tracker.child(fold, 0, {"fold": fold, "seed": 0, "config_hash": f"{writer}-{fold}"}) as log:
            for step in range(STEPS):
                log({name: (writer + fold + i) / (step + 1) for i, name in enumerate(METRICS)}, step)
    tracker.finish()


def _open(uri: str, writer: int, barrier) -> None:
    """Only what a train stage does first: open the store, the experiment and a parent run."""
    barrier.wait(timeout=START_TIMEOUT_S)
    if Tracker(uri, EXPERIMENT, run_name=f"model{writer}", params={}, tags={}).client is None:
        raise SystemExit(f"writer {writer}: Tracker went untracked at {uri} (see its stderr above)")


def _start_writers(
    uri: str, target=_write, count: int = WRITERS
) -> tuple[list[multiprocessing.Process], object]:
    """`count` processes running `target`, blocked on a barrier the caller passes last. forkserver with
    mlflow preloaded: separate processes with their own clients and connections, without 8 imports of
    mlflow (~3 s CPU each) competing for 2 cores as spawn would."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "medfusion.training.tracking",
            "mlflow.tracking",
            "mlflow.entities",
            "mlflow.store.tracking.sqlalchemy_store",
        ]
    )
    barrier = ctx.Barrier(count + 1)
    procs = [ctx.Process(target=target, args=(uri, w, barrier), name=f"writer{w}") for w in range(count)]
    for proc in procs:
        proc.start()
    return procs, barrier


def _join(procs: list[multiprocessing.Process], timeout: float = 240) -> dict[str, int | None]:
    """{process name: exit code} of the writers that failed (or hung, then killed)."""
    for proc in procs:
        proc.join(timeout=timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {p.name: p.exitcode for p in procs if p.exitcode != 0}


def _arrived(client, experiment_id: str) -> tuple[dict, dict]:
    """{parent name: parent run}, {(parent name, child name): {metric: sorted steps}} as stored."""
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    steps = {}
    for run in runs:
        parent = parents.get(run.data.tags.get("mlflow.parentRunId"))
        if parent is None:
            continue
        key = (parent.info.run_name, run.info.run_name)
        steps[key] = {
            m: sorted(x.step for x in client.get_metric_history(run.info.run_id, mlflow_name(m)))
            for m in METRICS
        }
        assert run.info.status == "FINISHED", f"child run {key} is {run.info.status}, expected FINISHED"
    by_name = {p.info.run_name: p for p in parents.values()}
    assert len(by_name) == len(parents), (
        f"duplicate parent runs: {[p.info.run_name for p in parents.values()]}"
    )
    return by_name, steps


def test_eight_concurrent_writers_lose_no_run_and_no_step(tracking_server, tmp_path):
    from mlflow.tracking import MlflowClient

    procs, barrier = _start_writers(tracking_server.uri)
    try:
        tracking_server.wait_until_up()
        barrier.wait(timeout=60)
    except BaseException:
        barrier.abort()  # the writers fail at once instead of waiting out their barrier
        raise
    finally:
        failed = _join(procs)
    assert not failed, f"writers failed (exit codes {failed}); server log:\n{tracking_server.log_tail()}"

    client = MlflowClient(tracking_server.uri)
    experiments = client.search_experiments(filter_string=f"name = '{EXPERIMENT}'")
    assert len(experiments) == 1, f"expected one experiment {EXPERIMENT!r}, found {len(experiments)}"
    parents, steps = _arrived(client, experiments[0].experiment_id)

    want_parents = {f"model{w}" for w in range(WRITERS)}
    want_children = {(f"model{w}", f"fold{f}_seed0") for w in range(WRITERS) for f in range(FOLDS)}
    want_runs, got_runs = len(want_parents) + len(want_children), len(parents) + len(steps)
    want_points = len(want_children) * len(METRICS) * STEPS
    got_points = sum(len(s) for per_run in steps.values() for s in per_run.values())
    print(f"\nruns: expected {want_runs}, arrived {got_runs}; metric points: expected {want_points}, "
          f"arrived {got_points}")  # fmt: skip
    assert set(parents) == want_parents, f"parent runs: missing {want_parents - set(parents)}"
    assert set(steps) == want_children, f"child runs: missing {sorted(want_children - set(steps))}"
    gaps = {
        (*key, m): sorted(set(range(STEPS)) ^ set(s))
        for key, per_run in steps.items()
        for m, s in per_run.items()
        if s != list(range(STEPS))
    }
    assert not gaps, f"metric histories with missing or repeated steps (expected 0..{STEPS - 1}): {gaps}"
    assert all(p.info.status == "FINISHED" and p.data.params["model"] == n for n, p in parents.items())

    # the evaluate/report stages: test metrics and a file onto a parent run, artifacts via the server
    figure = tmp_path / "curves_synthetic.png"
    figure.write_bytes(b"\x89PNG fake")
    parent_id = parents["model0"].info.run_id
    Tracker.attach(tracking_server.uri, parent_id).log_test_metrics(None, {"test_dice_blob": 0.9}, [figure])
    assert client.get_run(parent_id).data.metrics["test/dice_blob"] == 0.9
    assert [a.path for a in client.list_artifacts(parent_id)] == [figure.name]
    assert list((tracking_server.root / "mlartifacts").rglob(figure.name)), (
        "artifact not under --artifacts-destination"
    )


def test_unreachable_server_leaves_logging_untracked_and_says_so(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"  # a closed port: connections are refused
    start = time.perf_counter()
    state = tmp_path / "mlflow.json"
    tracker = Tracker(uri, EXPERIMENT, "unet", {"train.lr": 0.003}, {"dataset": "synthetic"}, state)
    with tracker.child(0, 0, {"fold": 0, "seed": 0}) as log:  # what run_cv does per (fold, seed)
        for step in range(3):
            log({"val_dice": 0.5}, step)
    tracker.finish()
    evaluate = Tracker.attach(uri, "0123456789abcdef")  # the evaluate stage, on the recorded parent
    evaluate.log_test_metrics(None, {"test_dice_blob": 0.5})
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert tracker.client is None and tracker.parent_id is None and log.run_id is None
    assert f"MLflow tracking at {uri} is unavailable" in err and "training continues untracked" in err, err
    assert evaluate.client is None and "test metrics not tracked" in err, err
    assert not state.exists(), "no parent run id may be recorded for a run that was never created"
    assert elapsed < 15, f"an unreachable server cost {elapsed:.1f} s; expected a fast fail (< 15 s)"


def test_processes_opening_a_new_sqlite_store_together_are_all_tracked(tmp_path):
    """MLflow migrates a new sqlite file's schema unguarded: without tracking.py's lock, about half
    of the processes opening it at once went untracked ("table ... already exists")."""
    for trial in range(2):
        procs, barrier = _start_writers(f"sqlite:///{tmp_path / f'trial{trial}.db'}", _open, count=4)
        try:
            barrier.wait(timeout=60)
        finally:
            failed = _join(procs, timeout=120)
        assert not failed, f"trial {trial}: writers went untracked on a new sqlite store: {failed}"


def test_losers_of_the_experiment_creation_race_join_the_winner():
    from mlflow.exceptions import MlflowException

    class _Raced:  # another process creates the experiment between our lookup and our create
        def __init__(self):
            self.lookups = 0

            self.tags = {}

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else type("Experiment", (), {"experiment_id": "7", "tags": {}})()

        def create_experiment(self, name, artifact_location=None, tags=None):
            raise MlflowException(f"Experiment(name={name}) already exists.", "RESOURCE_ALREADY_EXISTS")

        def set_experiment_tag(self, experiment_id, key, value):
            self.tags[(experiment_id, key)] = value

    raced = _Raced()
    assert _experiment_id(raced, EXPERIMENT, None) == "7"
    assert raced.tags == {
        ("7", "mlflow.experimentKind"): "custom_model_development"
    }  # the winner's, marked too


def test_experiments_open_on_their_runs_in_the_mlflow_ui(tmp_path):
    """MLflow 3 opens an experiment without mlflow.experimentKind on its GenAI traces overview."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    new = _experiment_id(client, "medfusion/new", None)
    old = client.create_experiment("medfusion/old")  # as an older version made it: no kind
    assert _experiment_id(client, "medfusion/old", None) == old
    for experiment_id in (new, old):
        tags = client.get_experiment(experiment_id).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_relative_sqlite_uri_lands_in_the_main_repo_not_the_workspace(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets in a queued experiment's temp copy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri("sqlite:///stores/m.db") == f"sqlite:///{tmp_path.resolve() / 'stores/m.db'}"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_metric_names_are_grouped_for_the_mlflow_ui():
    expected = {"train_loss": "train/loss", "val_loss": "val/loss", "val_dice": "val/dice", "lr": "train/lr",
                "seconds": "train/epoch_seconds", "drgo_seg": "drgo/seg", "test_dice_polyp": "test/dice_polyp",
                "test_ensemble_iou_polyp": "test/ensemble_iou_polyp",
                "transfer_clinic_dice_polyp": "transfer/clinic_dice_polyp", "other": "other"}  # fmt: skip
    assert {k: mlflow_name(k) for k in expected} == expected


def test_runs_record_their_dataset_source_note_and_system_metrics(tmp_path, monkeypatch):
    """What a run saw and used: the processed dataset as its input, the script as its source, the
    note of the settings that differ from the paper, and system metrics while a child trains."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    dataset = {"name": "synthetic", "digest": "a" * 36, "source": str(tmp_path / "processed")}
    tracker = Tracker(uri, EXPERIMENT, "unet", {"train.lr": 0.003}, {"dataset": "synthetic"},
                      dataset=dataset, note="Differs from the paper protocol in: train.epochs = 2")  # fmt: skip
    with tracker.child(0, 0, {"fold": 0, "seed": 0}) as log:
        log({"val_dice": 0.5}, 0)
        time.sleep(1.5)  # a few samples of the monitor
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    child = client.get_run(log.run_id)
    for run in (client.get_run(tracker.parent_id), child):
        assert run.data.tags["mlflow.note.content"].endswith("train.epochs = 2")
        assert run.data.tags["mlflow.source.name"] == "pipeline/train.py"
        (found,) = run.inputs.dataset_inputs
        assert (found.dataset.name, found.dataset.digest) == ("synthetic", "a" * 36)
        assert found.dataset.source == dataset["source"]
    assert child.data.metrics["val/dice"] == 0.5
    system = {k for k in child.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
