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
from medfusion.seed import rng_states, seed_everything, set_rng_states, worker_init_fn
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


RESUME_FILE = "last.pt"  # the state after the last finished epoch; removed when the run finishes


def load_resume_state(path: Path, key: str) -> dict | None:
    """The training state in `path` if it belongs to this run (same `key`, the run's config hash);
    None (with a message) when it is missing, unreadable, or from other settings: the run starts over."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or corrupt file: only this run's progress is lost
        print(
            f"{path}: unreadable resume checkpoint ({type(err).__name__}: {err}); training this run from epoch 1"
        )
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        print(f"{path}: resume checkpoint from other settings; training this run from epoch 1")
        return None
    return state


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
    resume_key: str | None = None,
) -> dict:
    """Train model `model_name` on fold `fold` of `split` with seed `seed`; returns the result record.

    Adam (or AdamW), cosine annealing over train.epochs, early stopping on validation loss with
    train.patience; the best epoch's weights are kept in out_dir/model.pt.

    Resume: with a `resume_key` (run_cv passes the run's config hash), the complete training state
    (model, optimizer, scheduler, GradScaler, early-stopping state, history, DRGO's c_t and region
    generator, the Python/numpy/torch RNG states) is written atomically to out_dir/last.pt after every
    epoch. A rerun with the same key continues after the last finished epoch; the data order and
    augmentation are functions of (seed, epoch, index), so on CPU the result equals an uninterrupted
    run's exactly. Without a matching state the folder is cleared and training starts at epoch 1.
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

    history: list[dict[str, float]] = []
    best = {"val_loss": float("inf"), "epoch": -1, "val_dice": float("nan")}
    start_epoch, stopped = 0, False
    state = load_resume_state(out_dir / RESUME_FILE, resume_key) if resume_key else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        if drgo:
            objective.load_state_dict(state["objective"])
        history, best, stopped = state["history"], state["best"], state["stopped"]
        set_rng_states(state["rng"])
        start_epoch = state["epoch"] + 1
        print(
            f"{dataset}/{model_name} {run_name(fold, seed)}: resumed after epoch {start_epoch} of {t.epochs}"
        )
    elif resume_key:
        shutil.rmtree(out_dir, ignore_errors=True)  # another run's files must not mix with this one's
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = tqdm(
        range(start_epoch, t.epochs if not stopped else start_epoch),
        desc=f"{dataset}/{model_name} {run_name(fold, seed)}",
        unit="epoch",
        position=0,
        initial=start_epoch,
        total=t.epochs,
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
        stopped = epoch - best["epoch"] >= t.patience
        if resume_key:
            save_checkpoint(
                out_dir / RESUME_FILE,
                {
                    "key": resume_key,
                    "epoch": epoch,
                    "stopped": stopped,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "objective": objective.state_dict() if drgo else None,
                    "history": history,
                    "best": best,
                    "rng": rng_states(),
                },
            )
        if stopped:
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
    from medfusion.training.executor import run_pending  # it imports this module: not at the top

    results, pending = {}, []
    for fold, seed in planned_runs(params):
        run_dir = out_dir / run_name(fold, seed)
        digest = fold_hash(params, dataset, model_name, processed_dir, split, fold, seed)
        record_path = run_dir / "result.json"
        if record_path.exists() and read_json(record_path).get("config_hash") == digest:
            print(f"{dataset}/{model_name} {run_dir.name}: finished earlier with this config, skipped")
            results[fold, seed] = read_json(record_path)
            continue
        pending.append((fold, seed, run_dir, digest))
    # executor.train_run trains each (run_fold, then result.json), here or in submitit jobs: params.executor
    results.update(run_pending(params, dataset, model_name, processed_dir, split, pending, tracker))
    runs = [results[run] for run in planned_runs(params)]
    write_json(out_dir / "summary.json", {"dataset": dataset, "model": model_name, "runs": runs})
    return runs


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
