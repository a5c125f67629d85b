"""One cross-validation run: `run_fold(entry, ...)` trains an entry on one (fold, seed).

Files written in the run's folder (data/runs/<dataset>/<entry>/fold<k>_seed<s>/):
    model.pt       the best checkpoint (lowest validation loss): the entry's checkpoint record
                   (model entry name, architecture, kwargs, in_channels, num_classes, image size,
                   class names, preprocessing, dataset), fold, seed, epoch and state_dict
    history.json   {"precision": how it computed, "compile": ..., "epochs": per-epoch rows of
                   train/val loss, val Dice, lr, seconds and DRGO's terms}
    last.pt        the full training state after the last finished epoch (resume); removed by the
                   caller when the run is recorded finished

Memory: the loaders read the memory-mapped processed arrays sample by sample; the class
frequencies are counted in chunks. What a run holds grows with the batch and the model, not with
the dataset.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfusion.common import TrainingError, first_line, run_name
from medfusion.data.augment import MixCollate
from medfusion.data.dataset import EpochSampler, SegDataset
from medfusion.data.io import write_json
from medfusion.entries import Entry, Resources
from medfusion.hardware import Precision, resolve_compile, resolve_precision
from medfusion.inference.checkpoint import save_checkpoint
from medfusion.losses import segmentation_loss
from medfusion.losses.drgo import class_frequencies, smoothed_frequencies
from medfusion.models import compile_model
from medfusion.seed import rng_states, seed_everything, set_rng_states, worker_init_fn
from medfusion.training.loop import (
    DRGOObjective,
    Objective,
    inside_roi,
    plain_objective,
    train_one_epoch,
    validate,
)

LogFn = Callable[[dict[str, float], int], None]
RESUME_FILE = "last.pt"  # the state after the last finished epoch; removed when the run finishes


def load_resume_state(path: Path, key: str) -> dict | None:
    """The training state in `path` if it belongs to this run (same `key`, the run's config hash);
    None (with a message) when it is missing, unreadable, or from other settings: the run starts over."""
    if not path.exists():
        return None
    try:  # tensors and plain data only: a resume file from a shared remote must not run code when read
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        what = found[0].split(" was not")[0] if found else type(err).__name__
        print(
            f"{path}: resume checkpoint refused: it holds objects other than tensors and plain data "
            f"({what}), which unpickling would run as code; training this run from epoch 1"
        )
        return None
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
        raise TrainingError(
            f"torch.compile failed (train.compile = {how!r}): {first_line(err)}. Inductor needs a C++ "
            "compiler on CPU (gcc/clang) and Triton on CUDA; run with `-S train.compile=off` to train eagerly."
        ) from err


@dataclass
class Trainer:
    """A run's parts, made by `build_trainer`: the model, its optimisation, loaders and objective."""

    entry: Entry
    precision: Precision
    compile: str  # what train.compile resolved to
    compile_reason: str
    compiled: int  # modules compiled
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    objective: Objective
    val_loss: Callable  # L_seg: early stopping means the same for every entry
    train_loader: DataLoader
    val_loader: DataLoader


@dataclass
class Progress:
    """The part of a run's state that the epochs advance; saved in last.pt with the rest."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(
        default_factory=lambda: {"val_loss": float("inf"), "epoch": -1, "val_dice": float("nan")}
    )
    start_epoch: int = 0
    stopped: bool = False


def build_loaders(
    entry: Entry, processed_dir: Path, fold_split: dict, seed: int, resources: Resources, pin: bool
) -> tuple[DataLoader, DataLoader]:
    """Training loader (augmented, with d(x) where the loss needs it, MixUp/CutMix in the workers) and
    validation loader (never augmented)."""
    train_set = SegDataset(
        processed_dir,
        fold_split["train"],
        augment=entry.augment,
        seed=seed,
        distance=entry.boundary,
        patch_size=entry.patch_size,
        roi=entry.roi_loss,
    )
    val_set = SegDataset(processed_dir, fold_split["val"], roi=entry.roi_loss)
    collate = MixCollate(entry.augment, seed) if entry.augment else None
    workers = resources.num_workers
    train = make_loader(train_set, entry.recipe.batch_size, True, workers, seed, pin, collate)
    # native images differ in size: validated one at a time, by sliding window
    val = make_loader(val_set, 1 if val_set.native else resources.eval_batch_size, False, workers, seed, pin)
    return train, val


def native_class_frequencies(dataset: SegDataset, num_classes: int) -> torch.Tensor:
    """`class_frequencies` of a native dataset over each image's own area (not its canvas padding)."""
    import numpy as np

    counts = np.zeros(num_classes, dtype=np.int64)
    for j, (h, w) in zip(dataset.indices, dataset.sizes, strict=True):
        counts += np.bincount(dataset.mask_rows.row(j)[:h, :w].ravel(), minlength=num_classes)[:num_classes]
    return smoothed_frequencies(counts)


def build_trainer(
    entry: Entry,
    processed_dir: Path,
    fold_split: dict,
    seed: int,
    resources: Resources,
    precision: Precision | None = None,
) -> Trainer:
    """The model (channels_last and compiled as resolved), Adam/AdamW, cosine or constant schedule,
    a GradScaler under CUDA fp16, the loaders and the objective: DRGO (METHOD.md section 2) for entries
    trained with it, else L_seg (with MixUp's lam-weighted pair of terms)."""
    r = entry.recipe
    precision = precision or resolve_precision(r.device, r.cpu_bf16, r.channels_last)
    how, reason = resolve_compile(r.compile, precision)
    train_loader, val_loader = build_loaders(
        entry, processed_dir, fold_split, seed, resources, precision.device.type == "cuda"
    )
    model = entry.build()
    if entry.pretrained:  # the encoder from a standard file (medfusion/models/pretrained.py)
        from medfusion.models.pretrained import load_pretrained

        counts = load_pretrained(model, entry.architecture, entry.pretrained)
        print(f"{entry.name}: encoder from {entry.pretrained} ({counts['loaded']} tensors)")
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = compile_model(model, how)
    optimizer_cls = torch.optim.Adam if r.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    if r.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=r.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    scaler = torch.amp.GradScaler("cuda") if precision.amp_dtype == torch.float16 else None

    def val_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if entry.roi_loss:  # the masks mark the outside of the field of view (SegDataset(roi=True))
            logits, target = inside_roi(logits, target)
        return segmentation_loss(logits, target, entry.ce_weight)

    if entry.drgo is not None:
        train_set = train_loader.dataset
        freq = (
            native_class_frequencies(train_set, entry.num_classes)
            if train_set.native
            else class_frequencies(train_set.mask_rows, entry.num_classes, train_set.indices)
        )
        objective: Objective = DRGOObjective(entry.drgo, freq, entry.ce_weight, seed, entry.roi_loss)
    else:
        objective = plain_objective(val_loss)
    return Trainer(
        entry, precision, how, reason, compiled, model, optimizer, scheduler, scaler, objective,
        val_loss, train_loader, val_loader,
    )  # fmt: skip


def resume(trainer: Trainer, out_dir: Path, key: str | None, where: str) -> Progress:
    """The progress to continue from: last.pt's when it belongs to this run (`key`), restoring the
    model, optimizer, scheduler, scaler, DRGO state and random generators; else a fresh start (and,
    with a key, an emptied folder: another run's files must not mix with this one's)."""
    state = load_resume_state(out_dir / RESUME_FILE, key) if key else None
    if state is None:
        if key:
            shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        return Progress()
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    if isinstance(trainer.objective, DRGOObjective):
        trainer.objective.load_state_dict(state["objective"])
    set_rng_states(state["rng"])
    progress = Progress(state["history"], state["best"], state["epoch"] + 1, state["stopped"])
    print(f"{where}: resumed after epoch {progress.start_epoch} of {trainer.entry.recipe.epochs}")
    return progress


def train_epoch(trainer: Trainer, epoch: int) -> dict[str, float]:
    """One epoch of training and validation; its history row."""
    start = time.perf_counter()
    trainer.train_loader.sampler.set_epoch(epoch)  # order and augmentation of epoch e: f(seed, e)
    with compile_errors_explained(trainer.compile):
        train_loss = train_one_epoch(
            trainer.model,
            trainer.train_loader,
            trainer.optimizer,
            trainer.objective,
            trainer.precision,
            trainer.scaler,
            f"epoch {epoch + 1}",
        )
        val_loss, val_dice = validate(
            trainer.model,
            trainer.val_loader,
            trainer.val_loss,
            trainer.precision,
            trainer.entry.num_classes,
            trainer.entry.patch_size,
        )
    trainer.scheduler.step()
    terms = trainer.objective.epoch_terms() if isinstance(trainer.objective, DRGOObjective) else {}
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_dice": val_dice,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - start,
        **terms,  # DRGO's terms, c_t and gamma, epoch means
    }


