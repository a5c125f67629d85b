"""Figures for reports/: metric bars (the paper's Figures 5-8), qualitative overlays, learning curves.

Matplotlib's object API on the Agg canvas (no pyplot, so no global figure state and no GUI backend);
PNG without the software-version metadata, so the same inputs give the same bytes. Each function
writes its file atomically (temp file in the same folder, then os.replace) and returns the path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from medfusion.common import plain_file_mode
from medfusion.metrics import METRIC_NAMES

BAR_METRICS = ("dice", "iou", "precision", "recall")
DPI = 100


def _colors(n: int) -> list[tuple[float, float, float]]:
    palette = matplotlib.colormaps["tab10"].colors
    return [tuple(palette[i % len(palette)]) for i in range(n)]


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` as PNG to `path` through a temp file and a rename; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, plain_file_mode())  # readable as a plain open() would make it, not mkstemp's 0600
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def metric_bars(
    summary: pd.DataFrame,
    dataset: str,
    models: Sequence[str],
    path: Path,
    metrics: Sequence[str] = BAR_METRICS,
    title: str | None = None,
) -> Path:
    """Grouped bars with error bars, like the paper's Figures 5-8: metrics on the x axis, one bar per
    model, height = mean over runs of each run's mean over test cases, error bar = std over runs (%).

    Args:
        summary: `medfusion.report.summarize_runs(per_case)`; only its "runs" rows of `dataset` are used.
        dataset: the dataset drawn; one panel per foreground class.
        models: the models drawn, in this order (absent ones are skipped).
        path: the PNG written.
        metrics: overlap metrics in [0, 1], drawn in %.
        title: figure title (default: the dataset name).
    """
    rows = summary[(summary["dataset"] == dataset) & (summary["metric"].isin(metrics))]
    if "estimate" in rows:
        rows = rows[rows["estimate"] == "runs"]
    classes = list(dict.fromkeys(rows["class"])) or ["(none)"]
    present = [m for m in models if m in set(rows["model"])]
    fig = Figure(figsize=(max(6.0, 1.2 * len(metrics) * max(1, len(present)) / 3), 3.6 * len(classes)))
    axes = fig.subplots(len(classes), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(present))
    x = np.arange(len(metrics))
    for ax, cls in zip(axes, classes, strict=True):
        for i, (model, color) in enumerate(zip(present, _colors(len(present)), strict=True)):
            cell = rows[(rows["class"] == cls) & (rows["model"] == model)].set_index("metric")
            mean = [100 * cell["mean"].get(m, np.nan) for m in metrics]
            std = [100 * cell["std"].get(m, np.nan) for m in metrics]
            ax.bar(x + (i - (len(present) - 1) / 2) * width, mean, width, yerr=std, capsize=2,
                   color=color, label=model)  # fmt: skip
        ax.set_xticks(x, [METRIC_NAMES.get(m, m) for m in metrics])
        ax.set_ylim(0, 100)
        ax.set_ylabel("%  (mean ± std over runs)")
        ax.set_title(f"{title or dataset}: {cls}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.set_layout_engine("constrained")
    if present:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", fontsize=7,
                   ncol=min(5, len(present)))  # fmt: skip
    return save_figure(fig, path)


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 or float -> (H, W, 3) float in [0, 1]: RGB for 3 channels, else channel 0 in grey.

    uint8 is divided by 255; float already in [0, 1] is kept; any other float (z-scored) is min-max scaled.
    """
    raw = np.asarray(image)
    image = raw.astype(float) / 255 if raw.dtype == np.uint8 else raw.astype(float)
    if image.ndim == 2:
        image = image[None]
    image = image[:3] if image.shape[0] == 3 else image[:1]
    if image.size and (image.max() > 1 or image.min() < 0):
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.repeat(image, 3, axis=0).transpose(1, 2, 0) if image.shape[0] == 1 else image.transpose(1, 2, 0)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) in [0, 1]: `image` (C, H, W) with each foreground class of `labels` (H, W) tinted in its colour."""
    rgb = _display(image).copy()
    labels = np.asarray(labels)
    for c, color in zip(range(1, int(labels.max(initial=0)) + 1), _class_colors(), strict=False):
        mask = labels == c
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color)
    return rgb


def _class_colors() -> list[tuple[float, float, float]]:
    return [to_rgb(c) for c in ("#00ff00", "#ff00ff", "#ffff00", "#00ffff", "#ff8000", "#0080ff")]


def qualitative_grid(
    cases: Sequence[Mapping], models: Sequence[str], path: Path, panel_size: float = 1.8
) -> Path:
    """One PNG grid: a row per case, columns image, ground truth, then each model's prediction.

    Predictions and ground truth are drawn as tinted overlays with the ground truth's outline in
    white on every prediction, so misses and false positives show against it.

    Args:
        cases: per case a mapping with "case_id", "image" (C, H, W) uint8 or float, "target" (H, W)
            labels and "preds" {model: (H, W) labels}.
        models: the prediction columns, in order (a model missing for a case leaves its panel blank).
        path: the PNG written.
        panel_size: inches per panel.
    """
    columns = ["image", "ground truth", *models]
    fig = Figure(figsize=(panel_size * len(columns), panel_size * max(1, len(cases))))
    axes = fig.subplots(max(1, len(cases)), len(columns), squeeze=False)
    for row, case in zip(axes, cases, strict=False):
        target = np.asarray(case["target"])
        panels = [_display(case["image"]), overlay(case["image"], target)]
        panels += [overlay(case["image"], case["preds"][m]) if m in case["preds"] else None for m in models]
        for col, (ax, panel) in enumerate(zip(row, panels, strict=True)):
            if panel is not None:
                ax.imshow(panel, interpolation="nearest")
                if col >= 2 and target.any():
                    ax.contour(target > 0, levels=[0.5], colors="white", linewidths=0.6)
        row[0].set_ylabel(str(case.get("case_id", "")), fontsize=7)
    for ax, name in zip(axes[0], columns, strict=True):
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.set_layout_engine("constrained")
    return save_figure(fig, path)


def _mean_band(runs: Sequence[Sequence[Mapping]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over the runs that reached each epoch (early stopping ends runs at different epochs)."""
    values: dict[int, list[float]] = {}
    for history in runs:
        for entry in history:
            if key in entry and entry[key] is not None and np.isfinite(entry[key]):
                values.setdefault(int(entry["epoch"]), []).append(float(entry[key]))
    epochs = np.array(sorted(values))
    mean = np.array([np.mean(values[e]) for e in epochs])
    std = np.array([np.std(values[e], ddof=1) if len(values[e]) > 1 else 0.0 for e in epochs])
    return epochs, mean, std


def learning_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping]]], path: Path, title: str | None = None
) -> Path:
    """Train and validation loss, and validation Dice, against epoch: per model the mean over its runs
    (folds x seeds) with a ± std band.

    Args:
        histories: {model: [run history, ...]}, a history being a list of {"epoch", "train_loss",
            "val_loss", "val_dice"} dicts (missing keys or NaN values are skipped).
        path: the PNG written.
        title: figure title.
    """
    fig = Figure(figsize=(10, 3.8))
    loss_ax, dice_ax = fig.subplots(1, 2)
    for (model, runs), color in zip(histories.items(), _colors(len(histories)), strict=True):
        for ax, key, style, label in (
            (loss_ax, "train_loss", "-", f"{model} train"),
            (loss_ax, "val_loss", "--", f"{model} val"),
            (dice_ax, "val_dice", "-", model),
        ):
            epochs, mean, std = _mean_band(runs, key)
            if len(epochs):
                ax.plot(epochs, mean, style, color=color, label=label, linewidth=1.2)
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (mean ± std over runs)")
    dice_ax.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice (mean ± std over runs)")
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title)
    fig.set_layout_engine("constrained")
    return save_figure(fig, path)
