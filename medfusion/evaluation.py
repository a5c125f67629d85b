"""Test-set evaluation of trained runs: per test case, per foreground class, per run (long table).

A test case is a 2-D image, or a whole volume rebuilt from its slice predictions (metrics on the
3-D label map). Everything is at the preprocessed resolution (data.image_size in-plane); the report
says so. Rows: dataset, model, run, case_id, class, metric, value.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfusion.data.dataset import SegDataset
from medfusion.data.io import read_json
from medfusion.metrics import case_metrics
from medfusion.models import build_model
from medfusion.training.loop import Precision, predict_probs


def load_checkpoint(path: Path, precision: Precision) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint written by `run_fold`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable medfusion checkpoint ({err})") from err
    model = build_model(
        checkpoint.get("architecture", checkpoint["model"]),
        checkpoint["in_channels"],
        checkpoint["num_classes"],
        **checkpoint["kwargs"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), checkpoint


def predict_dataset(
    model: torch.nn.Module, dataset: SegDataset, batch_size: int, precision: Precision
) -> np.ndarray:
    """Argmax label maps (N, S, S) uint8 for every sample of `dataset`, in its order."""
    preds = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        probs = predict_probs(model, torch.stack([it["image"] for it in items]), precision)
        preds.append(probs.argmax(1).numpy().astype(np.uint8))
    return np.concatenate(preds)


def group_cases(dataset: SegDataset, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per test case: the 2-D map, or the slices of a volume stacked in slice order (D, S, S)."""
    by_case: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for sample, label in zip(dataset.samples, labels, strict=True):
        by_case[sample["case_id"]].append((sample["slice"] or 0, label))
    return {c: np.stack([m for _, m in sorted(v, key=lambda t: t[0])]) for c, v in by_case.items()}


def evaluate_run(
    checkpoint_path: Path, processed_dir: Path, test_ids: list[str], batch_size: int, precision: Precision
) -> list[dict]:
    """Metric rows (case_id, class, metric, value) of one trained run on the test cases."""
    model, checkpoint = load_checkpoint(checkpoint_path, precision)
    dataset = SegDataset(processed_dir, test_ids)
    targets = group_cases(dataset, np.asarray(dataset.masks[dataset.indices]))  # reads only the test rows
    preds = group_cases(dataset, predict_dataset(model, dataset, batch_size, precision))
    class_names = read_json(Path(processed_dir) / "meta.json")["class_names"]
    rows = []
    for case_id in sorted(targets):
        for c, values in case_metrics(preds[case_id], targets[case_id], checkpoint["num_classes"]).items():
            rows += [
                {"case_id": case_id, "class": class_names[c], "metric": k, "value": v}
                for k, v in values.items()
            ]
    return rows


def summarize(per_case: pd.DataFrame) -> pd.DataFrame:
    """Mean over test cases within each run, then mean and std over runs (ddof=1; 0 for one run).

    Returns columns: dataset, model, class, metric, mean, std, runs, cases.
    """
    per_run = per_case.groupby(["dataset", "model", "run", "class", "metric"], as_index=False).agg(
        value=("value", "mean"), cases=("case_id", "nunique")
    )
    out = per_run.groupby(["dataset", "model", "class", "metric"], as_index=False).agg(
        mean=("value", "mean"), std=("value", "std"), runs=("run", "nunique"), cases=("cases", "max")
    )
    out["std"] = out["std"].fillna(0.0)
    return out
