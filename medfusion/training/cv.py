"""Cross-validated training: `run_fold` trains one (fold, seed); `run_cv` runs them all, resumably.

Layout written under out_dir (data/runs/<dataset>/<model>/):
    fold<k>_seed<s>/model.pt       best checkpoint (lowest validation loss): state_dict, model entry
                                   name, architecture (registry name), kwargs, in_channels, num_classes, image_size, fold, seed
    fold<k>_seed<s>/history.json   per-epoch train/val loss, val Dice, seconds
    fold<k>_seed<s>/result.json    completion record: config hash, best epoch, best val loss/Dice
    summary.json                   every run's result, for the evaluate stage

A run whose result.json carries the current config hash is finished and is not redone; a run
with another hash (params, split or data changed) is retrained. Runs no longer asked for are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfusion.config import Params, config_hash
from medfusion.data.augment import MixCollate
from medfusion.data.dataset import EpochSampler, SegDataset
from medfusion.data.io import read_json, write_json
from medfusion.losses import segmentation_loss
from medfusion.losses.drgo import DRGOSettings, class_frequencies
from medfusion.models import build_model, compile_model
from medfusion.seed import seed_everything, worker_init_fn
from medfusion.training.loop import (
    DRGOObjective,
    Precision,
    TrainingError,
    plain_objective,
    resolve_precision,
    train_one_epoch,
    validate,
)

LogFn = Callable[[dict[str, float], int], None]
# (fold, seed, run params) -> context manager yielding a log callback; the pipeline passes MLflow's
RunTracker = Callable[[int, int, dict[str, Any]], AbstractContextManager[LogFn]]


def run_name(fold: int, seed: int) -> str:
    return f"fold{fold}_seed{seed}"


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """torch.save through a temp file and a rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def make_loader(
    dataset: SegDataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    pin: bool,
    collate_fn: Callable[[list[dict]], dict] | None = None,
) -> DataLoader:
    """A DataLoader over `dataset`; shuffle=True (training) draws (epoch, index) pairs from an
    `EpochSampler`: call `loader.sampler.set_epoch(epoch)` before each epoch."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed) if shuffle else None,
        drop_last=shuffle and len(dataset) > batch_size,  # BatchNorm needs > 1 sample per batch
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        worker_init_fn=worker_init_fn if workers else None,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
    )


@contextlib.contextmanager
def compile_errors_explained(how: str) -> Iterator[None]:
    """torch.compile fails at the first call of a graph (no C++ compiler, an unsupported op): say
    which setting caused it and how to run without it."""
    if how == "off":
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's errors derive from it

    try:
        yield
    except BackendCompilerFailed as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"torch.compile failed (train.compile = {how!r}): {first}. Inductor needs a C++ compiler "
            "on CPU (gcc/clang) and Triton on CUDA; run with `-S train.compile=off` to train eagerly."
        ) from err


def run_fold(
    params: Params,
    dataset: str,
    model_name: str,
    processed_dir: Path,
    split: dict,
    fold: int,
    seed: int,
    out_dir: Path,
    log: LogFn,
    precision: Precision | None = None,
) -> dict:
    """Train model `model_name` on fold `fold` of `split` with seed `seed`; returns the result record.

    Adam (or AdamW), cosine annealing over train.epochs, early stopping on validation loss with
    train.patience; the best epoch's weights are kept in out_dir/model.pt.
    """
    spec = params.spec(dataset)
    t = params.train
    precision = precision or resolve_precision(t.device, t.cpu_bf16, t.channels_last)
    seed_everything(seed * 1000 + fold)
    drgo = params.uses_drgo(model_name)
    boundary = drgo and params.use_boundary(model_name)
    augment = params.augment if t.augment else None
    train_set = SegDataset(
        processed_dir, split["folds"][fold]["train"], augment=augment, seed=seed, distance=boundary
    )
    val_set = SegDataset(processed_dir, split["folds"][fold]["val"])  # never augmented
    pin = precision.device.type == "cuda"
    collate = MixCollate(augment, seed) if augment else None  # MixUp / CutMix, in the workers
    train_loader = make_loader(train_set, t.batch_size, True, t.num_workers, seed, pin, collate)
    val_loader = make_loader(val_set, params.eval.batch_size, False, t.num_workers, seed, pin)

    kwargs = params.model_kwargs(model_name, dataset)
    architecture = params.architecture(model_name)
    model = build_model(architecture, spec.in_channels, spec.num_classes, **kwargs).to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = compile_model(model, t.compile)
    optimizer_cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
        if t.scheduler == "cosine"
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    )
    scaler = torch.amp.GradScaler("cuda") if precision.amp_dtype == torch.float16 else None
    loss_fn = lambda logits, target: segmentation_loss(logits, target, params.loss.ce_weight)  # noqa: E731
    if drgo:  # METHOD.md section 2; validation (early stopping) keeps L_seg, comparable across models
        class_freq = class_frequencies(train_set.masks[train_set.indices], spec.num_classes)
        objective = DRGOObjective(
            drgo_settings(params, model_name),
            class_freq,
            params.loss.ce_weight,
            params.drgo.confidence_momentum,
            seed,
        )
    else:
        objective = plain_objective(loss_fn)  # lam L(y_a) + (1 - lam) L(y_b) on MixUp batches

    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    best = {"val_loss": float("inf"), "epoch": -1, "val_dice": float("nan")}
    epochs = tqdm(
        range(t.epochs), desc=f"{dataset}/{model_name} {run_name(fold, seed)}", unit="epoch", position=0
    )
    for epoch in epochs:
        start = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)  # order and augmentation of epoch e: f(seed, e)
        with compile_errors_explained(t.compile):
            train_loss = train_one_epoch(
                model, train_loader, optimizer, objective, precision, scaler, f"epoch {epoch + 1}"
            )
            val_loss, val_dice = validate(model, val_loader, loss_fn, precision, spec.num_classes)
        scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_dice": val_dice,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
            **(objective.epoch_terms() if drgo else {}),  # DRGO's terms, c_t and gamma, epoch means
        }
        history.append(row)
        epochs.set_postfix(
            train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_dice=f"{val_dice:.3f}"
        )
        log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch, "val_dice": val_dice}
            checkpoint = {
                "model": model_name,
                "architecture": architecture,
                "kwargs": kwargs,
                "in_channels": spec.in_channels,
                "num_classes": spec.num_classes,
                "image_size": params.data.image_size,
                "class_names": list(spec.class_names),
                "preprocess": {  # what `medfusion predict` must do to new images (see data/preprocess.py)
                    "image_size": params.data.image_size,
                    "modality": spec.modality,
                    "in_channels": spec.in_channels,
                    "kind": spec.kind,
                    "ct_window": list(params.data.ct_window),
                    "clahe_clip": params.data.clahe_clip,
                    "n4": params.data.n4,
                },
                "dataset": dataset,
                "fold": fold,
                "seed": seed,
                "epoch": epoch,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            }
            save_checkpoint(out_dir / "model.pt", checkpoint)
        elif epoch - best["epoch"] >= t.patience:
            epochs.write(f"early stop at epoch {epoch + 1}: no val loss improvement for {t.patience} epochs")
            break
    epochs.close()
    write_json(out_dir / "history.json", history)
    return {
        "fold": fold,
        "seed": seed,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_dice": best["val_dice"],
        "epochs_run": len(history),
        "train_seconds": sum(r["seconds"] for r in history),
        "device": str(precision.device),
        "compile": f"{t.compile} ({compiled} modules)" if compiled else "off",
        "amp_dtype": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else "float32",
    }


def drgo_settings(params: Params, model_name: str) -> DRGOSettings:
    """The DRGO settings entry `model_name` trains with: the `drgo` section plus its `use_boundary`."""
    d = params.drgo
    return DRGOSettings(
        use_sampling=d.use_sampling,
        use_adaptive=d.use_adaptive,
        use_boundary=params.use_boundary(model_name),
        alpha=d.alpha,
        beta=d.beta,
        delta=d.delta,
        smooth_weight=d.smooth_weight,
        gamma0=d.gamma0,
        region_size=d.region_size,
        regions_per_image=d.regions_per_image,
        tau=d.tau,
        eps=d.eps,
        importance_weights=tuple(d.importance_weights),
    )


def fold_hash(
    params: Params, dataset: str, model_name: str, processed_dir: Path, split: dict, fold: int, seed: int
) -> str:
    """What a finished run depends on: its settings, the split and the processed data."""
    meta = read_json(Path(processed_dir) / "meta.json")
    return config_hash(
        dataset,
        model_name,
        params.model_kwargs(model_name, dataset),
        params.casnet_settings(model_name) if params.architecture(model_name) == "casnet" else None,
        (params.drgo, params.drgo.confidence_momentum) if params.uses_drgo(model_name) else None,
        params.train,
        params.augment if params.train.augment else None,
        params.loss,
        params.eval,
        params.data.image_size,
        meta["sha256"],
        split["folds"][fold],
        fold,
        seed,
    )


def planned_runs(params: Params) -> Iterator[tuple[int, int]]:
    for seed in params.cv.seeds:
        for fold in range(params.cv.n_folds):
            yield fold, seed


def run_cv(
    params: Params,
    dataset: str,
    model_name: str,
    processed_dir: Path,
    split_path: Path,
    out_dir: Path,
    tracker: RunTracker,
) -> list[dict]:
    """Train every (fold, seed) of params.cv not already finished; returns all runs' results."""
    split = read_json(split_path)
    if len(split["folds"]) != params.cv.n_folds:
        raise ValueError(f"{split_path} has {len(split['folds'])} folds; cv.n_folds is {params.cv.n_folds}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {run_name(f, s) for f, s in planned_runs(params)}
    for stale in out_dir.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale)
    results = []
    for fold, seed in planned_runs(params):
        run_dir = out_dir / run_name(fold, seed)
        digest = fold_hash(params, dataset, model_name, processed_dir, split, fold, seed)
        record_path = run_dir / "result.json"
        if record_path.exists() and read_json(record_path).get("config_hash") == digest:
            print(f"{dataset}/{model_name} {run_dir.name}: finished earlier with this config, skipped")
            results.append(read_json(record_path))
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        run_params = {"fold": fold, "seed": seed, "config_hash": digest}
        with tracker(fold, seed, run_params) as log:
            result = run_fold(params, dataset, model_name, processed_dir, split, fold, seed, run_dir, log)
            result["config_hash"] = digest
            result["mlflow_run_id"] = getattr(log, "run_id", None)
            write_json(record_path, result)  # written last: the run counts as finished only now
        results.append(result)
    write_json(out_dir / "summary.json", {"dataset": dataset, "model": model_name, "runs": results})
    return results


def asdict_flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dataclasses / dicts to {'a.b': value} for tracking."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            flat.update(asdict_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
