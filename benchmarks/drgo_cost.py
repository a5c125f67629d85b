"""What DRGO costs per training step: loss time against the model's forward + backward time.

    python benchmarks/drgo_cost.py --batch 16 --size 256 --base 32

CPU, the model at the precision training resolves on this CPU (medfusion/hardware.py), DRGO computed in fp32
as in training. "model" = forward + soft-Dice loss + backward of CASNet; "DRGO" = everything DRGO adds
on top of L_seg: the four terms on the logits and their backward (the logits are a leaf here);
"distance maps" = d(x) for the batch with scipy on the data side (in training this runs in the
DataLoader workers). Median of --repeats after one warm-up. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from medfusion.data.distance import distance_map
from medfusion.hardware import machine_summary, resolve_precision
from medfusion.losses import segmentation_loss
from medfusion.losses.drgo import DRGOSettings, class_frequencies, drgo_loss
from medfusion.models import build_model


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--region-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    precision = resolve_precision("cpu")  # as training resolves it on this CPU
    model = build_model("casnet", 3, 2, base_channels=args.base)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = precision.to_device(torch.randn(args.batch, 3, args.size, args.size))
    yy, xx = np.mgrid[: args.size, : args.size]
    masks = np.stack(
        [
            ((yy - c) ** 2 + (xx - c) ** 2 < (args.size // 4) ** 2)
            for c in np.linspace(args.size / 4, args.size * 3 / 4, args.batch)
        ]
    ).astype(np.int64)  # discs: real boundaries
    target = torch.from_numpy(masks)
    freq = class_frequencies(masks, 2)
    settings = DRGOSettings(region_size=args.region_size)

    def model_step() -> None:
        with precision.autocast():
            logits = model(x)
        segmentation_loss(logits.float(), target).backward()

    distance = torch.from_numpy(np.stack([distance_map(m) for m in masks]))
    logits = torch.randn(args.batch, 2, args.size, args.size, requires_grad=True)

    def drgo_step() -> None:
        loss, _ = drgo_loss(logits, target, freq, settings, 0.5, distance)
        (loss - segmentation_loss(logits, target)).backward()

    def distances() -> None:
        np.stack([distance_map(m) for m in masks])

    t_model = median_time(model_step, args.repeats)
    t_drgo = median_time(drgo_step, args.repeats)
    t_dist = median_time(distances, args.repeats)
    print(f"# CASNet base {args.base}, batch {args.batch}, {args.size}x{args.size}, DRGO regions {args.region_size}; "
          f"{machine_summary()}; {precision.describe()}; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| part | s/batch | relative to model forward+backward |\n|---|---|---|")
    for name, t in ((f"model forward + backward ({precision.dtype_name})", t_model), ("DRGO terms + their backward (fp32)", t_drgo),
                    ("distance maps, scipy (data side)", t_dist)):  # fmt: skip
        print(f"| {name} | {t:.3f} | {t / t_model:.3f} |")


if __name__ == "__main__":
    main()
