"""CASNet with DRGO against CASNet without it, on real Kvasir-SEG at a CPU budget.

    python benchmarks/drgo_effect.py --kvasir ../shared/datasets/kvasir_seg --size 128 --base 16 --epochs 15

Preprocesses all 1000 Kvasir-SEG pairs at --size, makes the pipeline's split (seeded 80/20 test split,
5 folds by image inside the training part), trains fold 0 with seed 0 twice under the same settings
(params.yaml's protocol with the overrides below): "DRGO" = the `drgo` section with every term on;
"no DRGO" = use_boundary, use_sampling and use_adaptive off, that is L_seg (soft Dice) alone. Then it
predicts the 200 test images and reports per image, polyp class, at --size: Dice and HD95 (pixels; an
empty prediction of a non-empty mask has no HD95 and is counted apart), mean ± std over images, and
the paired Wilcoxon signed-rank test over images (scipy.stats.wilcoxon). Validation (early stopping)
uses L_seg in both. Prints a markdown report.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from medfusion.config import params_from_dict, read_yaml
from medfusion.data.dataset import SegDataset
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import read_json
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.efficiency import hardware_name
from medfusion.evaluation import load_checkpoint, predict_dataset
from medfusion.metrics import hd95, overlap_metrics
from medfusion.training.cv import run_fold
from medfusion.training.loop import resolve_precision

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvasir", type=Path, default=REPO.parent / "shared" / "datasets" / "kvasir_seg")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--region-size", type=int, default=16, help="16 at 128x128 keeps the paper's N = 64 regions"
    )
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp folder); "
                    "a variant whose scores.npz is there is not retrained")  # fmt: skip
    ap.add_argument("--variants", nargs="+", default=["CASNet + DRGO", "CASNet, no DRGO"],
                    help="first one is compared with each other one; also 'CASNet + DRGO without boundary'")  # fmt: skip
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="drgo_effect_"))
    raw = read_yaml(REPO / "params.yaml")
    raw["data"]["image_size"] = args.size
    raw["model"]["base_channels"] = args.base
    raw["drgo"]["region_size"] = args.region_size
    raw["train"].update(epochs=args.epochs, lr=args.lr, patience=args.epochs, num_workers=2)
    params = params_from_dict(raw)
    start = time.perf_counter()
    if not (work / "proc" / "meta.json").exists():
        fetch_dataset("kvasir_seg", work / "raw", args.kvasir, params.data.synthetic)
        preprocess_dataset("kvasir_seg", work / "raw", work / "proc", args.size)
    groups = {c["case_id"]: c["group"] for c in read_json(work / "proc" / "cases.json")}
    split = make_split(groups, "fraction", params.cv.n_folds, params.cv.split_seed, params.cv.test_fraction)
    precision = resolve_precision("cpu", cpu_bf16=True, channels_last=True)
    print(
        f"# data ready in {time.perf_counter() - start:.0f} s: {len(split['test'])} test images", flush=True
    )

    no_boundary = dataclasses.replace(params, model=dataclasses.replace(params.model, use_boundary=False))
    variants = {
        "CASNet + DRGO": params,
        "CASNet, no DRGO": dataclasses.replace(
            no_boundary, drgo=dataclasses.replace(params.drgo, use_sampling=False, use_adaptive=False)
        ),
        "CASNet + DRGO without boundary": no_boundary,
    }
    variants = {k: v for k, v in variants.items() if k in args.variants}
    scores: dict[str, dict[str, np.ndarray]] = {}
    seconds = {}
    for name, p in variants.items():
        out = work / name.replace(" ", "_").replace(",", "").replace("+", "plus")
        if (out / "scores.npz").exists():
            cached = np.load(out / "scores.npz")
            scores[name] = {"dice": cached["dice"], "hd95": cached["hd95"]}
            seconds[name] = float(cached["seconds"])
            print(f"# {name}: scores from {out / 'scores.npz'}", flush=True)
            continue
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        result = run_fold(
            p, "kvasir_seg", "casnet", work / "proc", split, 0, 0, out, lambda m, s: None, precision
        )
        seconds[name] = time.perf_counter() - t0
        model, _ = load_checkpoint(out / "model.pt", precision)
        test = SegDataset(work / "proc", split["test"])
        preds = predict_dataset(model, test, 16, precision)
        targets = np.asarray(test.masks[test.indices])
        dice = np.array(
            [overlap_metrics(pr == 1, t == 1)["dice"] for pr, t in zip(preds, targets, strict=True)]
        )
        dist = np.array([hd95(pr == 1, t == 1) for pr, t in zip(preds, targets, strict=True)])
        scores[name] = {"dice": dice, "hd95": dist}
        np.savez(out / "scores.npz", dice=dice, hd95=dist, seconds=seconds[name])
        print(f"# {name}: best epoch {result['best_epoch'] + 1}, val Dice {result['best_val_dice']:.3f}, "
              f"{seconds[name] / 60:.1f} min", flush=True)  # fmt: skip

    names = list(scores)
    print(f"\n{len(split['test'])} Kvasir-SEG test images at {args.size}x{args.size}, CASNet base width {args.base}, "
          f"fold 0 (of 5) seed 0, {args.epochs} epochs, Adam lr {args.lr}, batch {params.train.batch_size}, "
          f"DRGO regions {args.region_size}x{args.region_size}; {hardware_name(precision.device)}; "
          f"{time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print(
        "| variant | Dice % (mean ± std over images) | HD95 px (mean ± std, defined cases) | HD95 undefined | train min |"
    )
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        d, h = s["dice"], s["hd95"]
        print(f"| {name} | {100 * d.mean():.2f} ± {100 * d.std(ddof=1):.2f} | {np.nanmean(h):.2f} ± {np.nanstd(h, ddof=1):.2f} "
              f"| {int(np.isnan(h).sum())} | {seconds[name] / 60:.1f} |")  # fmt: skip
    a, sa = names[0], scores[names[0]]
    for b in names[1:]:
        sb = scores[b]
        w_dice = stats.wilcoxon(sa["dice"], sb["dice"])
        both = ~np.isnan(sa["hd95"]) & ~np.isnan(sb["hd95"])
        w_hd = stats.wilcoxon(sa["hd95"][both], sb["hd95"][both])
        print(f"\nPaired Wilcoxon signed-rank over images, {a} vs {b}: Dice difference "
              f"{100 * (sa['dice'] - sb['dice']).mean():+.2f} points, p = {w_dice.pvalue:.3g} (n = {len(sa['dice'])}); "
              f"HD95 difference {np.mean(sa['hd95'][both] - sb['hd95'][both]):+.2f} px, p = {w_hd.pvalue:.3g} "
              f"(n = {int(both.sum())}, images where both are defined).")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
