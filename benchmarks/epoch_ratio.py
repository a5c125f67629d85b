"""Epoch time against pure model compute for CASNet + DRGO: is data loading hidden?

    python benchmarks/epoch_ratio.py --kvasir ../shared/datasets/kvasir_seg --images 160 --size 256 --batch 16

On --images real Kvasir-SEG images preprocessed at --size like the pipeline (memory-mapped uint8
arrays), CASNet (base width --base, params.yaml otherwise) is trained with DRGO by the pipeline's own
`train_one_epoch`, loader (`make_loader`: EpochSampler, --workers persistent workers, MixCollate for
MixUp/CutMix) and params.yaml's `augment` section, CPU bf16 autocast + channels_last, `train.compile`
from --compile. Measured, each the median of --repeats epochs after a warm-up epoch (which compiles):

1. epoch: `train_one_epoch` over the real loader, augmentation and d(x) computed in the workers;
2. compute: the same steps over batches already collated in memory (the loader's output for that
   epoch, stored first), so only the model, DRGO and the optimizer run;
3. loader alone: iterating the loader without training.

ratio = epoch / compute; 1.0 means data loading costs nothing on the training side. On this 2-core VM
the workers share the two cores with the training threads, so the ratio includes that contention.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from medfusion.config import params_from_dict, read_yaml  # noqa: E402
from medfusion.data.augment import MixCollate  # noqa: E402
from medfusion.data.dataset import SegDataset  # noqa: E402
from medfusion.data.io import read_json  # noqa: E402
from medfusion.entries import resolve_entry  # noqa: E402
from medfusion.hardware import machine_summary, resolve_compile, resolve_precision  # noqa: E402
from medfusion.losses.drgo import class_frequencies  # noqa: E402
from medfusion.models import compile_model  # noqa: E402
from medfusion.training.fold import make_loader  # noqa: E402
from medfusion.training.loop import DRGOObjective, train_one_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvasir", type=Path, default=REPO.parent / "shared" / "datasets" / "kvasir_seg")
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", default="regions", choices=("off", "regions", "full"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from loader_throughput import kvasir_subset  # (benchmarks/ is on sys.path) same subset, preprocessing

    raw = read_yaml(REPO / "params.yaml")
    raw["data"]["image_size"] = args.size
    raw["model"]["base_channels"] = args.base
    raw["train"].update(batch_size=args.batch, num_workers=args.workers, compile=args.compile)
    params = params_from_dict(raw, source="benchmarks/epoch_ratio.py")
    processed = kvasir_subset(args.kvasir, args.images, args.size, Path(tempfile.mkdtemp()))
    ids = [c["case_id"] for c in read_json(processed / "cases.json")]
    precision = resolve_precision("cpu", params.train.cpu_bf16, params.train.channels_last)
    entry = resolve_entry(params, "kvasir_seg", "casnet")
    how, _ = resolve_compile(args.compile, precision)

    torch.manual_seed(0)
    dataset = SegDataset(processed, ids, augment=params.augment, seed=0, distance=True)
    loader = make_loader(dataset, args.batch, True, args.workers, 0, False, MixCollate(params.augment, 0))
    model = entry.build()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    compile_model(model, how)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
    frequencies = class_frequencies(dataset.masks, 2, dataset.indices)
    objective = DRGOObjective(entry.drgo, frequencies, params.loss.ce_weight, 0)

    def epoch_seconds(epoch: int, batches=None) -> float:
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        train_one_epoch(model, batches if batches is not None else loader, optimizer, objective, precision)
        return time.perf_counter() - start

    start = time.perf_counter()
    epoch_seconds(0)  # warm-up: worker start, compilation
    warmup = time.perf_counter() - start
    epochs, computes, loads = [], [], []
    for r in range(args.repeats):
        epochs.append(epoch_seconds(1 + r))
        loader.sampler.set_epoch(100 + r)
        start = time.perf_counter()
        batches = list(loader)  # the loader alone
        loads.append(time.perf_counter() - start)
        computes.append(epoch_seconds(100 + r, batches))
    steps = len(loader)
    epoch, compute, load = (statistics.median(v) for v in (epochs, computes, loads))
    print(f"# CASNet + DRGO, base width {args.base}, {args.images} Kvasir-SEG images at {args.size}x{args.size}, "
          f"batch {args.batch} ({steps} steps/epoch), {args.workers} workers, augmentation on, "
          f"train.compile = {args.compile} ({how}); {machine_summary()}; {precision.describe()}; "
          f"{time.strftime('%Y-%m-%d')}; warm-up epoch {warmup:.1f} s; median of {args.repeats}")  # fmt: skip
    print("\n| what | s/epoch | s/step | ratio to compute |\n|---|---|---|---|")
    for label, value in (
        ("epoch (real loader)", epoch),
        ("compute only (batches in memory)", compute),
        ("loader alone (no training)", load),
    ):
        print(f"| {label} | {value:.2f} | {value / steps:.3f} | {value / compute:.3f} |")
    print(f"\nepoch / compute = {epoch / compute:.3f}")


if __name__ == "__main__":
    main()
