"""Model cost: parameters, FLOPs (torch.utils.flop_counter), inference and training-step time.

Used by `medfusion models`, the pipeline's efficiency stage and benchmarks/train_step.py. Times are
medians over `repeats` runs after `warmup` runs, on the given Precision (device, autocast, memory
format); FLOPs count one forward pass of one image (a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medfusion.config import Params
from medfusion.entries import resolve_model
from medfusion.hardware import Precision, machine_summary
from medfusion.losses import segmentation_loss
from medfusion.training.loop import optimizer_step


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, in_channels: int, size: int) -> int:
    """Forward FLOPs of one (1, in_channels, size, size) image in eval mode."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:  # (no torch.no_grad: the counter's module tracker needs autograd)
        model(torch.randn(1, in_channels, size, size))
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_ms_per_image(
    model: nn.Module,
    in_channels: int,
    size: int,
    batch: int,
    precision: Precision,
    warmup: int = 2,
    repeats: int = 10,
) -> float:
    """Median wall time of one eval-mode forward pass of a batch, divided by the batch size, in ms."""
    model = model.to(precision.device).eval()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = precision.to_device(torch.randn(batch, in_channels, size, size))

    def step() -> None:
        with torch.inference_mode(), precision.autocast():
            model(x)

    return 1000 * _median_seconds(step, precision.device, warmup, repeats) / batch


def train_step_seconds(
    model: nn.Module,
    in_channels: int,
    num_classes: int,
    size: int,
    batch: int,
    precision: Precision,
    warmup: int = 1,
    repeats: int = 3,
) -> float:
    """Median wall time of one training step: forward, Dice loss, backward, Adam update."""
    model = model.to(precision.device).train()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = precision.to_device(torch.randn(batch, in_channels, size, size))
    y = torch.randint(0, num_classes, (batch, size, size), device=precision.device)
    scaler = torch.amp.GradScaler("cuda") if precision.amp_dtype == torch.float16 else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = segmentation_loss(model(x), y)
        optimizer_step(loss, optimizer, scaler)

    return _median_seconds(step, precision.device, warmup, repeats)


def efficiency_row(
    params: Params,
    name: str,
    precision: Precision,
    size: int = 256,
    in_channels: int = 3,
    num_classes: int = 2,
    timed: bool = True,
) -> dict:
    """Entry `name` at its params.yaml widths: parameters, forward GFLOPs of one size x size image and
    (when `timed`) inference ms/image at batch 1 on `precision`, with where and how it was timed."""
    torch.manual_seed(0)
    spec = resolve_model(params, name, image_size=size)  # position tables learned at the measured size
    model = spec.build(in_channels, num_classes)
    row = {
        "model": name,
        "architecture": spec.architecture,
        "parameters": count_parameters(model),
        "gflops": count_flops(model, in_channels, size) / 1e9,
        "size": size,
        "in_channels": in_channels,
    }
    if timed:
        row["ms_per_image"] = inference_ms_per_image(model, in_channels, size, 1, precision)
        row["machine"] = machine_summary(precision.device)
        row["precision"] = precision.describe()
    return row


def efficiency_table(
    params: Params,
    precision: Precision,
    size: int = 256,
    in_channels: int = 3,
    num_classes: int = 2,
    timed: bool = True,
) -> list[dict]:
    """`efficiency_row` of every model entry of params."""
    return [
        efficiency_row(params, n, precision, size, in_channels, num_classes, timed)
        for n in params.model_names
    ]
