"""Inference and training cost of every model entry of params.yaml, on CPU or CUDA, in one run.

GPU run (the device machine's python3 has torch, numpy, scipy, pyyaml, tqdm, pillow; no install):

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/device_bench.py --device cuda --budget-s 180 --out $OUT && PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/device_bench.py --device cuda --models casnet,unet --compile --budget-s 120 --out $OUT/compiled

CPU check (about a minute on 2 cores; tiny widths):

    python benchmarks/device_bench.py --device cpu --quick --out /tmp/device_bench

Per model entry, at the params.yaml widths (the paper's) and the dataset's channels and classes,
on random input of size x size: parameters; eval-mode inference ms/image at batch 1 and 16
(torch.inference_mode); peak memory of inference at batch 16; one training step at batch 16
(forward, the entry's training loss -- DRGO where its params say so, else L_seg -- backward,
Adam/AdamW update, GradScaler under CUDA fp16): median ms/step and peak memory. Times are medians
after warm-up, with torch.cuda.synchronize() around each run on CUDA. Memory: CUDA
max_memory_allocated (tensors only; the CUDA context and the allocator's cache come on top); CPU
the process's peak RSS above the phase's start (psutil sampled every 5 ms). A failing phase (OOM,
compile error) is recorded in the row's notes and the run goes on. The CSV and markdown are
rewritten after every model, so a run stopped early still leaves the finished rows.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import gc
import io
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/device_bench.py` without an install
    sys.path.insert(0, str(REPO))

from medfusion.config import Params, params_from_dict, parse_yaml  # noqa: E402
from medfusion.data.distance import distance_map  # noqa: E402
from medfusion.efficiency import count_parameters  # noqa: E402
from medfusion.entries import drgo_settings, resolve_model  # noqa: E402
from medfusion.hardware import Precision, machine_summary, resolve_precision  # noqa: E402
from medfusion.losses import segmentation_loss  # noqa: E402
from medfusion.losses.drgo import class_frequencies  # noqa: E402
from medfusion.training.loop import DRGOObjective, optimizer_step  # noqa: E402

BATCH = 16
PAPER_ROW = {"model": "CASNet, paper (RTX 3090)", "ms_per_image_b1": 35.0, "peak_train_gb_b16": 7.8}
PAPER_NOTE = (
    "paper sec. 4: 35 ms/image at 256x256 and 7.8 GB peak memory on an RTX 3090 (24 GB); batch, "
    "precision and whether the 7.8 GB is inference or training are not stated"
)
FIELDS = [
    "model",
    "architecture",
    "parameters_m",
    "ms_per_image_b1",
    "ms_per_image_b16",
    "peak_infer_gb_b16",
    "train_ms_per_step_b16",
    "peak_train_gb_b16",
    "peak_train_reserved_gb_b16",
    "loss",
    "compile_s",
    "runs_b1",
    "runs_b16",
    "runs_train",
    "notes",
]
TABLE_FIELDS = FIELDS[2:8]  # parameters_m .. peak_train_gb_b16; the rest is CSV only (and notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--models", default=None, help="comma-separated entries; default all of params.yaml")
    ap.add_argument("--size", type=int, default=None, help="input side (default 256; 64 with --quick)")
    ap.add_argument(
        "--amp", choices=("auto", "on", "off"), default="auto",
        help="CUDA fp16 / CPU bf16 autocast; auto = as training resolves it (medfusion/hardware.py)",
    )  # fmt: skip
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (dynamic=False)")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
        help="torch.compile mode; reduce-overhead = CUDA graphs (batch-1 latency)",
    )
    ap.add_argument("--no-train", action="store_true", help="inference only (no training-step phase)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="off by default, as in the pipeline")
    ap.add_argument("--quick", action="store_true", help="the quickstart's tiny widths, size 64")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 on CUDA, 1 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default 20 on CUDA, 5 on CPU")
    ap.add_argument("--max-seconds", type=float, default=None, help="cap on one measurement's timed runs")
    ap.add_argument("--budget-s", type=float, default=0, help="start no phase after this; 0 = no limit")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "reports"))
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--dataset", default="kvasir_seg", help="gives in_channels and num_classes")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or (64 if args.quick else 256)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.repeats = args.repeats or (20 if cuda else 5)
    args.max_seconds = args.max_seconds or (5.0 if cuda else 2.0 if args.quick else 20.0)
    return args


def _yaml(text: str):
    """YAML 1.2 as DVC reads it (medfusion.config.parse_yaml). The GPU machine has PyYAML but not
    ruamel.yaml: there YAML 1.1's extra booleans (a bare `off`, `on`, `yes`, `no`) are kept as strings."""
    try:
        return parse_yaml(text)
    except ModuleNotFoundError:
        value = yaml.safe_load(text)
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            return text.strip()
        return value


