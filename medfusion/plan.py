"""What `dvc repro` will cost, before any training: `medfusion plan [-S key=value ...] [--json]`.

For the current params (with -S overrides applied as `dvc exp run -S` would), every run (dataset x
entry x fold x seed) and:
    step time   measured here: each entry's network at data.image_size, `--steps` training steps
                (forward, Dice loss, backward, Adam) after one warm-up at the precision training
                resolves on this device (medfusion.hardware), at batch min(train.batch_size, --batch)
                and scaled linearly to train.batch_size; the prediction of a sample (validation,
                test), the median of 3 forward passes at that batch.
    hours       per dataset and in all: train.epochs full epochs (an upper bound: early stopping
                ends runs sooner), each of ceil(train samples / batch) steps plus the prediction of
                its validation fold; then evaluation (every run's validation and test prediction
                again). Serial, and with the executor setting: slurm runs array_parallelism at a
                time, local processes = N runs N at a time where each has its own GPU; N processes
                sharing one CPU do not go faster than one (they divide its cores), and the plan says so.
    disk        processed arrays (samples x (channels + 1) x S x S bytes; CHASE_DB1's second
                observer adds one more) and checkpoints (model.pt, 4 bytes per parameter per run; the
                resume file last.pt, weights + Adam's two moments, exists only while a run trains).
    memory      the largest stage's expected peak, estimated (not measured): training holds the
                model, its gradients and Adam's moments (16 bytes per parameter) plus activations
                (measured: the growth of this process's peak RSS during the entry's calibration,
                scaled to the batch); evaluation holds every run's weights plus the larger of one
                case's two steps (medfusion.evaluation): the fold ensemble's sum and one run's
                probabilities at S x S (K x D x S x S, 4 + 2 bytes) beside the original-size ground
                truth (1 byte per voxel), or scoring at the original size, about 10 bytes per voxel
                (ground truth, labels and the surface distances of a noisy prediction, measured by
                benchmarks/case_memory.py); preprocessing one case's float32 voxels per worker.

Dataset sizes: the processed meta.json where preprocessing has run, else the published size of the
dataset (`PUBLISHED`), else (custom data not yet preprocessed) the plan says it cannot tell.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

from medfusion.common import UserError
from medfusion.config import Params, params_from_dict, read_yaml

# Published sizes: labelled cases, 2-D samples (images or slices), the largest case's slice count
# and in-plane size. Kvasir-SEG: 1000 images (up to 1920x1072); CHASE_DB1: 28 images of 999x960;
# PROMISE12: 50 training volumes, 1377 slices, up to 54 slices of 512x512; LiTS17 (and MSD Task03,
# the same volumes): 131 volumes, 58,638 slices, up to 987 slices of 512x512; MSD Task05: 32
# volumes, 602 slices, up to 40 of 384x384.
PUBLISHED = {
    "kvasir_seg": {"cases": 1000, "samples": 1000, "depth": 1, "size": (1072, 1920)},
    "chase_db1": {"cases": 28, "samples": 28, "depth": 1, "size": (960, 999)},
    "promise12": {"cases": 50, "samples": 1377, "depth": 54, "size": (512, 512)},
    "lits17": {"cases": 131, "samples": 58638, "depth": 987, "size": (512, 512)},
    "msd_liver": {"cases": 131, "samples": 58638, "depth": 987, "size": (512, 512)},
    "msd_prostate": {"cases": 32, "samples": 602, "depth": 40, "size": (384, 384)},
}


class PlanError(UserError, ValueError):
    """Settings the plan cannot cost (names the key or dataset and what would fix it)."""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """params.yaml's content with `-S key.path=value` overrides (values parsed as YAML), as DVC sets them."""
    from medfusion.config import parse_yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlanError(f"-S {item!r}: expected key.path=value, e.g. train.epochs=2")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise PlanError(f"-S {item!r}: {part!r} of {key!r} is not a section of params.yaml")
            node = node[part]
        node[parts[-1]] = parse_yaml(value)
    return raw


