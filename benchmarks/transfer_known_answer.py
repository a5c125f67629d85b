"""Known-answer check of cross-dataset scoring on real data: a trained Kvasir-SEG entry scored on its own
test images written out again in other lossless formats must give the in-dataset per-case Dice.

    python benchmarks/transfer_known_answer.py --entry casnet [--repo .] [--out /tmp/kvasir_formats]

Needs a finished pipeline on Kvasir-SEG in --repo (data/raw, data/processed, data/splits, data/runs,
data/eval of kvasir_seg, e.g. after `medfusion reproduce --profile cpu-budget`). Writes the test split's
images and masks as a custom dataset: images alternately as TIFF (LZW), PPM and 3-sample MinIsBlack
TIFF; masks as PNG / PGM with a few stray grey values (8..30) below the threshold. Then scores them
(1) with `medfusion evaluate --mask-threshold 127` and (2) with the transfer stage
(`python -m pipeline.transfer`, the target a named custom dataset with data.custom.<name>.mask_threshold
127), and compares every run's and the ensemble's per-case Dice, raw and post-processed, with
data/eval/kvasir_seg/<entry>/per_case.csv. Prints the largest absolute difference of each; the only
expected source of one is the in-dataset evaluation's float16 probabilities (near-ties of the argmax).
With --float32-reference the in-dataset evaluation is also recomputed here with float32 case
probabilities (medfusion.evaluation.CASE_DTYPE; the pipeline's precision and eval batch size), and
both are compared with that too: a difference of 0 there shows that float16 was the only source.
--reuse scores nothing again where --out already holds the evaluate and transfer outputs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml
from PIL import Image

from medfusion.config import read_yaml
from medfusion.data.io import read_image, read_json
from medfusion.data.preprocess import read_label_2d


def write_formats(repo: Path, out: Path) -> list[str]:
    """The test images of kvasir_seg as a custom dataset in other formats; -> the case ids written."""
    meta = read_json(repo / "data" / "processed" / "kvasir_seg" / "meta.json")
    test = read_json(repo / "data" / "splits" / "kvasir_seg.json")["test"]
    raw = Path(meta["raw_dir"]) if Path(meta["raw_dir"]).is_absolute() else repo / meta["raw_dir"]
    for d in ("images", "masks"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for k, case in enumerate(sorted(test)):
        image = read_image(raw / "images" / f"{case}.jpg")
        labels = read_label_2d(raw / meta["cases"][case]["label"], 2)
        if k % 3 == 0:
            Image.fromarray(image).save(out / "images" / f"{case}.tif", compression="tiff_lzw")
        elif k % 3 == 1:
            Image.fromarray(image).save(out / "images" / f"{case}.ppm")
        else:
            tifffile.imwrite(
                out / "images" / f"{case}.tif", image, photometric="minisblack", planarconfig="contig"
            )
        grey = labels.astype(np.uint8) * 255
        background = np.flatnonzero(grey.ravel() == 0)[:4]
        grey.ravel()[background] = [8, 13, 21, 30][: len(background)]  # a lossy tool's strays
        Image.fromarray(grey).save(out / "masks" / f"{case}{'.png' if k % 2 else '.pgm'}")
    return sorted(test)


def compare(ours: pd.DataFrame, reference: pd.DataFrame, key: str) -> float:
    """Largest |Dice difference| over every (run, postprocess, case) both tables hold."""
    ours = ours[ours["metric"] == "dice"].assign(case_id=ours["case_id"].map(lambda c: Path(c).stem))
    ref = reference[(reference["metric"] == "dice")]
    joined = ours.merge(ref, on=["run", "postprocess", "case_id", "class"], suffixes=("", "_ref"))
    assert len(joined) == len(ref), f"{key}: {len(joined)} of {len(ref)} reference rows matched"
    return float((joined["value"] - joined["value_ref"]).abs().max())


def float32_reference(repo: Path, entry: str) -> pd.DataFrame:
    """The in-dataset evaluation of kvasir_seg/<entry> as the evaluate stage computes it, with float32
    case probabilities instead of float16."""
    from medfusion import evaluation
    from medfusion.config import load_params
    from medfusion.hardware import resolve_precision

    params = load_params(repo / "params.yaml")
    t = params.train
    evaluation.CASE_DTYPE = np.float32
    runs_dir = repo / "data" / "runs" / "kvasir_seg" / entry
    per_case, _, _ = evaluation.evaluate_model(
        read_json(runs_dir / "summary.json")["runs"], runs_dir, repo / "data" / "processed" / "kvasir_seg",
        read_json(repo / "data" / "splits" / "kvasir_seg.json"), params.eval.batch_size,
        resolve_precision(t.device, t.cpu_bf16, t.channels_last), resolution="original",
        raw_dir=repo / "data" / "raw" / "kvasir_seg",
    )  # fmt: skip
    return per_case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--entry", default="casnet")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kvasir_formats"))
    ap.add_argument(
        "--float32-reference", action="store_true", help="also compare with a float32 in-dataset evaluation"
    )
    ap.add_argument("--reuse", action="store_true", help="reuse --out's evaluate and transfer outputs")
    args = ap.parse_args()
    repo = args.repo.resolve()
    cases = write_formats(repo, args.out / "data")
    reference = pd.read_csv(repo / "data" / "eval" / "kvasir_seg" / args.entry / "per_case.csv")
    env = {**os.environ, "PYTHONPATH": str(repo), "NO_ALBUMENTATIONS_UPDATE": "1"}
    run = repo / "data" / "runs" / "kvasir_seg" / args.entry
    subprocess.run(
        ["true"] if args.reuse else [sys.executable, "-m", "medfusion.cli", "evaluate", "--run", str(run), "--images",
         str(args.out / "data" / "images"), "--masks", str(args.out / "data" / "masks"), "--mask-threshold", "127",
         "--out", str(args.out / "evaluate")],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    evaluated = compare(pd.read_csv(args.out / "evaluate" / "per_case.csv"), reference, "medfusion evaluate")

    params = read_yaml(repo / "params.yaml")
    base = {k: v for k, v in params["data"]["custom"].items()} if "kind" in params["data"]["custom"] else {}
    params["data"]["custom"] = {"kvasir_formats": {**base, "kind": "image", "modality": "rgb",
                                "class_names": ["background", "polyp"], "group_pattern": None,
                                "title": "Kvasir-SEG test images in other formats", "mask_threshold": 127}}  # fmt: skip
    params["data"]["sources"]["kvasir_formats"] = str(args.out / "data")
    params["eval"]["transfer"] = {"kvasir_seg": ["kvasir_formats"]}
    params["models"] = {"casnet": ["casnet"], "baselines": ["unet"]}  # the reference and one baseline
    if args.entry not in ("casnet", "unet"):
        params["models"]["casnet" if args.entry.startswith("casnet") else "baselines"].append(args.entry)
    params_file = args.out / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(
        ["true"] if args.reuse else [sys.executable, "-m", "pipeline.transfer", "--dataset", "kvasir_seg", "--runs-dir", str(repo / "data/runs/kvasir_seg"),
         "--processed-dir", str(repo / "data/processed/kvasir_seg"), "--raw-root", str(args.out / "no_raw"),
         "--out-dir", str(args.out / "transfer"), "--params-file", str(params_file)],
        check=True, env=env, cwd=repo, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    transferred = compare(
        pd.read_csv(args.out / "transfer" / "kvasir_formats" / args.entry / "per_case.csv"),
        reference,
        "transfer",
    )
    print(f"kvasir_seg/{args.entry}: {len(cases)} test images in TIFF (LZW), PPM and 3-sample MinIsBlack TIFF, "
          f"masks PNG/PGM with stray greys + mask_threshold 127")  # fmt: skip
    print(f"largest |per-case Dice difference| vs the in-dataset evaluation (every run and the ensemble, raw and post): "
          f"medfusion evaluate {evaluated:.2e}, transfer stage {transferred:.2e}")  # fmt: skip
    if args.float32_reference:
        exact = float32_reference(repo, args.entry)
        ours = {"medfusion evaluate": pd.read_csv(args.out / "evaluate" / "per_case.csv"),
                "transfer": pd.read_csv(args.out / "transfer" / "kvasir_formats" / args.entry / "per_case.csv")}  # fmt: skip
        print(
            f"in-dataset evaluation, float16 vs float32 case probabilities: {compare(reference, exact, 'fp16'):.2e}"
        )
        for key, table in ours.items():
            print(f"{key} vs the float32 in-dataset evaluation: {compare(table, exact, key):.2e}")


if __name__ == "__main__":
    main()
