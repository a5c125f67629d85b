"""Model cost: parameters, FLOPs (torch.utils.flop_counter), inference and training-step time.

Used by `medfusion models`, the pipeline's efficiency stage and benchmarks/train_step.py. Times are
medians over `repeats` runs after `warmup` runs, on the given Precision (device, autocast, memory
format); FLOPs count one forward pass of one image (a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medfusion.losses import segmentation_loss
from medfusion.training.loop import Precision, optimizer_step


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


def hardware_name(device: torch.device) -> str:
    """GPU name, or CPU model name and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads"


PAPER = "MedFusion-TransNet as published: 35 ms/image and 7.8 GB peak memory on an NVIDIA RTX 3090 (paper, sec. 4)"


def efficiency_table(
    params,
    precision: Precision,
    size: int = 256,
    in_channels: int = 3,
    num_classes: int = 2,
    timed: bool = True,
) -> list[dict]:
    """One row per model entry of params (widths from params.yaml): parameters, forward GFLOPs of one
    size x size image, and (when `timed`) inference ms/image at batch 1 on `precision`'s device."""
    from medfusion.models import build_model

    rows = []
    for name in params.model_names:
        torch.manual_seed(0)
        kwargs = params.model_kwargs(name)
        if "image_size" in kwargs:  # position tables learned at the measured size
            kwargs["image_size"] = size
        model = build_model(params.architecture(name), in_channels, num_classes, **kwargs)
        row = {
            "model": name,
            "architecture": params.architecture(name),
            "parameters": count_parameters(model),
            "gflops": count_flops(model, in_channels, size) / 1e9,
        }
        if timed:
            row["ms_per_image"] = inference_ms_per_image(model, in_channels, size, 1, precision)
        rows.append(row)
    return rows


def efficiency_markdown(rows: list[dict], precision: Precision, size: int, in_channels: int) -> str:
    """The efficiency table as markdown, with how it was measured and the paper's figures beside it."""
    timed = rows and "ms_per_image" in rows[0]
    head = "| model | architecture | parameters (M) | GFLOPs |" + (" ms/image |" if timed else "")
    lines = [
        "## Model efficiency",
        "",
        f"Widths from params.yaml; {in_channels}-channel {size}x{size} input, 2 classes. GFLOPs: one forward pass "
        "of one image (torch.utils.flop_counter, a multiply-add = 2 FLOPs)."
        + (
            f" ms/image: median of 10 eval-mode forward passes at batch 1 after 2 warm-ups, on {hardware_name(precision.device)}, "
            f"{'autocast ' + str(precision.amp_dtype).replace('torch.', '') if precision.amp_dtype else 'fp32'}"
            f"{', channels_last' if precision.channels_last else ''}; torch {torch.__version__}."
            if timed
            else ""
        ),
        "",
        head,
        "|---|---|---|---|" + ("---|" if timed else ""),
    ]
    for r in rows:
        line = f"| {r['model']} | {r['architecture']} | {r['parameters'] / 1e6:.2f} | {r['gflops']:.2f} |"
        if timed:
            line += f" {r['ms_per_image']:.1f} |"
        lines.append(line)
    lines += ["", f"For comparison, {PAPER}. Peak memory is not measured on CPU.", ""]
    return "\n".join(lines)
