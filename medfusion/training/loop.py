"""The training loop as plain functions: `train_one_epoch`, `validate`. No I/O."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from medfusion.common import TrainingError, first_line
from medfusion.data.distance import OUTSIDE_ROI
from medfusion.hardware import Precision
from medfusion.losses.drgo import DRGOSettings, drgo_loss
from medfusion.metrics import case_metrics

# The messages of PyTorch's allocators when memory runs out (CUDA raises torch.OutOfMemoryError).
OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return (
        isinstance(err, RuntimeError)
        and not isinstance(err, TrainingError)
        and any(marker in str(err) for marker in OOM_MARKERS)
    )


def smaller_image_size(size: int) -> int:
    """Half of `size`, still a multiple of 16 (data.image_size's rule)."""
    return max(16, size // 2 // 16 * 16)


@contextlib.contextmanager
def out_of_memory_explained(
    where: str,
    images: Tensor,
    model: nn.Module,
    device: torch.device,
    batch_option: str = "-S train.batch_size",
    image_option: str | None = "-S data.image_size",
    device_option: str = "-S train.device",
) -> Iterator[None]:
    """Turn running out of memory on `images` (B, C, H, W) into a TrainingError that says what to lower.

    The options are how the user changes the batch size, the image size (None: not at this step, e.g.
    prediction, where the model fixes it) and the device; the original error stays as __cause__.
    """
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        batch, channels, height, width = tuple(images.shape)
        first = first_line(err)
        remedies = [f"lower the batch size (`{batch_option}={batch // 2}`)"] if batch > 1 else []
        if image_option:
            remedies.append(
                f"the image size (`{image_option}={smaller_image_size(height)}`; the data is preprocessed again)"
            )
        if device.type == "cuda":
            remedies.append(f"free the GPU of other jobs, or run on the CPU (`{device_option}=cpu`, slower)")
        else:
            remedies.append(f"close other programs, or use a GPU (`{device_option}=cuda`)")
        raise TrainingError(
            f"{where}: out of memory on {device.type} with a batch of {batch} images of "
            f"{channels}x{height}x{width} through {type(model).__name__} ({first}). "
            f"To fit: {'; or '.join(remedies)}."
        ) from err


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
def predict_probs(model: nn.Module, image: Tensor, precision: Precision) -> Tensor:
    """Softmax probabilities (B, K, H, W) float32 on the CPU."""
    model.eval()
    with precision.autocast():
        logits = model(precision.to_device(image))
    return logits.float().softmax(dim=1).cpu()


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering [0, length): steps of at most patch x (1 - overlap)."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = math.ceil((length - patch) / step) + 1
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


@functools.cache
def gaussian_weights(patch: int, sigma_scale: float = 1 / 8) -> Tensor:
    """(patch, patch) importance of each window pixel: a Gaussian centred on the window, sigma =
    patch / 8 (nnU-Net's choice), scaled to a maximum of 1 and floored at its smallest positive value
    so that no pixel gets weight 0."""
    centre, sigma = (patch - 1) / 2, patch * sigma_scale
    g = torch.exp(-((torch.arange(patch, dtype=torch.float32) - centre) ** 2) / (2 * sigma**2))
    weights = g[:, None] * g[None, :]
    weights /= weights.max()
    return weights.clamp_min(float(weights[weights > 0].min()))


@torch.no_grad()
def sliding_window_probs(
    model: nn.Module, images: Tensor, precision: Precision, patch: int, overlap: float = 0.5, batch: int = 8
) -> Tensor:
    """Softmax probabilities (B, K, H, W) float32 on the CPU of images (B, C, H, W) of any size, from
    `patch` x `patch` windows overlapping by `overlap`, each weighted by `gaussian_weights` (the
    centre of a window counts more than its edges). An image smaller than a window is zero-padded
    (the z-scored mean) and cropped back. Memory: one image's K x H x W sums, `batch` windows."""
    b, c, h, w = images.shape
    H, W = max(h, patch), max(w, patch)
    if (H, W) != (h, w):
        images = torch.nn.functional.pad(images, (0, W - w, 0, H - h))
    weights = gaussian_weights(patch)
    boxes = [(y, x) for y in window_starts(H, patch, overlap) for x in window_starts(W, patch, overlap)]
    out = []
    for image in images:
        total, norm = None, torch.zeros(H, W)
        for start in range(0, len(boxes), batch):
            chunk = boxes[start : start + batch]
            windows = torch.stack([image[:, y : y + patch, x : x + patch] for y, x in chunk])
            probs = predict_probs(model, windows, precision)
            if total is None:
                total = torch.zeros(probs.shape[1], H, W)
            for (y, x), p in zip(chunk, probs, strict=True):
                total[:, y : y + patch, x : x + patch] += p * weights
                norm[y : y + patch, x : x + patch] += weights
        out.append((total / norm)[:, :h, :w])
    return torch.stack(out)


def infer_probs(
    model: nn.Module, images: Tensor, precision: Precision, patch: int | None = None, tta: str = "none"
) -> Tensor:
    """Probabilities (B, K, H, W): the model on the whole input, or by sliding window of `patch`.
    `tta` "flip": the mean over the images and their left-right, up-down and double mirrorings, each
    output flipped back (the group of the two mirrorings, so the result is equivariant to either);
    `medfusion predict --tta flip` and eval.tta both come here."""
    if tta == "flip":
        total = infer_probs(model, images, precision, patch)
        for dims in ((3,), (2,), (2, 3)):
            total = total + torch.flip(infer_probs(model, torch.flip(images, dims), precision, patch), dims)
        return total / 4
    if tta != "none":
        raise ValueError(f"tta {tta!r}; expected none or flip")
    if patch is None:
        return predict_probs(model, images, precision)
    return sliding_window_probs(model, images, precision, patch)


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
