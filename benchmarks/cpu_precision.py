"""One training epoch of U-Net on real Kvasir-SEG images: fp32 vs channels_last + bf16 autocast (CPU).

    python benchmarks/cpu_precision.py --kvasir ../shared/datasets/kvasir_seg --images 64 --size 256 --base 32

Preprocesses the first --images pairs at --size, then times one epoch (batch 16, Adam, Dice loss,
the training augmentation, the pipeline's own train_one_epoch) per setting after one warm-up step, and
prints a markdown table with seconds per epoch and the speed-up over fp32 NCHW.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medfusion.data.dataset import SegDataset
from medfusion.data.preprocess import preprocess_dataset
from medfusion.hardware import Precision, cpu_bf16_auto, machine_summary
from medfusion.losses import segmentation_loss
from medfusion.models import build_model
from medfusion.training.loop import train_one_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvasir", type=Path, default=Path("../shared/datasets/kvasir_seg"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    for sub in ("images", "masks"):
        (tmp / "raw" / sub).mkdir(parents=True)
    for image in sorted((args.kvasir / "images").glob("*.jpg"))[: args.images]:
        shutil.copy(image, tmp / "raw" / "images" / image.name)
        shutil.copy(args.kvasir / "masks" / image.name, tmp / "raw" / "masks" / image.name)
    preprocess_dataset("kvasir_seg", tmp / "raw", tmp / "proc", args.size)
    ids = sorted(p.stem for p in (tmp / "raw" / "images").iterdir())
    dataset = SegDataset(tmp / "proc", ids, augment=True)

    settings = {
        "fp32, NCHW": Precision(torch.device("cpu"), None, False),
        "fp32, channels_last": Precision(torch.device("cpu"), None, True),
        "bf16 autocast, NCHW": Precision(torch.device("cpu"), torch.bfloat16, False),
        "bf16 autocast, channels_last": Precision(torch.device("cpu"), torch.bfloat16, True),
    }
    print(
        f"# U-Net base {args.base}, {args.images} Kvasir-SEG images at {args.size}x{args.size}, batch {args.batch}"
    )
    print(f"# {machine_summary()}; train.cpu_bf16 auto here: {cpu_bf16_auto()[1]}")
    print("| setting | s/epoch | speed-up vs fp32 NCHW |\n|---|---|---|")
    baseline = None
    for name, precision in settings.items():
        torch.manual_seed(0)
        model = build_model("unet", 3, 2, base_channels=args.base)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True)
        warm = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(args.batch)), batch_size=args.batch
        )
        objective = lambda logits, target, batch: segmentation_loss(logits, target)  # noqa: E731
        train_one_epoch(model, warm, optimizer, objective, precision, desc="warm-up")
        start = time.perf_counter()
        train_one_epoch(model, loader, optimizer, objective, precision, desc=name)
        seconds = time.perf_counter() - start
        baseline = baseline or seconds
        print(f"| {name} | {seconds:.1f} | {baseline / seconds:.2f}x |", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