@dataclasses.dataclass(frozen=True)
class DatasetSize:
    cases: int
    samples: int
    depth: int  # slices of the largest case (1 for 2-D)
    size: tuple[int, int]  # largest original in-plane size
    source: str


def dataset_size(params: Params, name: str, processed_root: Path) -> DatasetSize:
    """The size of `name`: its processed meta.json, else the published figures, else PlanError."""
    from medfusion.data.io import read_json

    meta_path = Path(processed_root) / name / "meta.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        shapes = [info["shape"] for info in meta["cases"].values()]
        depth = max(s[0] for s in shapes) if meta["kind"] == "volume" else 1
        h = max(s[-2] for s in shapes)
        w = max(s[-1] for s in shapes)
        return DatasetSize(meta["num_cases"], meta["num_samples"], depth, (h, w), str(meta_path))
    if name in ("synthetic", "synthetic_volumes"):
        s = params.data.synthetic
        if name == "synthetic":
            return DatasetSize(s.num_images, s.num_images, 1, (96, 96), "data.synthetic")
        return DatasetSize(
            s.num_volumes,
            s.num_volumes * s.slices_per_volume,
            s.slices_per_volume,
            (96, 96),
            "data.synthetic",
        )
    if name in PUBLISHED:
        p = PUBLISHED[name]
        return DatasetSize(p["cases"], p["samples"], p["depth"], p["size"], "published size")
    raise PlanError(
        f"dataset {name!r}: its size is unknown before preprocessing; run `dvc repro preprocess@{name}` "
        "first (the plan then reads data/processed/<name>/meta.json)"
    )


def _split_fractions(params: Params, name: str, size: DatasetSize) -> tuple[float, float]:
    """(test fraction of samples, training-part fraction per fold that trains) by the dataset's test rule."""
    rule = params.spec(name).test_rule
    if rule.startswith("count:"):
        test = min(int(rule.split(":")[1]) / max(size.cases, 1), 1.0)
    elif rule.startswith("last:"):  # CHASE_DB1: the last 4 children (8 of 28 images)
        test = 8 / 28 if name == "chase_db1" else 0.2
    else:
        test = params.cv.test_fraction
    folds = params.cv.n_folds
    return test, (folds - 1) / folds


