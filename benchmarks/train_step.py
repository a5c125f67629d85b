"""One training step of every registered model at the same base width, relative to U-Net.

    python benchmarks/train_step.py --base 32 --batch 8 --size 256

Forward + soft-Dice loss + backward + Adam on random data, at the precision training resolves on
this CPU (medfusion/hardware.py: bf16 + channels_last with native bf16, else fp32 NCHW; `--fp32` /
`--bf16` force one), median of --repeats steps after one warm-up.
"Same base width": U-Net, Attention U-Net, SegNet and CASNet use w = --base for their first stage;
DeepLabV3 and TransUNet use it as their ResNet width; MedT as its first axial stage width. Every other
setting is the model's default (the paper's depth: DeepLabV3 ResNet-50, TransUNet 12 x 768 ViT, CASNet
4 x 256 transformer). `--casnet-parts` adds CASNet with each part switched off, to show where its
time goes. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from medfusion.efficiency import count_parameters, train_step_seconds
from medfusion.hardware import Precision, machine_summary, resolve_precision
from medfusion.models import MODELS, build_model, compile_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--fp32", action="store_true", help="fp32 NCHW whatever the CPU")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast + channels_last whatever the CPU")
    ap.add_argument("--cuda", action="store_true", help="run on CUDA with fp16 AMP + channels_last")
    ap.add_argument(
        "--compile",
        default="off",
        choices=("off", "regions", "full"),
        help="train.compile: regions = CASNet's attention and Attention U-Net's gates (medfusion.models)",
    )
    ap.add_argument(
        "--casnet-parts", action="store_true", help="also time CASNet with each part switched off"
    )
    args = ap.parse_args()

    if args.cuda:
        precision = Precision(torch.device("cuda"), torch.float16, True)
    else:
        precision = resolve_precision("cpu", False if args.fp32 else True if args.bf16 else "auto")
    names = ["unet"] + [m for m in args.models if m != "unet"]
    entries = [(name, name, {}) for name in names]
    if args.casnet_parts:
        switches = ("use_hfe", "use_attention", "use_msf", "use_transformer")
        entries += [(f"casnet {s}=false", "casnet", {s: False}) for s in switches]
        entries.append(("casnet, all four off", "casnet", dict.fromkeys(switches, False)))
    print(
        f"# train step, batch {args.batch}, {args.size}x{args.size}, {args.in_channels} channels, base width {args.base}, "
        f"train.compile = {args.compile}"
    )
    print(f"# {machine_summary(precision.device)}; {precision.describe()}; {time.strftime('%Y-%m-%d')}")
    print("| model | parameters | s/step | relative to U-Net |\n|---|---|---|---|")
    reference = None
    for label, name, switches in entries:
        torch.manual_seed(0)
        model = build_model(name, args.in_channels, 2, base_channels=args.base, **switches)
        if precision.channels_last:  # compiled for the layout it runs in (train_step_seconds converts too)
            model = model.to(memory_format=torch.channels_last)
        compiled = compile_model(model, args.compile)
        seconds = train_step_seconds(
            model,
            args.in_channels,
            2,
            args.size,
            args.batch,
            precision,
            warmup=2 if compiled else 1,  # the first steps compile
            repeats=args.repeats,
        )
        reference = reference or seconds
        print(
            f"| {label} | {count_parameters(model) / 1e6:.2f} M | {seconds:.3f} | {seconds / reference:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
