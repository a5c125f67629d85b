"""Peak memory of scoring one LiTS-sized test case, the way evaluation scores it.

    python benchmarks/case_memory.py --slices 987 --runs 5        # the largest LiTS17 volume
    python benchmarks/case_memory.py --slices 100 --runs 2         # quick: memory is linear in voxels

One volume of --slices x 512 x 512 voxels (spacing 1 x 0.7 x 0.7 mm) with a liver and a tumour
inside it is scored through `medfusion.evaluation`'s own path (`_case_ensemble`, `_CaseStore`,
`_Case.score`: the fold ensemble first, then every run read back) for --runs runs whose
probabilities are random softmax maps at 256 x 256 (K = 3, float16, as `iter_case_probs` yields
them): the worst case for the surface distances, since about half of the voxels of such a noisy
prediction are surface voxels and the bounding box is the whole volume. Post-processing: LiTS's
kind (per-class thresholds), so that the raw and post-processed label maps differ. No model runs:
the case is scored as evaluation scores it once the runs' probabilities exist, which is where
evaluation's peak is (benchmarks/scale_memory.py measures whole stages).

Prints the peak RSS (VmHWM) before and after, in GiB and in bytes per original voxel over the
baseline (interpreter, numpy, torch), and the wall time (which includes making the random maps).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from medfusion import evaluation
from medfusion.postprocess import PostProcess

S, SIDE, K = 256, 512, 3


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Start the high-water mark again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def noisy_probs(slices: int, seed: int) -> np.ndarray:
    """(K, slices, S, S) float16 softmax of random logits, slice by slice."""
    rng = np.random.default_rng(seed)
    out = np.empty((K, slices, S, S), np.float16)
    for z in range(slices):
        e = np.exp(rng.normal(0, 1, (K, S, S)).astype(np.float32))
        out[:, z] = e / e.sum(0)
    return out


def ground_truth(slices: int) -> np.ndarray:
    """(slices, 512, 512) uint8: an ellipsoid liver (1) with a tumour (2) inside, slice by slice."""
    target = np.zeros((slices, SIDE, SIDE), np.uint8)
    yy, xx = np.ogrid[:SIDE, :SIDE]
    for z in range(slices):
        dz = (z - slices / 2) / (slices / 3)
        target[z][(dz**2 + ((yy - 256) / 150) ** 2 + ((xx - 256) / 170) ** 2) < 1] = 1
        dz = (z - slices / 2) / (slices / 10)
        target[z][(dz**2 + ((yy - 256) / 40) ** 2 + ((xx - 300) / 40) ** 2) < 1] = 2
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=987)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    target = ground_truth(args.slices)
    spacing = (1.0, 0.7, 0.7)
    post = PostProcess(thresholds=(0.4, None))

    def stream(seed: int):  # made when the ensemble asks for it, as a model's stream makes it
        yield "case", noisy_probs(args.slices, seed)

    streams = {f"run{k}": stream(k) for k in range(args.runs)}
    scores = evaluation._Scores({"liver": [1, 2], "tumour": [2]})
    reset_peak()
    base, start = peak_rss(), time.perf_counter()
    with evaluation._CaseStore() as store:
        case = evaluation._Case("case", target, None, spacing)
        case.score(scores, "ensemble", evaluation._case_ensemble(streams, "case", store), post, store)
        for name in streams:
            case.score(scores, name, store.take(name), post, store)
    seconds = time.perf_counter() - start
    voxels = target.size
    peak = peak_rss()
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"case: {args.slices} x {SIDE} x {SIDE} = {voxels / 1e6:.0f} M voxels, {args.runs} runs + ensemble")
    print(f"peak RSS {peak / 2**30:.2f} GiB ({peak / 1e9:.2f} GB); before scoring {base / 2**30:.2f} GiB; "
          f"{(peak - base) / voxels:.1f} bytes per voxel over that; {seconds:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
