"""Small things several layers share, each defined once: run names, the telemetry switches, the
error that stops a training run, the one-line summary of an exception, the atomic file write and how a stage process ends. Imports nothing heavy
(no numpy, no torch), so that any stage can use it."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

# DVC, MLflow and albumentations phone home or look for updates unless told not to. The project's
# own commands (pipeline stages, `medfusion`) set these; tests and CI set them too.
TELEMETRY_OFF: dict[str, str] = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


def telemetry_off(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the TELEMETRY_OFF switches (where not set already) in `env`, or in os.environ; returns it."""
    target = os.environ if env is None else env
    for key, value in TELEMETRY_OFF.items():
        target.setdefault(key, value)
    return target


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the process's umask. (mkstemp makes
    its files 0600, which on a shared server hides reports from the other users.)"""
    try:  # Linux: read without changing it (os.umask sets as it reads, which races with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` through a temp file in the same folder and a rename:
    never half-written, and the previous file stays until the new one is complete. The file gets
    the mode a plain `open()` would give it (`plain_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, plain_file_mode())
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# per_case `run` values that are no trained run: the fold ensemble, and the same with flip TTA (eval.tta)
ENSEMBLE_RUNS = ("ensemble", "ensemble_tta")


def run_name(fold: int, seed: int) -> str:
    """The name of one cross-validation run: its folder under data/runs/<dataset>/<entry>/, its MLflow
    child run and its `run` value in per_case.csv."""
    return f"fold{fold}_seed{seed}"


class UserError(Exception):
    """A problem with the user's data, settings or command, stated in one line with what fixes it. A
    stage (`run_stage`) and the `medfusion` commands print it alone, without a traceback."""


class TrainingError(UserError, RuntimeError):
    """A training, evaluation or device problem stated with the setting that fixes it."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (a KeyError's key unquoted), or its type."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def run_stage(main: Callable[..., object]) -> NoReturn:
    """Run a pipeline stage's typer `main` as its process's whole life, and end the process without
    CPython's interpreter teardown when it succeeds.

    Tearing down an interpreter that has imported torch, torch._dynamo and MLflow (3,400 modules)
    takes 1.6-2.4 s on 2 cores (AMD EPYC, AVX2; 0.13 s this way), paid by every stage of every
    `dvc repro`. On success the process does what that teardown would have done for our purposes,
    in order: joins the threads that are not daemons, runs the atexit callbacks (MLflow's and
    torch's included), flushes stdout and stderr, and exits with status 0 through `os._exit`, as a
    multiprocessing child does. Any other ending (an error, a usage error, Ctrl-C) goes through
    Python's normal exit, and so does a stage under a profiler or a tracer (`python -m cProfile -m
    pipeline.train ...` still writes its profile). Files the stages write are closed (and renamed into place) before `main`
    returns, so nothing written depends on the teardown. A `UserError` (bad params, bad data: its
    message names the key or file and the fix) ends the stage with that line alone on stderr.
    """
    import typer

    try:
        typer.run(main)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    except UserError as err:  # the one-line message alone, not a traceback before it
        sys.exit(f"{Path(sys.argv[0]).stem or 'stage'}: {err}")  # `python -m pipeline.train`: train.py
    run_exit_callbacks = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_callbacks is None or sys.getprofile() or sys.gettrace():
        sys.exit(0)  # not CPython, or under a profiler or tracer that writes its data at the end
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    run_exit_callbacks()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