def load_bench_params(path: Path, quick: bool) -> Params:
    """params.yaml, with the quickstart's `-S key=value` overrides applied when `quick`."""
    raw = _yaml(path.read_text())
    if quick:
        from medfusion.quickstart import quickstart_overrides

        for override in quickstart_overrides():  # every entry at its tiny width
            key, value = override.split("=", 1)
            *parents, leaf = key.split(".")
            section = raw
            for part in parents:
                section = section[part]
            section[leaf] = _yaml(value)
    return params_from_dict(raw, source=str(path))


def dataset_shape(params: Params, dataset: str) -> tuple[int, int]:
    """(in_channels, num_classes) of `dataset`."""
    if hasattr(params, "spec"):  # config.py with custom datasets
        spec = params.spec(dataset)
    else:
        from medfusion.data.registry import DATASETS

        spec = DATASETS[dataset]
    return spec.in_channels, spec.num_classes


# --- measuring -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_ms(
    fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, max_seconds: float
) -> tuple[float, int, float]:
    """Median ms of `fn` after `warmup` runs; fewer than `repeats` timed runs (at least 3) where they
    would take over `max_seconds`. Returns (median ms, timed runs, seconds of the first run)."""
    first = last = seconds_of(fn, device)
    for _ in range(warmup - 1):
        last = seconds_of(fn, device)
    runs = min(repeats, max(3, int(max_seconds / max(last, 1e-6))))
    return 1000 * statistics.median(seconds_of(fn, device) for _ in range(runs)), runs, first


