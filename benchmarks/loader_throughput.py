"""Training DataLoader throughput with full augmentation, against what CASNet training consumes.

    python benchmarks/loader_throughput.py --images 128 --size 256

1. Loader: images/s of the pipeline's training DataLoader (`make_loader` + `MixCollate`: albumentations
   per sample, z-score, d(x) distance maps, MixUp/CutMix) with params.yaml's `augment` section, for
   0, 1 and 2 workers, over --epochs epochs after the first batch (worker start-up excluded); plus the
   same loader without augmentation (z-score + d(x) only) for reference.
2. Per transform: ms/image of each transform alone (its probability set to 1, all others 0, so the
   overhead row, all 0, is included in each), of the
   whole pipeline at params.yaml's probabilities and at probability 1 everywhere, and of the other
   per-sample work (z-score, d(x)) and of MixCollate per image.
3. Consumption: images/s of one CASNet (base width --base) training step at batch --batch, forward +
   soft Dice + backward + Adam, CPU bf16 autocast + channels_last (as benchmarks/train_step.py), or
   with --cuda on the GPU with fp16 AMP + channels_last (the pipeline's settings).

Data: a processed Kvasir-SEG subset (--images images of --kvasir, preprocessed at --size like the
pipeline), or --processed DIR (a data/processed/<name> folder). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medfusion.config import AugmentParams, load_params  # noqa: E402
from medfusion.data.augment import MixCollate, augment_sample, build_transform  # noqa: E402
from medfusion.data.dataset import SegDataset, zscore  # noqa: E402
from medfusion.data.distance import distance_map  # noqa: E402
from medfusion.data.io import read_json  # noqa: E402
from medfusion.efficiency import train_step_seconds  # noqa: E402
from medfusion.hardware import machine_summary, resolve_precision  # noqa: E402
from medfusion.models import build_model  # noqa: E402
from medfusion.training.fold import make_loader  # noqa: E402

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentParams) if f.name.endswith("_p")]
PER_SAMPLE = [k for k in PROBABILITIES if k not in ("mixup_p", "cutmix_p")]


def kvasir_subset(kvasir: Path, images: int, size: int, work: Path) -> Path:
    from medfusion.data.preprocess import preprocess_dataset  # only here: it needs the readers' packages

    for sub in ("images", "masks"):
        (work / "raw" / sub).mkdir(parents=True)
    for image in sorted((kvasir / "images").glob("*.jpg"))[:images]:
        shutil.copy(image, work / "raw" / "images" / image.name)
        shutil.copy(kvasir / "masks" / image.name, work / "raw" / "masks" / image.name)
    preprocess_dataset("kvasir_seg", work / "raw", work / "proc", size)
    return work / "proc"


def loader_images_per_second(
    processed: Path, ids: list[str], augment: AugmentParams | None, workers: int, batch: int, epochs: int
) -> float:
    dataset = SegDataset(processed, ids, augment=augment, seed=0, distance=True)
    collate = MixCollate(augment, 0) if augment else None
    loader = make_loader(dataset, batch, True, workers, 0, False, collate)
    count, start = 0, None
    for epoch in range(epochs + 1):
        loader.sampler.set_epoch(epoch)
        for batch_ in loader:
            if start is None:  # the clock starts after the first batch: worker start-up excluded
                start = time.perf_counter()
                continue
            count += len(batch_["mask"])
    return count / (time.perf_counter() - start)


def ms_per_image(fn, n: int) -> float:
    fn(0)  # warm-up
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvasir", type=Path, default=Path("../shared/datasets/kvasir_seg"))
    ap.add_argument("--processed", type=Path, default=None, help="a processed dataset folder instead")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--cuda", action="store_true", help="consumption on CUDA with fp16 AMP + channels_last")
    ap.add_argument("--cv2-threads", type=int, default=None, help="cv2.setNumThreads (inherited by workers)")
    args = ap.parse_args()
    if args.cv2_threads is not None:
        cv2.setNumThreads(args.cv2_threads)

    work = Path(tempfile.mkdtemp())
    processed = args.processed or kvasir_subset(args.kvasir, args.images, args.size, work)
    ids = [c["case_id"] for c in read_json(processed / "cases.json")]
    params = load_params(args.params).augment
    images, masks = np.load(processed / "images.npy", mmap_mode="r"), np.load(processed / "masks.npy")
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    print(f"# {n} images, {channels} x {size} x {size}; batch {args.batch}; {time.strftime('%Y-%m-%d')}")
    print(
        f"# {machine_summary()}; {os.cpu_count()} CPUs; "
        f"cv2 {cv2.__version__} with {cv2.getNumThreads()} threads"
    )

    print("\n## Training DataLoader (augmentation of params.yaml + d(x) + MixUp/CutMix)\n")
    print("| loader | workers | images/s |\n|---|---|---|")
    for workers in args.workers:
        rate = loader_images_per_second(processed, ids, params, workers, args.batch, args.epochs)
        print(f"| full augmentation | {workers} | {rate:.0f} |", flush=True)
    rate = loader_images_per_second(processed, ids, None, 0, args.batch, args.epochs)
    print(f"| no augmentation (z-score + d(x)) | 0 | {rate:.0f} |", flush=True)

    print("\n## Per-sample cost, one worker, ms/image\n")
    print("| step | ms/image |\n|---|---|")
    none = AugmentParams(**dict.fromkeys(PROBABILITIES, 0.0))
    steps = {"none (all probabilities 0: call overhead)": none}
    steps |= {key.removesuffix("_p"): dataclasses.replace(none, **{key: 1.0}) for key in PER_SAMPLE}
    steps["all, params.yaml probabilities"] = params
    steps["all, probability 1"] = dataclasses.replace(params, **dict.fromkeys(PER_SAMPLE, 1.0))
    for label, settings in steps.items():
        transform = build_transform(settings)
        cost = ms_per_image(lambda i, t=transform: augment_sample(t, images[i % n], masks[i % n], 0, 0, i), n)
        print(f"| {label} | {cost:.2f} |", flush=True)
    cost = ms_per_image(lambda i: zscore(np.asarray(images[i % n])), n)
    print(f"| z-score | {cost:.2f} |")
    cost = ms_per_image(lambda i: distance_map(masks[i % n]), n)
    print(f"| d(x) distance map | {cost:.2f} |")
    dataset = SegDataset(processed, ids, augment=params, seed=0, distance=True)
    items = [dataset[(0, i)] for i in range(args.batch)]
    for label, settings in (
        ("MixCollate, params.yaml probabilities", params),
        ("MixCollate, CutMix every sample + MixUp", dataclasses.replace(params, mixup_p=1.0, cutmix_p=1.0)),
    ):
        collate = MixCollate(settings, 0)
        per_batch = ms_per_image(lambda i, c=collate: c([{**it, "epoch": i} for it in items]), 20)
        print(f"| {label} | {per_batch / args.batch:.2f} |", flush=True)

    precision = resolve_precision("cuda" if args.cuda else "cpu")  # as training resolves it
    print(
        f"\n## Consumption: CASNet base {args.base} train step, batch {args.batch}, "
        f"{machine_summary(precision.device)}, {precision.describe()}\n"
    )
    torch.manual_seed(0)
    model = build_model("casnet", channels, 2, base_channels=args.base)
    seconds = train_step_seconds(model, channels, 2, size, args.batch, precision, repeats=args.repeats)
    print(
        f"| model | s/step | images/s |\n|---|---|---|\n| casnet | {seconds:.2f} | {args.batch / seconds:.1f} |"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
