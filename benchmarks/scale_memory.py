"""Peak memory of each pipeline stage on LiTS17-shaped data at 1/8, 1/2 and full size.

    python benchmarks/scale_memory.py --fraction 0.125 --work /tmp/scale   # one size
    python benchmarks/scale_memory.py --fraction 0.125 0.5 1 --work /tmp/scale --report reports/scale_memory.md
    python benchmarks/scale_memory.py --fraction 1 --stages preprocess split   # the data stages only

The data: 131 x `fraction` generated CT volumes of 512x512 in-plane with LiTS-like slice counts
(seeded, between 74 and 987, scaled so that the full size holds about 58,638 slices as LiTS17 does;
volume 0 is the largest, 987 slices, at every fraction, so that the fractions differ in the number of
cases and not in the largest case, which is what memory is allowed to grow with),
labels 0/1/2 (liver with tumours inside), spacing (z, y, x) = (1.5-5 mm, 0.7 mm, 0.7 mm), written
once as volume-N.nii.gz / segmentation-N.nii.gz (gzip level 1) and read as the `lits17` dataset.
Then each stage runs in its own process, whose peak RSS is recorded (the kernel's high-water mark,
VmHWM of /proc/self/status, read by the stage itself as it ends: `ru_maxrss` of a child started by
vfork would count the parent's peak too):
    preprocess   the lits17 reader at data.image_size (default 256), one worker (a second worker
                 adds its own case: see preprocess.py's docstring)
    split        30 x fraction test volumes (at least 2), 5 folds; the largest volume is put in the
                 test split (swapped with a drawn test volume), since scoring a test case holds more
                 than choosing post-processing on a validation case does
    train        a tiny U-Net (base width 4), 1 epoch, batch 16, no augmentation, for 5 folds x
                 --seeds seeds (the protocol's 3; fewer where 2 cores cannot train 15), fp32,
                 loader in-process; with --train-batches N each epoch stops after N batches (the
                 benchmark's shuffled sampler is cut short; validation stays the whole fold): what a
                 step holds does not depend on how many steps an epoch has, and a full-size epoch
                 of 36k slices takes hours on 2 cores); --precision auto (the default) computes as
                 the pipeline does on this CPU (bf16 autocast + channels_last where the CPU has AMX,
                 fp32 elsewhere: medfusion.hardware), fp32 / bf16 force one
    evaluate     every run and the fold ensemble at eval.resolution original (ground truth read
                 from the generated raw copy), post-processing chosen on validation
    report       summary, Tables 1-4 and the statistics of that one entry
The goal (issue 15): each stage's peak RSS at most 4 GB at full size and within 1.3x between 1/8
and full size. Prints a markdown table and, with --report, writes it (with the machine) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "split", "train", "evaluate", "report")
LITS_VOLUMES, LITS_SLICES = 131, 58638


def slice_counts(volumes: int, seed: int = 0) -> list[int]:
    """LiTS-like slice counts of the first `volumes` of 131: lognormal, clipped to [74, 987], scaled to
    58,638 / 131 on average, the largest first (every fraction holds the full size's largest case)."""
    rng = np.random.default_rng(seed)
    raw = np.clip(rng.lognormal(np.log(400), 0.45, LITS_VOLUMES), 74, 987)
    raw = np.clip(np.rint(raw * LITS_SLICES / raw.sum()), 74, 987).astype(int)
    largest = int(np.argmax(raw))
    ordered = [raw[largest], *np.delete(raw, largest)]
    return [int(v) for v in ordered[:volumes]]


def write_volume(out_dir: Path, i: int, depth: int, seed: int) -> None:
    """One CT-like volume (int16 HU) and its labels, slice by slice (memory: the volume's int16 + uint8)."""
    import nibabel as nib

    rng = np.random.default_rng(seed + i)
    size = 512
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    body = ((yy - 256) / 230) ** 2 + ((xx - 256) / 200) ** 2 <= 1
    cy, cx, ry, rx = rng.uniform(200, 300), rng.uniform(180, 280), rng.uniform(70, 110), rng.uniform(80, 120)
    tumours = [(rng.uniform(0.3, 0.7) * depth, rng.uniform(-30, 30), rng.uniform(-30, 30), rng.uniform(8, 20))
               for _ in range(int(rng.integers(0, 4)))]  # fmt: skip
    volume = np.empty((depth, size, size), np.int16)
    labels = np.zeros((depth, size, size), np.uint8)
    spacing_z = float(rng.uniform(1.5, 5.0))
    for k in range(depth):
        z = (k - depth / 2) / (0.45 * depth)
        scale = max(1 - z * z, 0.0) ** 0.5
        liver = body & (
            (((yy - cy) / max(ry * scale, 1e-3)) ** 2 + ((xx - cx) / max(rx * scale, 1e-3)) ** 2) <= 1
        )
        tumour = np.zeros_like(liver)
        for tz, ty, tx, r in tumours:
            rz = r * r - ((k - tz) * spacing_z / 0.7) ** 2
            if rz > 0:
                tumour |= (yy - cy - ty) ** 2 + (xx - cx - tx) ** 2 <= rz
        tumour &= liver
        hu = np.where(body, 40, -1000) + 60 * liver - 50 * tumour + ((yy + xx + 7 * k) % 23 - 11)
        volume[k] = hu
        labels[k] = liver.astype(np.uint8) + tumour.astype(np.uint8)
    affine = np.diag([0.7, 0.7, spacing_z, 1.0])
    for name, array in ((f"volume-{i}.nii.gz", volume), (f"segmentation-{i}.nii.gz", labels)):
        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)  # (x, y, z) on disk
        tmp = out_dir / f".{name}.tmp.nii.gz"
        nib.save(image, tmp)  # nibabel's default gzip level is 1: fast
        tmp.replace(out_dir / name)


