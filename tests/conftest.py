"""Shared fixtures: tiny params, a processed synthetic dataset, telemetry off."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfusion.common import TELEMETRY_OFF

os.environ.update(TELEMETRY_OFF)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each computes on one thread. Two torch processes with
    # two OpenMP threads each on two cores spin against each other and run many times slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from medfusion.config import Params, params_from_dict, read_yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: with pytest-xdist they start at once, and the fast tests fill
    the other workers meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def raw_params() -> dict:
    return read_yaml(REPO / "params.yaml")  # YAML 1.2, as DVC and load_params read it


def tiny_raw_params() -> dict:
    raw = raw_params()
    raw["datasets"] = ["synthetic"]
    raw["data"]["image_size"] = 32
    raw["data"]["synthetic"].update(num_images=24, num_volumes=6, slices_per_volume=8)
    raw["unet"]["base_channels"] = 4
    raw["medt"]["blocks"] = [1, 2]  # the authors' [1, 2, 4, 1] needs sides that are multiples of 64
    raw["train"].update(epochs=2, batch_size=4, lr=3e-3, num_workers=0, patience=5, compile="off")
    raw["cv"].update(n_folds=2, seeds=[0])
    raw["eval"]["batch_size"] = 8
    return raw


@pytest.fixture
def tiny_params() -> Params:
    return params_from_dict(tiny_raw_params())


def replace(params: Params, section: str, **changes) -> Params:
    return dataclasses.replace(params, **{section: dataclasses.replace(getattr(params, section), **changes)})


def tiny_kwargs() -> dict[str, dict]:
    """Each registered model's tiny widths, by registry name: its params section's TINY line (the
    quickstart trains at these widths too)."""
    from medfusion.config import model_sections

    return {("casnet" if key == "model" else key): dict(cls.TINY) for key, cls in model_sections().items()}


def fp32():
    """CPU fp32, NCHW: the precision the tests compare exact numbers in."""
    import torch

    from medfusion.hardware import Precision

    return Precision(torch.device("cpu"), None, False, "fp32 fixed by the test")


def train_fold(params: Params, dataset: str, name: str, processed: Path, split: dict, fold: int, seed: int,
               out_dir: Path, log=None, precision=None, resume_key=None) -> dict:  # fmt: skip
    """run_fold of entry `name` as the pipeline resolves it from `params` (fp32 unless told)."""
    from medfusion.entries import resolve_entry, resources
    from medfusion.training.fold import run_fold

    entry = resolve_entry(params, dataset, name)
    log = log or (lambda metrics, step: None)
    return run_fold(entry, processed, split, fold, seed, out_dir, log, resources(params),
                    precision or fp32(), resume_key)  # fmt: skip


def train_folds(params: Params, dataset: str, name: str, processed: Path, split: dict, runs_dir: Path,
                folds: int = 2) -> list[dict]:  # fmt: skip
    """`train_fold` of folds 0..folds-1 with seed 0 into runs_dir/fold<k>_seed0; the runs' records."""
    from medfusion.common import run_name

    for fold in range(folds):
        train_fold(params, dataset, name, processed, split, fold, 0, runs_dir / run_name(fold, 0))
    return [{"fold": fold, "seed": 0} for fold in range(folds)]


def train_cv(params: Params, dataset: str, name: str, processed: Path, split_path: Path, out_dir: Path,
             tracker) -> list[dict]:  # fmt: skip
    """run_cv of entry `name` with params' cv, resources and executor, as the train stage calls it."""
    from medfusion.entries import resolve_entry, resources
    from medfusion.training.cv import run_cv

    entry = resolve_entry(params, dataset, name)
    return run_cv(
        entry, processed, split_path, out_dir, tracker, params.cv, resources(params), params.executor
    )


@pytest.fixture(scope="session")
def synthetic_processed(tmp_path_factory) -> tuple[Path, dict]:
    """data/processed/synthetic at 32x32 from 24 generated images, and its split (2 folds)."""
    from medfusion.data.fetch import fetch_dataset
    from medfusion.data.io import read_json
    from medfusion.data.preprocess import preprocess_dataset
    from medfusion.data.splits import make_split

    params = params_from_dict(tiny_raw_params())
    root = tmp_path_factory.mktemp("synthetic")
    fetch_dataset("synthetic", root / "raw", None, params.data.synthetic)
    preprocess_dataset("synthetic", root / "raw", root / "processed", 32)
    groups = {c["case_id"]: c["group"] for c in read_json(root / "processed" / "cases.json")}
    split = make_split(groups, "fraction", 2, 0, 0.2)
    return root / "processed", split


def epochs_checkpointed(run_dir: Path) -> int:
    """How many epochs the run's last.pt (the resume state) holds; 0 while it is absent or being written."""
    import torch

    try:
        return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["epoch"] + 1
    except (FileNotFoundError, EOFError, RuntimeError, KeyError):
        return 0


def with_key(raw: dict, path: str, value: Any = None, delete: bool = False) -> dict:
    """A deep copy of params dict `raw` with dotted key `path` set to `value` (or deleted)."""
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return raw


class RecordingTracker:
    """A run_cv tracker that records which (fold, seed) runs were started and logs nothing."""

    def __init__(self):
        self.started = []

    @contextlib.contextmanager
    def __call__(self, fold, seed, run_params):
        self.started.append((fold, seed))
        yield lambda metrics, step: None


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `payload` with HTTP Range support; `cut_after` drops the next response after that many
    bytes; `requests` records each request's Range header (None for a full request)."""

    payload = b""
    cut_after: int | None = None
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None:
            body, type(self).cut_after = body[: type(self).cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def range_server(payload: bytes, name: str) -> Iterator[tuple[str, type[RangeHandler]]]:
    """A loopback HTTP server of `payload` at /`name`: yields (url, handler class)."""
    RangeHandler.payload, RangeHandler.cut_after, RangeHandler.requests = payload, None, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{name}", RangeHandler
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_cmd(cmd: list[str], cwd: Path, env: dict, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run `cmd`; a failure shows the ends of its stdout and stderr."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def copy_repo(repo: Path) -> dict:
    """The tracked and untracked-but-not-ignored files of the repository (no reports, no dvc.lock) in
    `repo`, committed to a fresh git repository; returns the environment to run DVC there (this
    Python's bin first on PATH, MLflow's default store)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("reports/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run_cmd(cmd, repo, env)
    return env
