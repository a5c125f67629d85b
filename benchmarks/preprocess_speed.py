"""Preprocessing time of a real dataset, and how fast its output loads.

    python benchmarks/preprocess_speed.py --source ../shared/datasets/kvasir_seg --size 256 --workers 1 2

Measures, for `medfusion.data.preprocess.preprocess_dataset` on a verified local copy: wall time per
worker count (decode, validate, resize, write the .npy arrays), then the time to read every sample
of the memory-mapped output once (what the training loader pays per epoch, before augmentation).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from medfusion.config import load_params
from medfusion.data.fetch import fetch_dataset
from medfusion.data.preprocess import preprocess_dataset
from medfusion.hardware import machine_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="kvasir_seg")
    parser.add_argument("--source", type=Path, default=Path("../shared/datasets/kvasir_seg"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    params = load_params()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        start = time.perf_counter()
        record = fetch_dataset(args.dataset, raw, args.source, params.data.synthetic)
        print(
            f"fetch (verify fingerprint + copy {record['files']} files): {time.perf_counter() - start:.1f} s"
        )
        for workers in args.workers:
            out = Path(tmp) / f"proc{workers}"
            start = time.perf_counter()
            meta = preprocess_dataset(args.dataset, raw, out, args.size, workers=workers)
            seconds = time.perf_counter() - start
            print(
                f"preprocess {args.dataset}: {meta['num_samples']} samples at {args.size}x{args.size}, "
                f"workers={workers}: {seconds:.1f} s ({meta['num_samples'] / seconds:.0f} images/s)"
            )
        images = np.load(out / "images.npy", mmap_mode="r")
        start = time.perf_counter()
        total = sum(int(np.asarray(images[i]).sum() > 0) for i in range(len(images)))
        seconds = time.perf_counter() - start
        size_mb = os.path.getsize(out / "images.npy") / 2**20
        print(
            f"read all {len(images)} samples from the memmap ({size_mb:.0f} MB): {seconds:.2f} s "
            f"({len(images) / seconds:.0f} images/s; {total} non-blank)"
        )
    print(f"machine: {machine_summary()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