def generate(raw: Path, fraction: float, jobs: int = 1) -> dict:
    """Write the volumes not yet there (`jobs` processes); the data does not depend on `jobs`."""
    from concurrent.futures import ProcessPoolExecutor

    counts = slice_counts(max(2, round(LITS_VOLUMES * fraction)))
    raw.mkdir(parents=True, exist_ok=True)
    todo = [(i, d) for i, d in enumerate(counts) if not (raw / f"segmentation-{i}.nii.gz").exists()]
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for done in [pool.submit(write_volume, raw, i, depth, 0) for i, depth in todo]:
            done.result()
    return {"volumes": len(counts), "slices": sum(counts), "largest": max(counts)}


def _precision(name: str):
    """The CPU precision of --precision: "auto" (the pipeline's default here), "fp32" or "bf16"."""
    from medfusion.hardware import AUTO, resolve_precision

    return resolve_precision("cpu", {"auto": AUTO, "fp32": False, "bf16": True}[name], AUTO)


def _params(image_size: int, seeds: int = 3, precision: str = "auto"):
    from medfusion.config import params_from_dict, read_yaml

    raw = read_yaml(REPO / "params.yaml")
    raw["datasets"] = ["lits17"]
    raw["data"]["image_size"] = image_size
    raw["data"]["workers"] = 1
    raw["unet"]["base_channels"] = 4
    # no augmentation: memory is the point, and albumentations' elastic field costs 2 s a batch here
    raw["train"].update(
        epochs=1,
        batch_size=16,
        num_workers=0,
        compile="off",
        device="cpu",
        augment=False,
        cpu_bf16={"auto": "auto", "fp32": False, "bf16": True}[precision],
    )
    raw["cv"].update(n_folds=5, seeds=list(range(seeds)))
    raw["eval"]["batch_size"] = 16
    raw["drgo"]["region_size"] = min(raw["drgo"]["region_size"], image_size // 2)
    return params_from_dict(raw)


def largest_in_test(split: dict, largest: str = "volume-0") -> dict:
    """`split` with `largest` (the 987-slice volume) in test: swapped with the first drawn test volume,
    which takes its place in the folds."""
    if largest in split["test"]:
        return split
    moved = split["test"][0]
    split["test"] = sorted([*split["test"][1:], largest])
    for fold in split["folds"]:
        for key in ("train", "val"):
            fold[key] = sorted(moved if c == largest else c for c in fold[key])
    return split


def _cut_epochs(batches: int, batch_size: int) -> None:
    """Training epochs of at most `batches` batches: the first batches x batch_size draws of the
    shuffled (epoch, index) order (medfusion.data.dataset.EpochSampler), in this process only."""
    from medfusion.data.dataset import EpochSampler
    from medfusion.training import fold

    class ShortEpochs(EpochSampler):
        def __len__(self) -> int:
            return min(self.size, batches * batch_size)

        def __iter__(self):
            for n, pair in enumerate(super().__iter__()):
                if n == len(self):
                    return
                yield pair

    fold.EpochSampler = ShortEpochs


def run_stage(
    stage: str, work: Path, fraction: float, image_size: int, seeds: int = 3, train_batches: int | None = None,
    precision: str = "auto",
) -> None:  # fmt: skip
    """One stage, in this process (the parent measures its peak RSS)."""
    from medfusion.data.io import read_json, write_json

    params = _params(image_size, seeds, precision)
    raw, proc, runs_dir = work / "raw", work / "processed", work / "runs"
    if stage == "preprocess":
        from medfusion.data.preprocess import PreprocessSettings, preprocess_dataset

        preprocess_dataset("lits17", raw, proc, PreprocessSettings(image_size), workers=1)
    elif stage == "split":
        from medfusion.data.splits import make_split

        groups = {c["case_id"]: c["group"] for c in read_json(proc / "cases.json")}
        test = max(2, round(30 * fraction))
        write_json(work / "split.json", largest_in_test(make_split(groups, f"count:{test}", 5, 0, 0.2)))
    elif stage == "train":
        from medfusion.entries import resolve_entry, resources
        from medfusion.training.fold import run_fold

        entry = resolve_entry(params, "lits17", "unet")
        split = read_json(work / "split.json")
        if train_batches:
            _cut_epochs(train_batches, params.train.batch_size)
        runs = []
        for fold in range(5):
            for seed in params.cv.seeds:
                run_fold(entry, proc, split, fold, seed, runs_dir / f"fold{fold}_seed{seed}",
                         lambda metrics, step: None, resources(params), _precision(precision))  # fmt: skip
                runs.append({"fold": fold, "seed": seed})
        write_json(runs_dir / "summary.json", {"runs": runs})
    elif stage == "evaluate":
        from medfusion.evaluation import evaluate_model

        per_case, info, _ = evaluate_model(
            read_json(runs_dir / "summary.json")["runs"], runs_dir, proc, read_json(work / "split.json"), 16,
            _precision(precision), resolution="original", raw_dir=raw,
        )  # fmt: skip
        per_case.assign(dataset="lits17", model="unet").to_csv(work / "per_case.csv", index=False)
        write_json(work / "eval.json", info)
    elif stage == "report":
        import pandas as pd

        from medfusion.report import build_tables, global_dice_frame, summarize_runs
        from medfusion.stats import compare_models

        per_case = pd.read_csv(work / "per_case.csv")
        info = read_json(work / "eval.json")
        summarize_runs(per_case)
        pooled = global_dice_frame("lits17", "unet", info["global_dice"])
        build_tables(per_case, {"lits17": info}, ["unet"], {}, compare_models(per_case, ["unet"]), pooled)
    else:
        raise SystemExit(f"unknown stage {stage!r}; one of {STAGES}")
    (work / f".peak_{stage}").write_text(str(_high_water_mark()))


def _high_water_mark() -> int:
    """This process's peak resident set size in bytes (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status (Linux only)")


def measure(
    stage: str, work: Path, fraction: float, image_size: int, seeds: int, train_batches: int | None,
    precision: str = "auto",
) -> tuple[int, float]:  # fmt: skip
    """(peak RSS in bytes, seconds) of `stage` in a child process."""
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--fraction", str(fraction),
           "--image-size", str(image_size), "--seeds", str(seeds), "--precision", precision]  # fmt: skip
    if train_batches:
        cmd += ["--train-batches", str(train_batches)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({done.returncode}) at fraction {fraction}")
    return int((work / f".peak_{stage}").read_text()), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, nargs="+", default=[0.125])
    ap.add_argument("--work", type=Path, default=Path("/tmp/medfusion_scale"))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per fold (the protocol: 3)")
    ap.add_argument("--train-batches", type=int, help="stop each training epoch after this many batches")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="CPU precision of train and evaluate (auto: the pipeline's default on this CPU)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=1, help="processes writing the generated volumes")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="the stages to measure")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    os.environ.update(
        {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1"}
    )
    if args.stage:
        run_stage(args.stage, args.work, args.fraction[0], args.image_size, args.seeds, args.train_batches,
                  args.precision)  # fmt: skip
        return
    from medfusion.hardware import machine_summary

    results = []
    for fraction in args.fraction:
        work = args.work / f"f{fraction:g}"
        t0 = time.perf_counter()
        data = generate(work / "raw", fraction, args.jobs)
        generated = time.perf_counter() - t0
        row = {"fraction": fraction, **data, "generate_s": generated}
        for stage in args.stages:
            row[stage] = measure(
                stage, work, fraction, args.image_size, args.seeds, args.train_batches, args.precision
            )
            print(
                f"fraction {fraction:g} {stage}: {row[stage][0] / 2**30:.2f} GiB, {row[stage][1]:.0f} s",
                flush=True,
            )
        results.append(row)
    lines = [
        f"Peak RSS per stage (GiB) and wall time, LiTS17-shaped generated data at {args.image_size}x{args.image_size}, "
        f"5 folds x {args.seeds} seed(s), {_precision(args.precision).reason}, on {machine_summary()}; "
        f"`python benchmarks/scale_memory.py --fraction "
        f"{' '.join(f'{f:g}' for f in args.fraction)} --image-size {args.image_size} --seeds {args.seeds}"
        f" --precision {args.precision}{f' --train-batches {args.train_batches}' if args.train_batches else ''}"
        f"{'' if args.stages == list(STAGES) else ' --stages ' + ' '.join(args.stages)}`.",
        "",
        "| fraction | volumes | slices | largest volume | " + " | ".join(args.stages) + " |",
        "|---|---|---|---|" + "---|" * len(args.stages),
    ]
    for r in results:
        cells = [f"{r[s][0] / 2**30:.2f} ({r[s][1]:.0f} s)" for s in args.stages]
        lines.append(
            f"| {r['fraction']:g} | {r['volumes']} | {r['slices']} | {r['largest']} slices | "
            + " | ".join(cells)
            + " |"
        )
    if len(results) > 1:
        ratios = [max(r[s][0] for r in results) / min(r[s][0] for r in results) for s in args.stages]
        lines.append("| largest / smallest | | | | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(results))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)


if __name__ == "__main__":
    main()