def calibrate(params: Params, entry: str, in_channels: int, num_classes: int, batch: int, steps: int) -> dict:
    """Measured seconds per training step (at `batch`) and per predicted sample, and the process's
    peak-RSS growth during it (activations), for entry `entry` at data.image_size on the device
    training resolves."""
    import torch

    from medfusion.efficiency import train_step_seconds
    from medfusion.entries import resolve_model
    from medfusion.hardware import resolve_precision
    from medfusion.inference.window import predict_probs

    t = params.train
    precision = resolve_precision(t.device, t.cpu_bf16, t.channels_last)
    size = params.data.model_size
    torch.manual_seed(0)
    model = resolve_model(params, entry, in_channels).build(in_channels, num_classes)
    parameters = sum(p.numel() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = train_step_seconds(model, in_channels, num_classes, size, batch, precision, 1, steps)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = precision.to_device(torch.randn(batch, in_channels, size, size))
    predict_probs(model, x, precision)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        predict_probs(model, x, precision)
        if precision.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    forward = sorted(times)[1] / batch  # the median of 3
    return {
        "step_s": step,
        "predict_s_per_sample": forward,
        "parameters": parameters,
        "activation_bytes": max(after - before, 0),
        "precision": precision.describe(),
        "device": precision.device.type,
    }


def make_plan(
    params: Params, processed_root: Path = Path("data/processed"), steps: int = 2, max_batch: int = 4
) -> dict:
    """The plan as a dict (what `--json` prints); see the module docstring for every estimate."""
    from medfusion.hardware import machine_summary

    sizes = {d: dataset_size(params, d, processed_root) for d in params.datasets}
    specs = {d: params.spec(d) for d in params.datasets}
    channels = max(s.in_channels for s in specs.values())
    classes = max(s.num_classes for s in specs.values())
    batch = min(params.train.batch_size, max_batch)
    scale = params.train.batch_size / batch
    entries = params.model_names
    calibration = {}
    for entry in entries:
        c = calibrate(params, entry, channels, classes, batch, steps)
        c["step_s_at_batch"] = c["step_s"] * scale
        c["activation_bytes"] = int(c["activation_bytes"] * scale)
        calibration[entry] = c
    runs_per_entry = params.cv.n_folds * len(params.cv.seeds)
    s = params.data.model_size
    rows, disk = [], 0
    peak = {"train": 0, "evaluate": 0, "preprocess": 0}
    for d in params.datasets:
        row, used = _dataset_row(params, d, sizes[d], specs[d].in_channels, calibration, classes, peak)
        rows.append(row)
        disk += used
    total = sum(r["hours_serial"] for r in rows)
    parallel, how = _parallelism(params, runs_per_entry)
    return {
        "machine": machine_summary(),
        "protocol": {
            "image_size": s,
            "epochs": params.train.epochs,
            "batch_size": params.train.batch_size,
            "folds": params.cv.n_folds,
            "seeds": list(params.cv.seeds),
            "entries": entries,
        },
        "calibration": {
            "batch": batch,
            "steps": steps,
            "scaled_to_batch": params.train.batch_size,
            "in_channels": channels,
            "num_classes": classes,
            "entries": calibration,
        },
        "datasets": rows,
        "runs": sum(r["runs"] for r in rows),
        "hours_serial": total,
        "parallel_runs": parallel,
        "parallel_how": how,
        "hours_with_executor": total / parallel,
        "disk_bytes": disk,
        "peak_memory_bytes": peak,
    }


def _dataset_row(
    params: Params, d: str, size: DatasetSize, in_channels: int, calibration: dict, classes: int, peak: dict
) -> tuple[dict, int]:
    """One dataset's line of the plan and the disk it uses; raises `peak` (bytes per stage) in place."""
    s, entries = params.data.model_size, params.model_names
    runs_per_entry = params.cv.n_folds * len(params.cv.seeds)
    test, trains = _split_fractions(params, d, size)
    train_part = size.samples * (1 - test)
    train_samples, val_samples = train_part * trains, train_part / params.cv.n_folds
    test_samples = size.samples * test
    steps_per_epoch = math.ceil(train_samples / params.train.batch_size)
    windows = 1
    if params.data.native:  # sliding windows per image at overlap 0.5 (the largest image)
        per_axis = [1 if n <= s else math.ceil((n - s) / (s // 2)) + 1 for n in size.size]
        windows = per_axis[0] * per_axis[1]
    hours, disk = 0.0, 0
    for entry in entries:
        c = calibration[entry]
        predict = c["predict_s_per_sample"] * windows
        per_run = params.train.epochs * (steps_per_epoch * c["step_s_at_batch"] + val_samples * predict)
        evaluation = runs_per_entry * (val_samples + test_samples) * predict
        hours += (runs_per_entry * per_run + evaluation) / 3600
        params_bytes = 4 * c["parameters"]
        peak["train"] = max(peak["train"], 4 * params_bytes + c["activation_bytes"])
        voxels = size.depth * size.size[0] * size.size[1]  # the largest case at its original size
        case = max(classes * size.depth * s * s * (4 + 2) + voxels, 10 * voxels)
        peak["evaluate"] = max(peak["evaluate"], runs_per_entry * params_bytes + case)
        disk += runs_per_entry * params_bytes
    pixels = s * s
    if params.data.native:  # every image in a canvas of the largest size
        pixels = (-(-size.size[0] // 16) * 16) * (-(-size.size[1] // 16) * 16)
    processed = size.samples * (in_channels + 1 + (d == "chase_db1")) * pixels
    workers = min(params.data.workers or os.cpu_count() or 1, size.cases)
    voxels = size.depth * size.size[0] * size.size[1]
    peak["preprocess"] = max(peak["preprocess"], voxels * 4 * 2 * max(workers, 1))
    row = {
        "dataset": d,
        "size_source": size.source,
        "samples": size.samples,
        "train_samples_per_run": round(train_samples),
        "test_samples": round(test_samples),
        "steps_per_epoch": steps_per_epoch,
        "runs": runs_per_entry * len(entries),
        "hours_serial": hours,
        "processed_bytes": processed,
    }
    return row, disk + processed


def _parallelism(params: Params, runs_per_entry: int) -> tuple[int, str]:
    e = params.executor
    if e.kind == "slurm":
        n = min(e.slurm.array_parallelism, runs_per_entry)
        return n, f"slurm: {n} runs of a train stage at a time (executor.slurm.array_parallelism)"
    if params.train.device.startswith("cuda") or params.train.device == "auto":
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no CUDA build
            gpus = 0
        if gpus:
            n = gpus if e.processes == 0 else min(e.processes, gpus)
            return max(n, 1), f"local: {n} runs at a time, one per GPU (executor.processes = {e.processes})"
    if e.processes > 1:
        return 1, (
            f"local on the CPU: executor.processes = {e.processes} share its cores, so the runs take as "
            "long together as one after another"
        )
    return 1, "local: one run at a time (executor.processes = 1)"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def plan_markdown(plan: dict) -> str:
    """The plan as the table `medfusion plan` prints."""
    p, c = plan["protocol"], plan["calibration"]
    lines = [
        f"# Plan: {len(p['entries'])} entries x {p['folds']} folds x {len(p['seeds'])} seeds, "
        f"{p['epochs']} epochs, batch {p['batch_size']}, {p['image_size']}x{p['image_size']}",
        "",
        f"Measured on {plan['machine']}: {c['steps']} training steps per entry after a warm-up at batch "
        f"{c['batch']}, scaled to batch {c['scaled_to_batch']}; {c['in_channels']} channels, {c['num_classes']} classes.",
        "",
        "| entry | parameters (M) | s / step | ms / predicted sample |",
        "|---|---|---|---|",
    ]
    for name, e in c["entries"].items():
        lines.append(
            f"| {name} | {e['parameters'] / 1e6:.2f} | {e['step_s_at_batch']:.3f} | {1000 * e['predict_s_per_sample']:.1f} |"
        )
    lines += [
        "",
        "| dataset | samples (source) | train samples / run | test samples | steps / epoch | runs | hours (serial) | processed data |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in plan["datasets"]:
        lines.append(
            f"| {r['dataset']} | {r['samples']} ({r['size_source']}) | {r['train_samples_per_run']} | {r['test_samples']} "
            f"| {r['steps_per_epoch']} | {r['runs']} | {r['hours_serial']:.1f} | {_gb(r['processed_bytes'])} |"
        )
    peak = plan["peak_memory_bytes"]
    lines += [
        "",
        f"In all: {plan['runs']} runs, {plan['hours_serial']:.1f} h serial (every epoch run: early stopping "
        f"shortens it), {plan['hours_with_executor']:.1f} h with the executor ({plan['parallel_how']}).",
        f"Disk: {_gb(plan['disk_bytes'])} (processed arrays and checkpoints; data/raw not counted).",
        f"Expected peak memory (estimated): training {_gb(peak['train'])}, evaluation {_gb(peak['evaluate'])}, "
        f"preprocessing {_gb(peak['preprocess'])}.",
    ]
    return "\n".join(lines) + "\n"


def load_plan_params(params_file: Path, overrides: list[str]) -> Params:
    raw: Any = read_yaml(params_file)
    return params_from_dict(apply_overrides(raw, overrides), source=f"{params_file} with -S {overrides}")
