"""A perfect model of CHASE_DB1's stored labels, scored at 999x960: plain nearest vs centre-aligned resize.

    python benchmarks/label_resize.py [--source ../shared/datasets/chase_db1] [--size 256]

For each of the 28 first-observer vessel masks (960 x 999), the mask is resized to size x size as
preprocessing stores it, its one-hot probabilities are brought back to 960 x 999 by
`resample.labels_at` (as evaluation does) and scored against the original mask (Dice,
`metrics.overlap_metrics`). What is lost is lost to the resizes alone: the ceiling of any model
trained on the stored masks. Rows: OpenCV's plain INTER_NEAREST (the old preprocessing, half a
processed pixel off the image), `preprocess.resize_labels` (INTER_NEAREST_EXACT, centres aligned, the
new one), and for reference a majority vote (area-resized one-hot labels, argmax; centres aligned too).
Also the offset of the round trip: the whole-pixel shift (row, column; within +-3 original pixels)
that, applied to the masks brought back, gives the highest Dice over the 28 (0, 0 = aligned), and that
Dice; a border of 8 pixels is left out so that the roll wraps nothing in.
Memory: one mask and its float maps at a time (a few MB). About 5 s. Prints a table; no asserts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _plain_nearest(label: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)


def _area_vote(label: np.ndarray, size: int) -> np.ndarray:
    onehot = [(label == k).astype(np.float32) for k in range(2)]
    return np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in onehot]).argmax(0)


SHIFTS = range(-3, 4)


def _shifted_dices(back: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Dice of `back` rolled by (dy, dx) against `label` for every pair of SHIFTS, borders left out."""
    from medfusion.metrics import overlap_metrics

    core = label[8:-8, 8:-8]
    return np.array(
        [
            [overlap_metrics(np.roll(back, (dy, dx), (0, 1))[8:-8, 8:-8], core)["dice"] for dx in SHIFTS]
            for dy in SHIFTS
        ]
    )


def main() -> None:
    from medfusion.data.preprocess import read_label_2d, resize_labels
    from medfusion.metrics import overlap_metrics
    from medfusion.resample import labels_at

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "datasets" / "chase_db1")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    methods = {
        "plain INTER_NEAREST (old)": _plain_nearest,
        "resize_labels, NEAREST_EXACT (new)": lambda label, s: resize_labels(label, (s, s)),
        "area vote, one-hot argmax": _area_vote,
    }
    files = sorted(args.source.glob("Image_*_1stHO.png"))
    dice = {name: [] for name in methods}
    by_shift = {name: 0.0 for name in methods}
    for f in files:
        label = read_label_2d(f, 2)
        for name, resize in methods.items():
            small = resize(label, args.size)
            probs = np.stack([small == 0, small == 1]).astype(np.float32)
            back = labels_at(probs, label.shape)
            dice[name].append(overlap_metrics(back, label)["dice"])
            by_shift[name] = by_shift[name] + _shifted_dices(back, label) / len(files)
    shape = "x".join(str(n) for n in read_label_2d(files[0], 2).shape[::-1])
    print(f"{len(files)} CHASE_DB1 first-observer masks ({shape}) -> {args.size} -> back; perfect model")
    print(f"{'label resize':36s} {'mean Dice':>9s} {'min':>6s} {'max':>6s}  best realigning shift, its Dice")
    for name in methods:
        d, grid = np.asarray(dice[name]), by_shift[name]
        i, j = np.unravel_index(int(grid.argmax()), grid.shape)
        best = f"({SHIFTS[i]:+d}, {SHIFTS[j]:+d}) px  {grid[i, j]:.4f}"
        print(f"{name:36s} {d.mean():9.4f} {d.min():6.4f} {d.max():6.4f}  {best}")


if __name__ == "__main__":
    main()
