"""The training loop as plain functions: `train_one_epoch`, `validate`. No I/O."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfusion.common import TrainingError
from medfusion.data.distance import OUTSIDE_ROI
from medfusion.hardware import Precision, out_of_memory_explained
from medfusion.inference.window import sliding_window_probs
from medfusion.losses.drgo import DRGOSettings, drgo_loss
from medfusion.metrics import case_metrics

LossFn = Callable[[Tensor, Tensor], Tensor]
# training objective: (logits fp32, target, batch on the device) -> loss
Objective = Callable[[Tensor, Tensor, dict], Tensor]


def mixup_loss(loss_of: Callable[[Tensor, Tensor | None], Tensor], target: Tensor, batch: dict) -> Tensor:
    """L(y), or lam L(y_a) + (1 - lam) L(y_b) on a MixUp batch (medfusion/data/augment.py).

    Args:
        loss_of: (target (B, H, W) int64, distance (B, H, W) float or None) -> scalar loss.
        target: y_a, the batch's `mask` on the training device.
        batch: the loader's batch; a MixUp batch has mix_lambda, mix_mask (y_b) and, with distance
            maps, mix_distance (d(x) of y_b).
    """
    if "mix_lambda" not in batch:
        return loss_of(target, batch.get("distance"))
    lam = float(batch["mix_lambda"])
    loss_a = loss_of(target, batch.get("distance"))
    loss_b = loss_of(batch["mix_mask"].to(target.device, non_blocking=True), batch.get("mix_distance"))
    return lam * loss_a + (1 - lam) * loss_b


_CERTAIN = 30.0  # logit margin of a certain prediction: softmax gives 1 - 1e-26 (exactly 1 in fp32)


def inside_roi(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, target) with the pixels marked OUTSIDE_ROI (SegDataset(roi=True)) made background in
    the target and a certain background in the prediction: every loss term then sees no error there,
    and no gradient reaches the model from them (eval.roi_loss: the loss inside the field of view,
    as the metrics are). Our choice of how (METHOD.md does not train inside a region): one rule for
    L_seg and every DRGO term, instead of a mask threaded through each. Outside pixels still count
    in the means over pixels (with zero loss) and in the background class's soft Dice (as correct).
    Memory: one bool map and one logits-sized tensor."""
    outside = target == OUTSIDE_ROI
    certain = torch.full((1, logits.shape[1], 1, 1), -_CERTAIN, dtype=logits.dtype, device=logits.device)
    certain[:, 0] = _CERTAIN
    return torch.where(outside[:, None], certain, logits), target.masked_fill(outside, 0)


def plain_objective(loss_fn: LossFn) -> Objective:
    """`loss_fn(logits, target)` as a training objective that handles MixUp batches (`mixup_loss`)."""
    return lambda logits, target, batch: mixup_loss(lambda y, _: loss_fn(logits, y), target, batch)


