"""The checkpoint format in one place: what `model.pt` holds (CHECKPOINT_KEYS and the run's record,
`entries.Entry.checkpoint_record`), how it is written (`save_checkpoint`: atomically) and how it is
read back and checked (`load_checkpoint`: weights_only, every refusal naming the file). Training
writes it; evaluation, `medfusion predict`, `medfusion evaluate` and the MLflow model read it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medfusion.common import UserError, first_line
from medfusion.hardware import Precision
from medfusion.models import build_model


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """torch.save through a temp file and a rename: a crash (or a full disk) never leaves a half-written
    checkpoint, and the previous one stays in place until the new one is complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(
                err.errno, f"cannot write checkpoint {path} ({err.strerror or err}); the previous one is kept"
            ) from err
        raise


class CheckpointError(UserError, ValueError):
    """A model.pt that cannot be used: names the file and what is wrong with it."""


CHECKPOINT_KEYS = ("model", "kwargs", "in_channels", "num_classes", "state_dict")


def weights_mismatch(expected: dict, found: dict) -> str:
    """What differs between a model's state_dict (`expected`) and a checkpoint's (`found`); "" if they fit."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        (k, tuple(getattr(found[k], "shape", ())), tuple(v.shape))
        for k, v in expected.items()
        if k in found and tuple(getattr(found[k], "shape", ())) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the file (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the model does not have (e.g. {unexpected[0]!r})")
    if shapes:
        key, in_file, in_model = shapes[0]
        parts.append(
            f"{len(shapes)} weight(s) of another shape (e.g. {key!r}: {in_file} in the file, {in_model} in the model)"
        )
    return "; ".join(parts)


def load_checkpoint(path: Path, precision: Precision) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint written by `run_fold`.

    Raises:
        CheckpointError: naming the file: unreadable (truncated, corrupt), not a medfusion checkpoint,
            or weights that do not fit the model its record describes (another model's file, or other
            widths / classes / channels).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint; expected a model.pt written by training (train the run first)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a readable medfusion checkpoint ({type(err).__name__}: {first_line(err)}); "
            "the file is truncated or corrupt (an interrupted copy, a full disk?): restore it or retrain the run"
        ) from err
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else None
    if missing is None or missing:
        if not isinstance(checkpoint, dict):
            found = f"a {type(checkpoint).__name__}"
        elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            found = f"only weights (a bare state_dict of {len(checkpoint)} tensors)"
        else:
            keys = list(checkpoint)
            found = f"keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
        raise CheckpointError(
            f"{path}: not a medfusion checkpoint: no {missing or list(CHECKPOINT_KEYS)}; it holds {found}. "
            "Expected a model.pt written by medfusion training (data/runs/<dataset>/<model>/fold*/model.pt)"
        )
    architecture = checkpoint.get("architecture", checkpoint["model"])
    described = (
        f"{architecture} {checkpoint['kwargs']} with {checkpoint['in_channels']} input channel(s) and "
        f"{checkpoint['num_classes']} classes"
    )
    try:
        model = build_model(
            architecture, checkpoint["in_channels"], checkpoint["num_classes"], **checkpoint["kwargs"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot build the model it records, {described}: {first_line(err)}"
        ) from err
    state = checkpoint["state_dict"]
    problem = weights_mismatch(model.state_dict(), state) if isinstance(state, dict) else "no weights dict"
    if problem:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its record describes ({described}): {problem}. "
            "The file was written by another model or with other settings (widths, classes, channels)"
        )
    model.load_state_dict(state)
    model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), checkpoint


def check_fits_data(path: Path, checkpoint: dict, meta: dict, processed_dir: Path) -> None:
    """A checkpoint must have been trained on data like `processed_dir`'s: same classes and channels."""
    theirs = (len(meta["class_names"]), meta["in_channels"])
    ours = (checkpoint["num_classes"], checkpoint["in_channels"])
    if ours != theirs:
        raise CheckpointError(
            f"{path}: trained for {ours[0]} classes from {ours[1]} channel(s), but {processed_dir} has "
            f"{theirs[0]} classes and {theirs[1]} channel(s): the run belongs to another dataset, or "
            "data/processed was rebuilt after training (rerun the train stage)"
        )