def release_freed_memory() -> None:
    """Hand memory freed by earlier phases back to the OS (glibc malloc_trim), so RSS growth is this phase's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory inside the `with` block, in GB: CUDA max_memory_allocated (and max reserved);
    CPU the peak process RSS above the block's start (after malloc_trim), sampled by psutil every
    5 ms (ru_maxrss growth where psutil is missing: 0 unless the process's high-water mark rises)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.gb, self.reserved_gb = device, math.nan, math.nan
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        release_freed_memory()
        try:
            import psutil
        except ImportError:
            self._process, self._start = None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return self
        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gb = torch.cuda.max_memory_allocated(self.device) / 1e9
            self.reserved_gb = torch.cuda.max_memory_reserved(self.device) / 1e9
        elif self._process is None:
            self.gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start) / 1e9
        else:
            self._stop.set()
            self._thread.join()
            self.gb = (self._peak - self._start) / 1e9


# --- one model -----------------------------------------------------------------------------------


def disc_masks(batch: int, size: int) -> np.ndarray:
    """(batch, size, size) int64 label maps with one disc each: real boundaries for DRGO."""
    yy, xx = np.mgrid[:size, :size]
    centres = np.linspace(size / 3, size * 2 / 3, batch)
    return np.stack([(yy - c) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2 for c in centres]).astype(
        np.int64
    )


def training_objective(
    params: Params, name: str, masks: np.ndarray, num_classes: int, device: torch.device
) -> tuple[Callable, str, dict]:
    """(objective(logits, target, batch) -> loss, its label, the batch dict DRGO reads), as in run_fold."""
    ce = params.loss.ce_weight
    plain = "L_seg (soft Dice" + (f" + {ce} CE)" if ce else ")")
    size = masks.shape[-1]
    settings = drgo_settings(params, name)
    if settings is None or size % settings.region_size:
        if settings is not None:
            plain += ", DRGO off: size not a multiple of drgo.region_size"
        return (lambda logits, target, batch: segmentation_loss(logits, target, ce)), plain, {}
    batch = {}
    if settings.use_boundary:  # distance maps come from the data side in training: not timed
        batch["distance"] = torch.from_numpy(np.stack([distance_map(m) for m in masks])).to(device)
    freq = class_frequencies(masks, num_classes)
    objective = DRGOObjective(settings, freq, ce, seed=0)
    return objective, "DRGO" + ("" if settings.use_boundary else " w/o boundary"), batch


class ModelBench:
    """The phases of one model entry; each phase writes its figures into `row` or its error into `notes`."""

    def __init__(self, args: argparse.Namespace, params: Params, name: str, precision: Precision) -> None:
        self.args, self.params, self.name, self.precision = args, params, name, precision
        self.device = precision.device
        self.in_channels, self.num_classes = dataset_shape(params, args.dataset)
        modalities = params.spec(args.dataset).modalities
        self.spec = resolve_model(params, name, modalities, image_size=args.size)  # position tables at size
        self.row: dict = {"model": name, "architecture": self.spec.architecture}
        if args.compile:
            self.row["compile_s"] = 0.0
        self.notes: list[str] = []

    def build(self) -> None:
        torch.manual_seed(0)
        model = self.spec.build(self.in_channels, self.num_classes)
        self.row["parameters_m"] = count_parameters(model) / 1e6
        model = model.to(self.device)
        self.model = model.to(memory_format=torch.channels_last) if self.precision.channels_last else model
        self.forward = (
            torch.compile(self.model, dynamic=False, mode=self.args.compile_mode)
            if self.args.compile
            else self.model
        )

    def measure(self, fn: Callable[[], None], key: str) -> float:
        a = self.args
        ms, runs, first = median_ms(fn, self.device, a.warmup, a.repeats, a.max_seconds)
        self.row["runs_" + key] = runs
        if a.compile:  # the first run of each new graph (eval b1, eval b16, train) compiles it
            self.row["compile_s"] += first
        return ms

    def inference(self, batch: int) -> None:
        self.model.eval()
        x = self.precision.to_device(torch.randn(batch, self.in_channels, self.args.size, self.args.size))

        def step() -> None:
            with torch.inference_mode(), self.precision.autocast():
                self.forward(x)

        with PeakMemory(self.device) as memory:
            ms = self.measure(step, f"b{batch}")
        self.row[f"ms_per_image_b{batch}"] = ms / batch
        if batch == BATCH:
            self.row["peak_infer_gb_b16"] = memory.gb

    def train(self) -> None:
        t, size = self.params.train, self.args.size
        masks = disc_masks(BATCH, size)
        objective, self.row["loss"], batch = training_objective(
            self.params, self.name, masks, self.num_classes, self.device
        )
        x = self.precision.to_device(torch.randn(BATCH, self.in_channels, size, size))
        y = torch.from_numpy(masks).to(self.device)
        optimizer_cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        optimizer = optimizer_cls(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if self.precision.amp_dtype == torch.float16 else None
        self.model.train()

        def step() -> None:  # as train_one_epoch, without its loss.item() check
            optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                logits = self.forward(x)
            loss = objective(logits.float(), y, batch)
            optimizer_step(loss, optimizer, scaler)

        with PeakMemory(self.device) as memory:
            self.row["train_ms_per_step_b16"] = self.measure(step, "train")
        self.row["peak_train_gb_b16"] = memory.gb
        if self.device.type == "cuda":
            self.row["peak_train_reserved_gb_b16"] = memory.reserved_gb

    def phase(self, label: str, fn: Callable[[], None], deadline: float) -> bool:
        if time.perf_counter() > deadline:
            self.notes.append(f"{label}: skipped (--budget-s)")
            return False
        start = time.perf_counter()
        try:
            fn()
        except Exception as err:  # OOM, compile errors, ...: the row says so and the run goes on
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            self.notes.append(f"{label}: {type(err).__name__}: {message}")
            print(f"  {self.name} {label}: FAILED {type(err).__name__}: {message}", flush=True)
            err = None  # drop the traceback's frames (activations) before freeing the cache
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return False
        print(f"  {self.name} {label}: {time.perf_counter() - start:.1f} s", flush=True)
        return True

    def run(self, deadline: float) -> dict:
        if self.phase("build", self.build, deadline):
            self.phase("infer b1", lambda: self.inference(1), deadline)
            self.phase(f"infer b{BATCH}", lambda: self.inference(BATCH), deadline)
            if not self.args.no_train:
                self.phase(f"train b{BATCH}", self.train, deadline)
        if self.row.get("compile_s"):
            self.notes.append(f"compile + first runs {self.row['compile_s']:.1f} s")
        self.row["notes"] = "; ".join(self.notes)
        self.model = self.forward = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.row


# --- output --------------------------------------------------------------------------------------


def fmt(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{0 if abs(value) >= 100 else 1 if abs(value) >= 10 else digits}f}"
    return str(value)


def header(args: argparse.Namespace, precision: Precision, params: Params) -> str:
    in_channels, num_classes = dataset_shape(params, args.dataset)
    amp = str(precision.amp_dtype).replace("torch.", "") + " autocast" if precision.amp_dtype else "fp32"
    cuda = precision.device.type == "cuda"
    versions = f"cuDNN {torch.backends.cudnn.version()}" if cuda else "precision " + precision.describe()
    device = machine_summary(precision.device)
    if cuda:
        device += f" ({torch.cuda.get_device_properties(precision.device).total_memory / 1e9:.0f} GB)"
    memory = (
        "torch.cuda.max_memory_allocated (tensors; context and allocator cache extra)"
        if cuda
        else "peak process RSS above the phase's start (not device memory)"
    )
    return "\n".join(
        [
            f"## Device benchmark: {args.size}x{args.size}, batch 1 and {BATCH}",
            "",
            f"{device}; {versions}; {amp}; "
            f"{'channels_last' if precision.channels_last else 'NCHW'}; "
            f"torch.compile {f'on (dynamic=False, mode {args.compile_mode})' if args.compile else 'off'}; "
            f"cudnn.benchmark {'on' if args.cudnn_benchmark else 'off'}; {time.strftime('%Y-%m-%d %H:%M')}.",
            f"Widths from {args.params.name}{' with the quickstart overrides (--quick)' if args.quick else ''}; "
            f"{args.dataset}: {in_channels} channels in, {num_classes} classes; random input. Times: median "
            f"of up to {args.repeats} runs (at most {args.max_seconds:g} s of them) after {args.warmup} "
            f"warm-up(s){', synchronized' if cuda else ''}. Inference: eval mode, torch.inference_mode. "
            f"Train step: forward, the entry's loss (CSV `loss`), backward, {params.train.optimizer} "
            f"lr {params.train.lr:g}{', GradScaler' if precision.amp_dtype == torch.float16 else ''}. "
            f"Memory: {memory}.",
        ]
    )


def markdown(rows: list[dict], head: str, cuda: bool) -> str:
    mem = "mem GB" if cuda else "RSS+ GB"
    lines = [
        head,
        "",
        f"| model | params M | ms/img b1 | ms/img b{BATCH} | peak infer {mem} b{BATCH} | train ms/step b{BATCH} "
        f"| peak train {mem} b{BATCH} | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, PAPER_ROW]:
        cells = [r.get(k) for k in TABLE_FIELDS]
        notes = PAPER_NOTE if r is PAPER_ROW else "; ".join(filter(None, [r.get("loss"), r.get("notes")]))
        lines.append(f"| {r['model']} | " + " | ".join(fmt(c) for c in cells) + f" | {notes} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False, newline="") as f:
        f.write(text)
    os.replace(f.name, path)


def write_outputs(rows: list[dict], head: str, out: Path, cuda: bool) -> str:
    table = markdown(rows, head, cuda)
    write_atomic(out / "device_bench.md", table)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    write_atomic(out / "device_bench.csv", buffer.getvalue())
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    params = load_bench_params(args.params, args.quick)
    names = [n.strip() for n in args.models.split(",")] if args.models else params.model_names
    unknown = [n for n in names if n not in params.model_names]
    if unknown:
        raise SystemExit(f"unknown model entries {unknown}; params.yaml has {params.model_names}")
    choice = {"auto": "auto", "on": True, "off": False}
    resolved = resolve_precision(args.device, choice[args.amp], choice[args.channels_last])
    amp = resolved.amp_dtype if args.amp != "off" else None
    if args.device == "cuda" and args.amp == "off":
        resolved = dataclasses.replace(resolved, reason="fp32 (--amp off)")
    precision = dataclasses.replace(resolved, amp_dtype=amp)
    head = header(args, precision, params)
    print(head, flush=True)
    deadline = time.perf_counter() + (args.budget_s or math.inf)
    rows: list[dict] = []
    table = ""
    for name in names:
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        rows.append(ModelBench(args, params, name, precision).run(deadline))
        table = write_outputs(rows, head, args.out, args.device == "cuda")
        print(f"{name}: {time.perf_counter() - start:.1f} s  {table.splitlines()[-2]}", flush=True)
    print("\n" + table, flush=True)
    print(f"wrote {args.out / 'device_bench.csv'} and {args.out / 'device_bench.md'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