def save_best(trainer: Trainer, out_dir: Path, fold: int, seed: int, epoch: int) -> None:
    state = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    record = {**trainer.entry.checkpoint_record(), "fold": fold, "seed": seed, "epoch": epoch}
    save_checkpoint(out_dir / "model.pt", {**record, "state_dict": state})


def save_resume_state(trainer: Trainer, out_dir: Path, key: str, epoch: int, progress: Progress) -> None:
    objective = trainer.objective
    save_checkpoint(
        out_dir / RESUME_FILE,
        {
            "key": key,
            "epoch": epoch,
            "stopped": progress.stopped,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "objective": objective.state_dict() if isinstance(objective, DRGOObjective) else None,
            "history": progress.history,
            "best": progress.best,
            "rng": rng_states(),
        },
    )


def computed_how(trainer: Trainer) -> dict[str, str]:
    """How the run computed: the resolved precision and compile setting with their reasons."""
    p = trainer.precision
    return {
        "device": p.device.type,
        "amp_dtype": p.dtype_name,
        "channels_last": str(p.channels_last).lower(),
        "precision_reason": p.reason,
        "compile": f"{trainer.compile} ({trainer.compiled} modules)" if trainer.compiled else "off",
        "compile_reason": trainer.compile_reason,
    }


def run_fold(
    entry: Entry,
    processed_dir: Path,
    split: dict,
    fold: int,
    seed: int,
    out_dir: Path,
    log: LogFn,
    resources: Resources | None = None,
    precision: Precision | None = None,
    resume_key: str | None = None,
) -> dict:
    """Train `entry` on fold `fold` of `split` with seed `seed`; returns the result record.

    Adam (or AdamW), cosine annealing over the epochs, early stopping on validation loss with the
    recipe's patience; the best epoch's weights are kept in out_dir/model.pt.

    Resume: with a `resume_key` (run_cv passes the run's config hash), the complete training state
    (model, optimizer, scheduler, GradScaler, early-stopping state, history, DRGO's c_t and region
    generator, the Python/numpy/torch RNG states) is written atomically to out_dir/last.pt after every
    epoch. A rerun with the same key continues after the last finished epoch; the data order and
    augmentation are functions of (seed, epoch, index), so on CPU the result equals an uninterrupted
    run's exactly. Without a matching state the folder is cleared and training starts at epoch 1.
    """
    seed_everything(seed * 1000 + fold)
    out_dir = Path(out_dir)
    where = f"{entry.dataset}/{entry.name} {run_name(fold, seed)}"
    trainer = build_trainer(
        entry, processed_dir, split["folds"][fold], seed, resources or Resources(), precision
    )
    progress = resume(trainer, out_dir, resume_key, where)
    epochs = entry.recipe.epochs
    bar = tqdm(
        range(progress.start_epoch, epochs if not progress.stopped else progress.start_epoch),
        desc=where, unit="epoch", position=0, initial=progress.start_epoch, total=epochs,
    )  # fmt: skip
    for epoch in bar:
        row = train_epoch(trainer, epoch)
        progress.history.append(row)
        bar.set_postfix(
            train_loss=f"{row['train_loss']:.4f}",
            val_loss=f"{row['val_loss']:.4f}",
            val_dice=f"{row['val_dice']:.3f}",
        )
        log({k: v for k, v in row.items() if k != "epoch"}, epoch)
        if row["val_loss"] < progress.best["val_loss"]:
            progress.best = {"val_loss": row["val_loss"], "epoch": epoch, "val_dice": row["val_dice"]}
            save_best(trainer, out_dir, fold, seed, epoch)
        progress.stopped = epoch - progress.best["epoch"] >= entry.recipe.patience
        if resume_key:
            save_resume_state(trainer, out_dir, resume_key, epoch, progress)
        if progress.stopped:
            bar.write(
                f"early stop at epoch {epoch + 1}: no val loss improvement for {entry.recipe.patience} epochs"
            )
            break
    bar.close()
    how = computed_how(trainer)
    write_json(out_dir / "history.json", {**how, "epochs": progress.history})
    return {
        "fold": fold,
        "seed": seed,
        "best_epoch": progress.best["epoch"],
        "best_val_loss": progress.best["val_loss"],
        "best_val_dice": progress.best["val_dice"],
        "epochs_run": len(progress.history),
        "train_seconds": sum(r["seconds"] for r in progress.history),
        **how,
    }