class DRGOObjective:
    """The DRGO objective for the training loop, which holds what DRGO's pure functions must not:
    the moving average c_t of the batches' mean max-probability (it drives gamma), and the generator
    of the region draws. `last_terms` keeps the last batch's loss terms for logging.

    c_t and the per-epoch sums of the terms are 0-dim tensors on the training device: nothing here
    reads a value back to the host during an epoch (a `float(tensor)` per term per step would stall
    a GPU's queue); `epoch_terms` reads the sums once. A MixUp batch gives lam L(y_a, d_a) +
    (1 - lam) L(y_b, d_b): both terms see the same c_t, and c_t is updated once per batch (the batch
    confidence depends on the logits only, so it is the same in both); the logged terms are the
    lam-weighted means of the two. With `roi` (eval.roi_loss) each target's outside is made certain
    background first (`inside_roi`); the batch confidence then counts those pixels as certain."""

    def __init__(
        self, settings: DRGOSettings, class_freq: Tensor, ce_weight: float, seed: int, roi: bool = False
    ) -> None:
        self.settings, self.class_freq, self.ce_weight, self.roi = settings, class_freq, ce_weight, roi
        self.confidence: Tensor | float = 0.0
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.last_terms: dict[str, Tensor] = {}
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def __call__(self, logits: Tensor, target: Tensor, batch: dict) -> Tensor:
        device = logits.device
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        confidence = torch.as_tensor(self.confidence, dtype=torch.float32, device=device)
        calls: list[dict[str, Tensor]] = []

        def loss_of(y: Tensor, distance: Tensor | None) -> Tensor:
            scores, y = inside_roi(logits, y) if self.roi else (logits, y)
            loss, terms = drgo_loss(
                scores,
                y,
                self.class_freq.to(device),
                self.settings,
                confidence,
                None if distance is None else distance.to(device, non_blocking=True),
                self.ce_weight,
                self.generators[device],
            )
            calls.append(terms)
            return loss

        loss = mixup_loss(loss_of, target, batch)
        terms = calls[0]
        if len(calls) == 2:  # MixUp
            lam = float(batch["mix_lambda"])
            terms = {k: lam * v + (1 - lam) * calls[1][k] for k, v in terms.items()}
        momentum = self.settings.confidence_momentum
        self.confidence = momentum * confidence + (1 - momentum) * terms["confidence"]
        self.last_terms = terms
        for key, value in terms.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        return loss

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly: c_t and the region generators' states."""
        return {
            "confidence": float(self.confidence),
            "generators": {str(d): g.get_state() for d, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.confidence = float(state["confidence"])
        self.generators = {}
        for name, rng_state in state["generators"].items():
            device = torch.device(name)
            self.generators[device] = torch.Generator(device=device)
            self.generators[device].set_state(rng_state)

    def epoch_terms(self) -> dict[str, float]:
        """Mean of each loss term over the batches since the last call, as drgo_<term>; then resets.
        One read from the device for all terms."""
        keys = list(self._sums)
        values = torch.stack([self._sums[k].float() for k in keys]).tolist() if keys else []
        means = {f"drgo_{k}": v / max(self._count, 1) for k, v in zip(keys, values, strict=True)}
        self._sums, self._count = {}, 0
        return means


def optimizer_step(
    loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> None:
    """Backward and update, through the GradScaler under CUDA fp16 (the caller zeroes the gradients)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Objective,
    precision: Precision,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
) -> float:
    """One pass over `loader`; returns the mean training loss. Stops on a non-finite loss.

    `loss_fn(logits, target, batch)` gets fp32 logits and the whole batch (DRGO reads its distance maps).
    """
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", position=1, mininterval=1.0)
    for step, batch in enumerate(bar):
        with out_of_memory_explained(f"{desc}, step {step}", batch["image"], model, precision.device):
            image, mask = precision.to_device(batch["image"]), batch["mask"].to(precision.device)
            with precision.autocast():
                logits = model(image)
            loss = loss_fn(logits.float(), mask, batch)
            if not math.isfinite(loss.item()):
                raise TrainingError(
                    f"{desc}: loss is {loss.item()} at step {step} (sample indices {batch['index'].tolist()})"
                    f"{_case_ids(loader, batch)}; the weights were not updated with it. Check those samples, "
                    f"or lower train.lr (now {optimizer.param_groups[0]['lr']:g})"
                )
            optimizer.zero_grad(set_to_none=True)
            optimizer_step(loss, optimizer, scaler)
        total += loss.item() * len(mask)
        count += len(mask)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


def _case_ids(loader: DataLoader, batch: dict) -> str:
    """The batch's case ids (", cases [...]") where the loader's dataset knows them (SegDataset)."""
    samples = getattr(loader.dataset, "samples", None)
    try:
        rows = [samples[i] for i in batch["index"].tolist()]
        names = [
            r["case_id"] if r.get("slice") is None else f"{r['case_id']} slice {r['slice']}" for r in rows
        ]
    except (TypeError, KeyError, IndexError, AttributeError):
        return ""
    return f", cases {names}"


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    precision: Precision,
    num_classes: int,
    patch: int | None = None,
) -> tuple[float, float]:
    """Mean loss and mean Dice over samples and foreground classes (2-D, per sample). With `patch`
    (native images) by sliding window: the loss of the stitched probabilities p, given to `loss_fn`
    as logits log p (whose softmax is p)."""
    model.eval()
    total, count, dices = 0.0, 0, []
    for step, batch in enumerate(loader):
        where = f"validation, step {step}"
        with out_of_memory_explained(where, batch["image"], model, precision.device, "-S eval.batch_size"):
            image, mask = precision.to_device(batch["image"]), batch["mask"].to(precision.device)
            if patch is None:
                with precision.autocast():
                    logits = model(image).float()
            else:
                probs = sliding_window_probs(model, image, precision, patch).to(mask.device)
                logits = probs.clamp_min(1e-8).log()
            total += loss_fn(logits, mask).item() * len(mask)
        count += len(mask)
        pred, target = logits.argmax(1).cpu().numpy(), mask.cpu().numpy()
        outside = target == OUTSIDE_ROI  # eval.roi_loss: Dice inside the field of view, as evaluation scores
        pred[outside], target[outside] = 0, 0
        for p, t in zip(pred, target, strict=True):
            dices += [m["dice"] for m in case_metrics(p, t, num_classes).values()]
    return total / max(count, 1), float(np.mean(dices))
