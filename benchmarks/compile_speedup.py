"""Training step of U-Net, CASNet and Attention U-Net, eager and with `train.compile` regions/full,
measured interleaved so that the VM's drift hits every setting alike.

    python benchmarks/compile_speedup.py --base 32 --batch 8 --size 256 --rounds 7

Each entry (model x compile setting) gets its own model, Adam optimizer and random batch (3 x size x
size, 2 classes); forward + soft Dice + backward + Adam, at the precision training resolves on this
CPU (`--precision auto`, medfusion/hardware.py: bf16 + channels_last with native bf16, else fp32
NCHW), or forced with `--precision fp32|bf16`. After --warmup steps of every entry (the first ones compile), --rounds
rounds each time one step of every entry in turn; the table gives the median per entry, relative
to eager U-Net, and the compilation time (first steps). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medfusion.hardware import Precision, machine_summary, resolve_precision
from medfusion.losses import segmentation_loss
from medfusion.models import build_model, compile_model
from medfusion.training.loop import optimizer_step

DEFAULT_ENTRIES = [
    "unet:off",
    "unet:full",
    "casnet:off",
    "casnet:regions",
    "casnet:full",
    "attention_unet:off",
    "attention_unet:regions",
]


def make_step(name: str, how: str, args: argparse.Namespace, precision: Precision):
    torch.manual_seed(0)
    model = build_model(name, 3, 2, base_channels=args.base).train()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compile_model(model, how)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = precision.to_device(torch.randn(args.batch, 3, args.size, args.size))
    y = torch.randint(0, 2, (args.batch, args.size, args.size))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = segmentation_loss(model(x), y)
        optimizer_step(loss, optimizer)
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--entries", nargs="+", default=DEFAULT_ENTRIES, help="model:compile pairs")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = ap.parse_args()
    bf16 = {"auto": "auto", "fp32": False, "bf16": True}[args.precision]
    precision: Precision = resolve_precision("cpu", bf16, "auto")
    steps, first = {}, {}
    for entry in args.entries:
        name, how = entry.split(":")
        steps[entry] = make_step(name, how, args, precision)
        first[entry] = sum(steps[entry]() for _ in range(args.warmup))
        print(f"# {entry}: {args.warmup} warm-up steps {first[entry]:.1f} s", flush=True)
    times: dict[str, list[float]] = {e: [] for e in steps}
    for _ in range(args.rounds):
        for entry, step in steps.items():
            times[entry].append(step())
    median = {e: statistics.median(t) for e, t in times.items()}
    reference = median.get("unet:off") or next(iter(median.values()))
    print(f"\n# batch {args.batch}, {args.size}x{args.size}, base width {args.base}; median of {args.rounds} "
          f"interleaved rounds; {machine_summary()}; {precision.describe()}; {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| model | train.compile | s/step (median) | min-max | relative to eager U-Net | warm-up steps s |")
    print("|---|---|---|---|---|---|")
    for entry, m in median.items():
        name, how = entry.split(":")
        t = times[entry]
        print(
            f"| {name} | {how} | {m:.3f} | {min(t):.2f}-{max(t):.2f} | {m / reference:.2f} | {first[entry]:.1f} |"
        )


if __name__ == "__main__":
    main()
