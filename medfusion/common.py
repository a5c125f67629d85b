"""Small things several layers share, each defined once: run names, the telemetry switches, the
error that stops a training run and the one-line summary of an exception. Imports nothing heavy
(no numpy, no torch), so that any stage can use it."""

from __future__ import annotations

import os

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


def run_name(fold: int, seed: int) -> str:
    """The name of one cross-validation run: its folder under data/runs/<dataset>/<entry>/, its MLflow
    child run and its `run` value in per_case.csv."""
    return f"fold{fold}_seed{seed}"


class TrainingError(RuntimeError):
    """A training, evaluation or device problem stated with the setting that fixes it."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (a KeyError's key unquoted), or its type."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__
