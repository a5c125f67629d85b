"""What a DVC stage costs before it does any work: a fresh Python process that imports its entry point.

    python benchmarks/stage_overhead.py --repeats 5
    python benchmarks/stage_overhead.py --timeline quickstart.log   # also: stage times of a quickstart

For each `pipeline.<stage>` module: the median wall time of `python -c "import pipeline.<stage>"` over
--repeats fresh processes (after one warm-up run that fills the OS file cache), and whether torch or
MLflow were imported. The stages that train or evaluate import torch at start-up; MLflow is imported
when they first log. Also the one-time costs that come later in a training stage: the first
torch.optim.Adam (it imports torch._dynamo) and opening an MLflow sqlite store.

`--timeline FILE` reads the output of `medfusion quickstart` with a Unix time stamp before each line
(`medfusion quickstart 2>&1 | while IFS= read -r l; do echo "$(date +%s.%N) $l"; done > FILE`) and
prints how long each stage ran. Prints markdown.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["source", "fetch", "preprocess", "split", "train", "evaluate", "stats", "efficiency", "report"]
LATER = {
    "first torch.optim.Adam (imports torch._dynamo)": (
        "import torch; m = torch.nn.Linear(2, 2); import time; t = time.perf_counter(); "
        "torch.optim.Adam(m.parameters()); print(time.perf_counter() - t)"
    ),
    "open an existing MLflow sqlite store (import + client + schema check)": (
        "import time, sys; t = time.perf_counter(); from medfusion.training.tracking import _client; "
        "_client('sqlite:///' + sys.argv[1] + '/mlflow.db'); print(time.perf_counter() - t)"
    ),
}


def fresh_seconds(code: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def printed_seconds(code: str, *args: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def imports_of(module: str) -> str:
    code = f"import sys, {module}; print(','.join(m for m in ('torch', 'mlflow') if m in sys.modules) or '-')"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def timeline(path: Path) -> list[tuple[str, float]]:
    """(stage, seconds) from a time-stamped quickstart log: each stage lasts until the next starts."""
    marks = []
    for line in path.read_text().splitlines():
        stamp, _, text = line.partition(" ")
        if text.startswith("Running stage '"):
            marks.append((text.split("'")[1], float(stamp)))
        elif "quickstart finished" in text:
            marks.append(("(end)", float(stamp)))
    return [(name, marks[i + 1][1] - t) for i, (name, t) in enumerate(marks[:-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeline", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from medfusion.hardware import machine_summary

    print(f"# {machine_summary()}; Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}\n")
    base = statistics.median(fresh_seconds("pass") for _ in range(args.repeats))
    print(f"| stage entry point | s to start (median of {args.repeats}) | imports torch / mlflow |")
    print(f"|---|---|---|\n| (bare python) | {base:.2f} | - |")
    for stage in STAGES:
        module = f"pipeline.{stage}"
        fresh_seconds(f"import {module}")  # warm-up
        seconds = statistics.median(fresh_seconds(f"import {module}") for _ in range(args.repeats))
        print(f"| {stage} | {seconds:.2f} | {imports_of(module)} |", flush=True)
    print("\n| later one-time cost in a training stage | s |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, code in LATER.items():
            printed_seconds(code, tmp)  # warm-up; the store's schema is created here
            print(
                f"| {label} | {statistics.median(printed_seconds(code, tmp) for _ in range(3)):.2f} |",
                flush=True,
            )
    if args.timeline:
        rows = timeline(args.timeline)
        print(f"\n| quickstart stage ({args.timeline.name}) | s |\n|---|---|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.1f} |")
        print(f"| all stages | {sum(s for _, s in rows):.1f} |")


if __name__ == "__main__":
    main()
