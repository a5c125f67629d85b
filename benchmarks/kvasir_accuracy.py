"""Accuracy on real Kvasir-SEG at a fixed CPU budget: CASNet + DRGO against U-Net and Attention U-Net.

    python benchmarks/kvasir_accuracy.py --kvasir ../shared/datasets/kvasir_seg --out reports/kvasir_accuracy

The protocol (every choice fixed before any test number was seen; nothing here reads the test split
before training has finished):

* data: all 1000 Kvasir-SEG pairs (fingerprint-verified), preprocessed by the pipeline at --size
  (CLAHE off for RGB, z-score per image); the pipeline's seeded 80/20 split (200 test images) and
  fold 0 of its 5 folds inside the 800 training images (640 train, 160 validation); seed 0.
* training: the pipeline's `run_fold` (the same code as `dvc repro`) with params.yaml except: image
  size --size, base width --base for every model, --epochs epochs with early stopping switched off
  (patience = epochs; the checkpoint kept is the epoch of lowest validation loss), Adam lr --lr with
  cosine annealing, batch 16, params.yaml's augmentation, DRGO regions of --region-size pixels (16 at
  128x128 keeps the paper's N = 64 regions), the CPU precision resolved as training resolves it (medfusion/hardware.py), `train.compile` as in
  params.yaml (regions: CASNet's attention and Attention U-Net's gates are compiled).
* models (--variants): `casnet` (CASNet + DRGO, the method), `unet`, `attention_unet` (the paper's
  baselines, trained with L_seg as the paper does), and `casnet_no_drgo` (CASNet trained with L_seg
  alone), which separates what the architecture and what the training objective contribute.
* test: each checkpoint predicts the 200 test images (argmax, no post-processing). Per image, polyp
  class, at --size: Dice, IoU, HD95 in pixels (an empty prediction of a non-empty mask has no HD95:
  counted apart, left out of the mean). Paired Wilcoxon signed-rank test (scipy, two-sided) of
  CASNet + DRGO against each other model over the 200 images (HD95: over the images where both are
  defined).

Writes --out/results.md (the tables), results.json, per_image.csv, learning_curves.csv, and for
CASNet the learned attention blends alpha and MSF branch weights. A variant whose scores are in
--work is not retrained (so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from medfusion.config import params_from_dict, read_yaml
from medfusion.data.dataset import SegDataset
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import read_history, read_json, write_json
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.entries import resolve_entry, resources
from medfusion.evaluation import predict_dataset
from medfusion.hardware import machine_summary, resolve_precision
from medfusion.inference.checkpoint import load_checkpoint
from medfusion.metrics import hd95, overlap_metrics
from medfusion.models.casnet import CASNet
from medfusion.training.fold import run_fold

REPO = Path(__file__).resolve().parents[1]
TITLES = {
    "casnet": "CASNet + DRGO",
    "casnet_no_drgo": "CASNet, L_seg only (no DRGO)",
    "unet": "U-Net",
    "attention_unet": "Attention U-Net",
    "casnet_no_boundary": "CASNet + DRGO without boundary term",
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvasir", type=Path, default=REPO.parent / "shared" / "datasets" / "kvasir_seg")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--region-size", type=int, default=16)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", default=None, help="train.compile (default: params.yaml's)")
    ap.add_argument("--variants", nargs="+", default=["casnet", "unet", "attention_unet", "casnet_no_drgo"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvasir_accuracy"), help="data and checkpoints")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "kvasir_accuracy")
    return ap.parse_args()


def bench_params(args: argparse.Namespace):
    raw = read_yaml(REPO / "params.yaml")
    raw["datasets"] = ["kvasir_seg"]
    raw["data"]["image_size"] = args.size
    raw["model"]["base_channels"] = args.base
    raw["unet"]["base_channels"] = args.base
    raw["attention_unet"]["base_channels"] = args.base
    raw["drgo"]["region_size"] = args.region_size
    raw["ablations"]["casnet_no_drgo"] = {"drgo": False}
    raw["ablations"]["casnet_no_boundary"] = {"use_boundary": False}
    raw["train"].update(epochs=args.epochs, lr=args.lr, patience=args.epochs, batch_size=16, num_workers=2)
    if args.compile:
        raw["train"]["compile"] = args.compile
    return params_from_dict(raw, source="benchmarks/kvasir_accuracy.py")


def attention_summary(model: torch.nn.Module) -> dict:
    """CASNet's learned blends: alpha = sigmoid(theta) of each CA (skips from deep to full resolution,
    then the bottleneck) and the MSF branch weights softmax(phi)."""
    if not isinstance(model, CASNet):
        return {}
    with torch.no_grad():
        return _blends(model)


def _blends(model: CASNet) -> dict:
    alphas = {}
    if model.skip_attention is not None:
        for i, ca in enumerate(model.skip_attention):
            alphas[f"skip 1/{2 ** (3 - i)}"] = float(ca.alpha)
    if model.bottleneck_attention is not None:
        alphas["bottleneck"] = float(model.bottleneck_attention.alpha)
    out = {"ca_alpha": alphas}
    if model.msf is not None:
        out["msf_weights"] = [round(float(w), 4) for w in model.msf.branch_weights()]
    return out


def main() -> None:
    args = parse_args()
    params = bench_params(args)
    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = work / f"proc{args.size}"
    if not (proc / "meta.json").exists():
        fetch_dataset("kvasir_seg", work / "raw", args.kvasir, params.data.synthetic)
        preprocess_dataset("kvasir_seg", work / "raw", proc, args.size)
    groups = {c["case_id"]: c["group"] for c in read_json(proc / "cases.json")}
    split = make_split(groups, "fraction", params.cv.n_folds, params.cv.split_seed, params.cv.test_fraction)
    fold = split["folds"][args.fold]
    precision = resolve_precision("cpu", params.train.cpu_bf16, params.train.channels_last)
    print(f"# data ready in {time.perf_counter() - start:.0f} s: {len(fold['train'])} train, "
          f"{len(fold['val'])} val, {len(split['test'])} test", flush=True)  # fmt: skip

    test = SegDataset(proc, split["test"])
    targets = np.asarray(test.masks[test.indices])
    results: dict[str, dict] = {}
    for name in args.variants:
        run_dir = work / f"{name}_s{args.size}_b{args.base}_e{args.epochs}_f{args.fold}_seed{args.seed}"
        cached = run_dir / "result.json"
        if not cached.exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            entry = resolve_entry(params, "kvasir_seg", name)
            record = run_fold(
                entry,
                proc,
                split,
                args.fold,
                args.seed,
                run_dir,
                lambda m, s: None,
                resources(params),
                precision,
            )
            record["wall_seconds"] = time.perf_counter() - t0
            model, _ = load_checkpoint(run_dir / "model.pt", precision)
            preds = predict_dataset(model, test, 16, precision)
            per = [overlap_metrics(p == 1, t == 1) for p, t in zip(preds, targets, strict=True)]
            record["dice"] = [m["dice"] for m in per]
            record["iou"] = [m["iou"] for m in per]
            record["hd95"] = [hd95(p == 1, t == 1) for p, t in zip(preds, targets, strict=True)]
            # one mask empty, the other not: HD95 is the image's diagonal (metrics' rule), counted
            record["penalised"] = sum(
                bool((p == 1).any()) != bool((t == 1).any()) for p, t in zip(preds, targets, strict=True)
            )
            record["attention"] = attention_summary(model)
            record["history"] = read_history(run_dir / "history.json")
            write_json(cached, record)
        results[name] = read_json(cached)
        r = results[name]
        print(f"# {TITLES.get(name, name)}: best epoch {r['best_epoch'] + 1}, val Dice {r['best_val_dice']:.3f}, "
              f"test Dice {100 * np.mean(r['dice']):.2f}, {r['wall_seconds'] / 60:.1f} min", flush=True)  # fmt: skip

    header = (
        f"Kvasir-SEG, {len(split['test'])} test images at {args.size}x{args.size}; fold {args.fold} of "
        f"{params.cv.n_folds} for validation ({len(fold['train'])} train / {len(fold['val'])} val), seed "
        f"{args.seed}; base width {args.base}; {args.epochs} epochs, Adam lr {args.lr} cosine, batch 16, "
        f"augmentation on; DRGO regions {args.region_size}px; train.compile = {params.train.compile}; "
        f"{machine_summary()}; {precision.describe()}; Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}; total wall time {(time.perf_counter() - start) / 60:.1f} min "
        "(variants read from --work are counted at their own training time below)."
    )
    md = [f"# Kvasir-SEG accuracy at a CPU budget\n\n{header}\n"]
    md.append(
        "Per test image, polyp class, argmax prediction without post-processing; mean ± std over the "
        "200 images; one run per model (one fold, one seed).\n"
    )
    md.append("| model | Dice % | IoU % | HD95 px | HD95 penalised | best epoch | val Dice | train min |")
    md.append("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        d, i, h = (np.asarray(r[k], dtype=float) for k in ("dice", "iou", "hd95"))
        md.append(
            f"| {TITLES.get(name, name)} | {100 * d.mean():.2f} ± {100 * d.std(ddof=1):.2f} | "
            f"{100 * i.mean():.2f} ± {100 * i.std(ddof=1):.2f} | {h.mean():.2f} ± {h.std(ddof=1):.2f} | "
            f"{r.get('penalised', '-')} | {r['best_epoch'] + 1} | {r['best_val_dice']:.3f} | "
            f"{r['train_seconds'] / 60:.1f} |"
        )
    comparisons = []
    if "casnet" in results:
        md.append(
            "\nPaired Wilcoxon signed-rank tests (two-sided), Δ = the other model minus CASNet + DRGO:\n"
        )
        md.append(
            "| other model | Δ Dice points | p (Dice) | Δ IoU points | p (IoU) | Δ HD95 px | p (HD95) | n (HD95) |"
        )
        md.append("|---|---|---|---|---|---|---|---|")
        a = results["casnet"]
        for name, b in results.items():
            if name == "casnet":
                continue
            row = {"other": name}
            for key in ("dice", "iou", "hd95"):
                x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
                both = ~np.isnan(x) & ~np.isnan(y)
                diff = y[both] - x[both]  # the pipeline's one direction: the other model - CASNet
                row[key] = (100 if key != "hd95" else 1) * float(diff.mean())
                row[f"p_{key}"] = float(stats.wilcoxon(x[both], y[both]).pvalue) if diff.any() else 1.0
                row[f"n_{key}"] = int(both.sum())
            comparisons.append(row)
            md.append(
                f"| {TITLES.get(name, name)} | {row['dice']:+.2f} | {row['p_dice']:.2g} | {row['iou']:+.2f} | "
                f"{row['p_iou']:.2g} | {row['hd95']:+.2f} | {row['p_hd95']:.2g} | {row['n_hd95']} |"
            )
    md.append("\nValidation Dice by epoch (fold 0 validation images, the learning curves):\n")
    epochs = sorted({e for r in results.values() for e in range(len(r["history"]))})
    marks = [e for e in epochs if (e + 1) % 5 == 0 or e == 0]
    md.append("| model | " + " | ".join(f"ep {e + 1}" for e in marks) + " |")
    md.append("|---|" + "---|" * len(marks))
    for name, r in results.items():
        vals = [f"{r['history'][e]['val_dice']:.3f}" if e < len(r["history"]) else "" for e in marks]
        md.append(f"| {TITLES.get(name, name)} | " + " | ".join(vals) + " |")
    for name, r in results.items():
        if r.get("attention"):
            md.append(f"\n{TITLES.get(name, name)}, learned blends: CA alpha = sigmoid(theta) "
                      f"{json.dumps({k: round(v, 3) for k, v in r['attention']['ca_alpha'].items()})}; "
                      f"MSF branch weights (rates 1, 2, 4, 6) {r['attention'].get('msf_weights')}.")  # fmt: skip
        last = r["history"][-1]
        terms = {k: round(v, 4) for k, v in last.items() if k.startswith("drgo_")}
        if terms:
            md.append(
                f"\n{TITLES.get(name, name)}, DRGO terms in the last epoch (means over batches): {terms}."
            )
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    write_json(out / "results.json", {
        "settings": vars(args) | {"kvasir": str(args.kvasir), "work": str(args.work), "out": str(args.out)},
        "header": header,
        "models": {n: {k: v for k, v in r.items() if k not in ("dice", "iou", "hd95")} for n, r in results.items()},
        "comparisons": comparisons,
    })  # fmt: skip
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "case_id", "dice", "iou", "hd95_px"])
        for name, r in results.items():
            for case, d, i, h in zip(split["test"], r["dice"], r["iou"], r["hd95"], strict=True):
                writer.writerow([name, case, d, i, h])
    with open(out / "learning_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = sorted({k for r in results.values() for row in r["history"] for k in row})
        writer.writerow(["model", *keys])
        for name, r in results.items():
            for row in r["history"]:
                writer.writerow([name, *(row.get(k, "") for k in keys)])
    print(text)


if __name__ == "__main__":
    main()
