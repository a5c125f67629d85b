"""The machine this process computes on, and how to compute there.

`resolve_precision` turns `train.device`, `train.cpu_bf16` and `train.channels_last` into a
`Precision`; `resolve_compile` turns `train.compile` into what `compile_model` does. Training,
evaluation, `medfusion predict`, the efficiency stage and the benchmarks all resolve through here,
so one machine makes one decision everywhere.

Why `auto` (the default of all three CPU keys): bf16 autocast with channels_last trains 3-5x faster
than fp32 on Xeons with AMX, and 11-26x *slower* on CPUs without native bf16 (AVX2-only EPYC and
most laptops), where PyTorch emulates bf16 arithmetic. `auto` therefore turns bf16 on only where the
CPU has native bf16 (AMX tiles or AVX512-BF16, as torch reports them) *and* a short timing probe of a
convolution training step finds bf16 at least 10% faster than fp32 (`BF16_MARGIN`). The probe runs
once per machine and its decision is kept (`decision_file()`): every later process reads it, so that
a probe under load cannot make one process compute in bf16 and the next in fp32. channels_last follows bf16 on the CPU
(it helps oneDNN's bf16 kernels and is neutral in fp32: 0.99x measured on an AVX2 EPYC) and is on
with CUDA. `train.compile: auto` compiles the attention regions (CASNet's contextual attention,
Attention U-Net's gates), whose element-wise chains the compiler fuses, wherever a compiler is there
to do it (a C++ compiler on the CPU, Triton on CUDA; without one it stays off and says why). Measured
in fp32 on an AVX2-only EPYC (reports/benchmarks.md, two interleaved runs of 5 and 9 rounds), it cut
CASNet's step to 0.90-0.92x of eager (1.33x U-Net's instead of 1.45x) after 30-85 s of compilation
per process, which a paper-protocol run (thousands of steps) repays many times over; with CPU bf16 it
gains more. Runs too short to repay it (the quickstart, the tests) set `off`.
Each decision carries its reason, printed once per
process and recorded with every run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medfusion.common import TrainingError, first_line

AUTO = "auto"
BF16_MARGIN = 0.9  # bf16 must take at most this fraction of fp32's time in the probe


@dataclass(frozen=True)
class Precision:
    """Where and how to compute: device, autocast dtype (None = fp32), memory format, and why."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    reason: str = ""

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    @property
    def dtype_name(self) -> str:
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32"

    def describe(self) -> str:
        """One line: 'cpu, float32, NCHW (auto: ...)'."""
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type}, {self.dtype_name}, {layout}" + (
            f" ({self.reason})" if self.reason else ""
        )


# --- the CPU ----------------------------------------------------------------------------------------


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector ISA level as torch sees it: 'AVX2', 'AVX512', 'AVX512 + AVX512_BF16 + AMX', ..."""
    cpu = torch.cpu
    levels = [torch.backends.cpu.get_cpu_capability()]
    if cpu._is_avx512_bf16_supported():
        levels.append("AVX512_BF16")
    if cpu._is_amx_tile_supported():
        levels.append("AMX")
    return " + ".join(levels)


def native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AMX tiles or AVX512-BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def machine_summary(device: torch.device | None = None) -> str:
    """What every timing must name: the processor (GPU or CPU model), ISA, threads and torch version."""
    if device is not None and device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {cpu_model()}"
    else:
        where = f"{cpu_model()}, ISA {cpu_isa()}"
    return f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _probe_seconds(amp_dtype: torch.dtype | None, channels_last: bool, repeats: int = 5) -> float:
    """Median time of a small convolution training step (forward + backward), for the bf16 decision.

    The probe's random weights and input are drawn with the global RNG forked (`fork_rng`): the
    decision is made when training first resolves its precision, and drawing from (or seeding) the
    global generator there would change the run's own random numbers (its initial weights, its data
    order), so that a resumed run would no longer equal an uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
        )
        x = torch.randn(8, 16, 64, 64)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            loss = net(x).float().square().mean()
        loss.backward()
        return time.perf_counter() - start

    step()  # warm-up: oneDNN picks and caches its kernels
    return statistics.median(step() for _ in range(repeats))


def decision_file() -> Path:
    """Where this machine's `cpu_bf16: auto` decision is kept: one file per CPU model, ISA, thread
    count and torch version, under $XDG_CACHE_HOME/medfusion (default ~/.cache/medfusion)."""
    key = f"{cpu_model()}|{cpu_isa()}|{torch.get_num_threads()}|{torch.__version__}"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medfusion" / f"cpu-bf16-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _kept_decision(path: Path) -> tuple[bool, str] | None:
    try:
        kept = json.loads(path.read_text())
        return bool(kept["bf16"]), str(kept["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep_decision(path: Path, decision: tuple[bool, str]) -> tuple[bool, str]:
    """Publish `decision` at `path` unless another process has published one first; -> the published one.
    (A link of a complete temp file: never half-written, and exactly one process wins.)"""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"bf16": decision[0], "reason": decision[1]}) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            kept = _kept_decision(path)
            if kept is None:  # a damaged file: this decision replaces it
                os.replace(tmp, path)
            decision = kept or decision
        finally:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home: this process's own probe stands
    return decision


