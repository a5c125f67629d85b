"""Golden comparison: does a change leave the results as they were?

    python tools/golden.py --before 4f66516 --after HEAD            # about 5 minutes on 2 cores
    python tools/golden.py --before main~3 --after HEAD --keep /tmp/golden

Each revision is cloned into a temporary folder and runs the quickstart there in fp32 (the same
seeds; `train.cpu_bf16=false`, `train.channels_last=false`, so that no machine-dependent precision
choice enters), then `medfusion predict` on the first five generated images with the CASNet run.
The two runs must give byte-identical:

- every `data/eval/<dataset>/<entry>/per_case.csv`,
- Tables 1-4 and the statistics (`reports/tables/*.md` and `*.csv`, `reports/stats.csv`),
- `reports/claims.md`, its measured inference times masked (they are timings, not results),
- the predicted masks (`predict/*_mask.png`).

Both revisions run on this machine in this session, with this interpreter's packages (its
`medfusion` is taken from each clone through PYTHONPATH): fp32 results can differ between CPU
kinds, so a golden file is never carried from another machine. Prints a markdown table of the
compared files and exits 1 when any differs or is missing on one side.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FP32 = ["-S", "train.cpu_bf16=false", "-S", "train.channels_last=false"]
COMPARED = [
    "data/eval/*/*/per_case.csv",
    "reports/tables/table[1-4].md",
    "reports/tables/table[1-4].csv",
    "reports/tables/statistics.md",
    "reports/tables/statistics.csv",
    "reports/stats.csv",
    "reports/claims.md",
    "predict/*_mask.png",
]
TIMING = re.compile(rb"\d+(?:\.\d+)? ms(?:/image)?")  # claims.md's measured inference times


def run(cmd: list[str], cwd: Path, env: dict) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"golden: {' '.join(cmd)} failed in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def make(rev: str, folder: Path) -> dict[str, str]:
    """Clone `rev` into `folder`, run the fp32 quickstart and the prediction; -> {file: sha256}."""
    run(["git", "clone", "--quiet", str(REPO), str(folder)], REPO, dict(os.environ))
    run(["git", "checkout", "--quiet", "--detach", rev], folder, dict(os.environ))
    env = {
        **os.environ,
        "PYTHONPATH": str(folder),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", NO_ALBUMENTATIONS_UPDATE="1")
    env.update(GIT_AUTHOR_NAME="golden", GIT_AUTHOR_EMAIL="golden@localhost")
    env.update(GIT_COMMITTER_NAME="golden", GIT_COMMITTER_EMAIL="golden@localhost")
    print(f"golden: {rev} in {folder}: quickstart (fp32) ...", file=sys.stderr, flush=True)
    run([sys.executable, "-m", "medfusion.cli", "quickstart", "--name", "golden", *FP32], folder, env)
    images = sorted((folder / "data" / "raw" / "synthetic" / "images").iterdir())[:5]
    run([sys.executable, "-m", "medfusion.cli", "predict", "--run", "data/runs/synthetic/casnet",
         *map(str, images), "--out", "predict", "--device", "cpu"], folder, env)  # fmt: skip
    digests = {}
    for pattern in COMPARED:
        for path in sorted(folder.glob(pattern)):
            data = path.read_bytes()
            if path.name == "claims.md":
                data = TIMING.sub(b"<ms>", data)
            digests[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the revision before the change")
    parser.add_argument("--after", default="HEAD", help="the revision after it (default HEAD)")
    parser.add_argument("--keep", type=Path, help="keep the two clones under this folder")
    args = parser.parse_args()
    revs = {}
    for label, rev in (("before", args.before), ("after", args.after)):
        found = subprocess.run(["git", "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"], cwd=REPO,
                               capture_output=True, text=True)  # fmt: skip
        if found.returncode:
            sys.exit(f"golden: --{label} {rev}: not a revision of {REPO}")
        revs[label] = found.stdout.strip()
    base = Path(tempfile.mkdtemp(prefix="golden-")) if args.keep is None else args.keep
    try:
        found = {label: make(rev, base / label) for label, rev in revs.items()}
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"Golden comparison, {revs['before']} -> {revs['after']} (fp32 quickstart + predict)\n")
    print("| file | result |\n|---|---|")
    differ = 0
    for name in sorted(set(found["before"]) | set(found["after"])):
        a, b = found["before"].get(name), found["after"].get(name)
        result = (
            "identical"
            if a == b
            else ("only after" if a is None else "only before" if b is None else "DIFFERS")
        )
        differ += result != "identical"
        print(f"| {name} | {result} |")
    print(f"\n{len(found['after'])} files after, {differ} not identical")
    sys.exit(1 if differ or not found["after"] else 0)


if __name__ == "__main__":
    main()
