"""Hyperparameter sensitivity (paper section 4.1: learning rate, batch size, loss weights) from DVC
experiments: a grid queued with `dvc exp run --queue`, run by `dvc queue start`, turned into a table
and a figure by `medfusion sensitivity report`.

A grid file (profiles/<name>.yaml) holds
    base_profile: the profile whose overrides every experiment starts from (e.g. cpu-budget);
    params:       fixed overrides on top of it (the datasets, entries, folds and seeds of the grid);
    grid:         {key: [values]}, varied one key at a time around the base value (the value the
                  base profile, or params.yaml, gives the key; it must be one of the values).

Each experiment is named `<grid>-<key>-<value>` (one more, `<grid>-base`, at every base value), so
the report finds them again by name among the repository's experiments (refs/exps/..., as DVC keeps
them), whichever commit they were run from. For each experiment it reads the experiment commit's
params.yaml and reports/summary.csv (git-tracked: cache: false), so the spread over runs (folds x
seeds) is the std that the pipeline's own summary holds. Memory: one experiment's summary at a time.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medfusion.config import read_yaml
from medfusion.reproduce import ProfileError, experiment_refs, load_profile, override_value, profile_path

COLUMNS = ["key", "value", "base", "experiment", "dataset", "model", "class", "metric", "mean", "std", "runs"]


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", override_value(value)).strip("_")


def _merged(overrides: list[str]) -> list[str]:
    """`key=value` overrides with each key once, the last one winning (`dvc exp run -S` takes a key once)."""
    merged: dict[str, str] = {}
    for o in overrides:
        key, value = o.split("=", 1)
        merged.pop(key, None)
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def load_grid(root: Path, name: str, data_root: Path | None = None) -> dict:
    """The grid `name`: {"name", "overrides" (base profile's, then the grid's params), "base"
    ({key: base value}), "experiments" ([{"name", "key", "value", "overrides"}])}.

    Raises:
        ProfileError: no such file, no grid, or a base value that is not among its key's values.
    """
    path = profile_path(root, name)
    raw = read_yaml(path) or {}
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ProfileError(f"{path}: expected a `grid:` mapping of dotted keys to lists of values")
    overrides = (
        load_profile(root, raw["base_profile"], data_root)["overrides"] if raw.get("base_profile") else []
    )
    overrides = _merged(
        [*overrides, *(f"{k}={override_value(v)}" for k, v in (raw.get("params") or {}).items())]
    )
    from medfusion.plan import apply_overrides

    params = apply_overrides(read_yaml(root / "params.yaml"), overrides)
    base = {}
    for key, values in grid.items():
        try:
            base[key] = _get(params, key)
        except KeyError:
            raise ProfileError(f"{path}: grid key {key!r} is not a key of params.yaml") from None
        if base[key] not in values:
            raise ProfileError(
                f"{path}: grid {key} = {values} does not hold the base value {base[key]!r}; add it, so that "
                "every key is varied around the same experiment"
            )
    stem = path.stem
    experiments = [{"name": f"{stem}-base", "key": None, "value": None, "overrides": overrides}]
    for key, values in grid.items():
        for value in values:
            if value != base[key]:
                experiments.append(
                    {
                        "name": f"{stem}-{_slug(key).replace('.', '_')}-{_slug(value)}",
                        "key": key,
                        "value": value,
                        "overrides": _merged([*overrides, f"{key}={override_value(value)}"]),
                    }
                )
    fixed = {
        "profile": raw.get("base_profile"),
        "params": [f"{k}={override_value(v)}" for k, v in (raw.get("params") or {}).items()],
    }
    return {
        "name": stem,
        "path": path,
        "overrides": overrides,
        "base": base,
        "experiments": experiments,
        "fixed": fixed,
    }


def queue_commands(grid: dict) -> list[list[str]]:
    """The `dvc exp run --queue` command of every experiment of `grid`."""
    return [
        ["dvc", "exp", "run", "--queue", "-n", e["name"], *[a for o in e["overrides"] for a in ("-S", o)]]
        for e in grid["experiments"]
    ]


def _show(root: Path, commit: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def sensitivity_frame(root: Path, grid: dict, metric: str = "dice") -> tuple[pd.DataFrame, list[str]]:
    """Per finished experiment of `grid` and (dataset, model, class): its `metric`, mean ± std over
    runs (the experiment's reports/summary.csv, estimate "runs", post-processed). The base experiment
    appears once per key (as that key's base value). -> (frame of COLUMNS, the experiments not found)."""
    refs, rows, missing = experiment_refs(root), [], []
    for e in grid["experiments"]:
        commit = refs.get(e["name"])
        text = None if commit is None else _show(root, commit, "reports/summary.csv")
        if text is None:
            missing.append(e["name"])
            continue
        params = yaml.safe_load(_show(root, commit, "params.yaml") or "{}")
        summary = pd.read_csv(io.StringIO(text))
        summary = summary[(summary["metric"] == metric) & (summary.get("estimate", "runs") == "runs")]
        keys = list(grid["base"]) if e["key"] is None else [e["key"]]
        for key in keys:
            value = _get(params, key) if params else (grid["base"][key] if e["key"] is None else e["value"])
            for r in summary.to_dict("records"):
                rows.append({"key": key, "value": value, "base": value == grid["base"][key], "experiment": e["name"],
                             "dataset": r["dataset"], "model": r["model"], "class": r["class"], "metric": metric,
                             "mean": float(r["mean"]), "std": float(r["std"]), "runs": int(r["runs"])})  # fmt: skip
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["value"] = pd.Series([r["value"] for r in rows], dtype=object)  # 16 stays 16 beside 0.001
    if not frame.empty:
        frame = frame.sort_values(
            ["key", "dataset", "model", "class", "value"], kind="stable", ignore_index=True
        )
    return frame, missing


def sensitivity_markdown(frame: pd.DataFrame, grid: dict, missing: list[str], metric: str = "dice") -> str:
    """The sensitivity table: per key, its values (one at a time, every other key at its base value)."""
    lines = [
        f"# Hyperparameter sensitivity (`{grid['name']}`)",
        "",
        f"{metric.upper() if metric == 'hd95' else metric.capitalize()} per setting: each key varied alone, every "
        "other key at its base value (marked *); mean ± std over the runs (folds x seeds) of each run's mean "
        "over the test cases, post-processed, as in the experiment's reports/summary.csv. Settings chosen "
        "before any test number was seen; nothing is selected on the test split from this table.",
        "",
        f"Every experiment: the `{grid['fixed']['profile']}` profile (profiles/{grid['fixed']['profile']}.yaml), then "
        + " ".join(f"`{o}`" for o in grid["fixed"]["params"])
        + f" ({grid['path'].name}).",
        "",
    ]
    if missing:
        lines += [f"Not finished (no experiment with its outputs): {', '.join(missing)}.", ""]
    if frame.empty:
        lines.append("No experiment of this grid has finished: `dvc queue start`, then rerun this report.")
        return "\n".join(lines) + "\n"
    scale = 1.0 if metric in ("hd95", "assd") else 100.0
    lines += [
        "| key | value | dataset | model | class | mean | std | runs | experiment |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in frame.to_dict("records"):
        mark = " *" if r["base"] else ""
        lines.append(
            f"| {r['key']} | {override_value(r['value'])}{mark} | {r['dataset']} | {r['model']} | {r['class']} | "
            f"{scale * r['mean']:.2f} | {scale * r['std']:.2f} | {r['runs']} | {r['experiment']} |"
        )
    return "\n".join(lines) + "\n"


def sensitivity_figure(frame: pd.DataFrame, path: Path, metric: str = "dice") -> Path:
    """One panel per key: the metric against the key's value (log axis where the values span 10x or
    more), error bars = std over runs, one line per (dataset, model, class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfusion.common import atomic_write

    keys = list(dict.fromkeys(frame["key"]))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.6 * max(len(keys), 1), 3.2), squeeze=False)
    scale = 1.0 if metric in ("hd95", "assd") else 100.0
    for ax, key in zip(axes[0], keys, strict=False):
        part = frame[frame["key"] == key]
        for (dataset, model, cls), line in part.groupby(["dataset", "model", "class"], sort=False):
            x = [float(v) for v in line["value"]]
            ax.errorbar(x, scale * line["mean"], yerr=scale * line["std"], marker="o", capsize=3,
                        label=f"{model} {dataset} {cls}")  # fmt: skip
            base = line[line["base"]]
            ax.scatter(
                [float(v) for v in base["value"]],
                scale * base["mean"],
                s=90,
                facecolors="none",
                edgecolors="k",
            )
        values = [float(v) for v in part["value"]]
        if min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
            ax.minorticks_off()
        ticks = sorted(set(values))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # the grid's own values, not the axis' round ones
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} ({'%' if scale == 100 else 'unit'})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path