@functools.cache
def cpu_bf16_auto() -> tuple[bool, str]:
    """`train.cpu_bf16: auto` on this machine: (on, reason), said once per process.

    Where the CPU has native bf16, a timing probe decides, once per machine: the first process to
    probe keeps its decision in `decision_file()` and every later one (training, evaluation,
    `medfusion predict`, a logged MLflow model) reads it, so that one machine computes in one
    precision whatever the load on it when a process starts (a probe under load could decide
    otherwise, and bf16 and fp32 predictions differ in a few boundary pixels). Delete the file to
    probe again (after a change of hardware), or set `train.cpu_bf16` to decide yourself."""
    isa = cpu_isa()
    if not native_bf16():
        decision = (False, f"auto: fp32, this CPU has no native bf16 ({isa})")
    else:
        path = decision_file()
        decision = _kept_decision(path)
        if decision is None:
            fp32, bf16 = _probe_seconds(None, False), _probe_seconds(torch.bfloat16, True)
            on = bf16 <= BF16_MARGIN * fp32
            probed = f"{'bf16' if on else 'fp32'}, {isa}; probe bf16 {1000 * bf16:.1f} ms vs fp32 {1000 * fp32:.1f} ms"
            decision = _keep_decision(path, (on, f"auto: {probed}"))
        decision = (decision[0], f"{decision[1]} (this machine's decision, {path})")
    print(f"precision: {decision[1]} [{cpu_model()}]", file=sys.stderr, flush=True)  # a notice, not data
    return decision


def resolve_precision(
    device: str = AUTO, cpu_bf16: bool | str = AUTO, channels_last: bool | str = AUTO
) -> Precision:
    """`train.device` (auto | cpu | cuda), `train.cpu_bf16` and `train.channels_last` (auto | true |
    false) -> Precision. CUDA computes with fp16 AMP; the CPU in bf16 or fp32 (see the module's docstring).

    Raises:
        TrainingError: device 'cuda' where no CUDA device is available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if device == "cuda" or (device == AUTO and torch.cuda.is_available()):
        layout = True if channels_last == AUTO else bool(channels_last)
        return Precision(torch.device("cuda"), torch.float16, layout, "CUDA: fp16 autocast")
    if cpu_bf16 == AUTO:
        bf16, reason = cpu_bf16_auto()
    else:
        bf16, reason = bool(cpu_bf16), f"train.cpu_bf16 = {str(bool(cpu_bf16)).lower()}"
    layout = bf16 if channels_last == AUTO else bool(channels_last)
    return Precision(torch.device("cpu"), torch.bfloat16 if bf16 else None, layout, reason)


def compiler_available(device_type: str) -> tuple[bool, str]:
    """Whether torch.compile's backend can build kernels here: a C++ compiler for the CPU (`CXX`, or
    g++ / clang++ / c++ on PATH, as inductor looks for them), Triton for CUDA. -> (found, what)."""
    if device_type == "cuda":
        found = importlib.util.find_spec("triton") is not None
        return found, "Triton" if found else "no Triton installed"
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return True, f"C++ compiler {name}"
    return False, "no C++ compiler found (g++, clang++ or CXX)"


def resolve_compile(setting: str, precision: Precision) -> tuple[str, str]:
    """`train.compile` (auto | off | regions | full) on `precision` -> (what compile_model does, why).

    `auto` is `regions` wherever the backend can compile (see the module's docstring), else `off`."""
    if setting != AUTO:
        return setting, f"train.compile = {setting}"
    found, what = compiler_available(precision.device.type)
    if not found:
        return "off", f"auto: off ({what})"
    return "regions", f"auto: regions ({precision.dtype_name} on {precision.device.type}; {what})"


# The messages of PyTorch's allocators when memory runs out (CUDA raises torch.OutOfMemoryError).
OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return (
        isinstance(err, RuntimeError)
        and not isinstance(err, TrainingError)
        and any(marker in str(err) for marker in OOM_MARKERS)
    )


def smaller_image_size(size: int) -> int:
    """Half of `size`, still a multiple of 16 (data.image_size's rule)."""
    return max(16, size // 2 // 16 * 16)


@contextlib.contextmanager
def out_of_memory_explained(
    where: str,
    images: Tensor,
    model: nn.Module,
    device: torch.device,
    batch_option: str = "-S train.batch_size",
    image_option: str | None = "-S data.image_size",
    device_option: str = "-S train.device",
) -> Iterator[None]:
    """Turn running out of memory on `images` (B, C, H, W) into a TrainingError that says what to lower.

    The options are how the user changes the batch size, the image size (None: not at this step, e.g.
    prediction, where the model fixes it) and the device; the original error stays as __cause__.
    """
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        batch, channels, height, width = tuple(images.shape)
        first = first_line(err)
        remedies = [f"lower the batch size (`{batch_option}={batch // 2}`)"] if batch > 1 else []
        if image_option:
            remedies.append(
                f"the image size (`{image_option}={smaller_image_size(height)}`; the data is preprocessed again)"
            )
        if device.type == "cuda":
            remedies.append(f"free the GPU of other jobs, or run on the CPU (`{device_option}=cpu`, slower)")
        else:
            remedies.append(f"close other programs, or use a GPU (`{device_option}=cuda`)")
        raise TrainingError(
            f"{where}: out of memory on {device.type} with a batch of {batch} images of "
            f"{channels}x{height}x{width} through {type(model).__name__} ({first}). "
            f"To fit: {'; or '.join(remedies)}."
        ) from err
