"""`auto` precision and compile settings follow the CPU (medfusion/hardware.py): bf16 only with native
bf16 that a timing probe finds faster, channels_last with it, compiled regions only where they pay."""

from __future__ import annotations

import json

import pytest
import torch

from medfusion import hardware
from medfusion.hardware import Precision, resolve_compile, resolve_precision


@pytest.fixture
def fresh_decision(monkeypatch, tmp_path):
    """A new process on a machine that has decided nothing yet (its own cache folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hardware.cpu_bf16_auto.cache_clear()
    yield
    hardware.cpu_bf16_auto.cache_clear()


def _cpu(monkeypatch, native: bool, fp32_s: float = 1.0, bf16_s: float = 1.0) -> list:
    probes = []

    def probe(amp_dtype, channels_last, repeats=5):
        probes.append(amp_dtype)
        return bf16_s if amp_dtype == torch.bfloat16 else fp32_s

    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "_probe_seconds", probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return probes


def test_without_native_bf16_auto_is_fp32_nchw_and_nothing_is_probed(monkeypatch, fresh_decision, capsys):
    probes = _cpu(monkeypatch, native=False)
    precision = resolve_precision()
    assert (precision.amp_dtype, precision.channels_last) == (None, False) and probes == []
    assert "no native bf16" in precision.reason
    resolve_precision()
    said = capsys.readouterr()
    assert said.err.count("precision: auto: fp32") == 1 and "precision" not in said.out  # once, on stderr


@pytest.mark.parametrize(("bf16_s", "on"), [(0.3, True), (0.95, False), (2.0, False)])
def test_with_native_bf16_the_probe_decides(monkeypatch, fresh_decision, bf16_s, on):
    """bf16 must take at most 90% of fp32's time (AMX: about 30%); a tie or a loss keeps fp32."""
    probes = _cpu(monkeypatch, native=True, fp32_s=1.0, bf16_s=bf16_s)
    precision = resolve_precision("auto", "auto", "auto")
    assert (precision.amp_dtype == torch.bfloat16, precision.channels_last) == (on, on)
    assert set(probes) == {None, torch.bfloat16} and "probe bf16" in precision.reason


def test_the_first_probe_decides_for_every_later_process_on_the_machine(monkeypatch, fresh_decision, capsys):
    """A later process whose probe (under load, say) would decide otherwise computes as the first did."""
    probes = _cpu(monkeypatch, native=True, fp32_s=1.0, bf16_s=0.3)
    first = resolve_precision()
    assert first.amp_dtype == torch.bfloat16 and hardware.decision_file().is_file()
    hardware.cpu_bf16_auto.cache_clear()  # the next process
    _cpu(monkeypatch, native=True, fp32_s=1.0, bf16_s=2.0)
    later = resolve_precision()
    assert later.amp_dtype == torch.bfloat16 and later.channels_last and len(probes) == 2  # not probed again
    assert str(hardware.decision_file()) in later.reason and "probe bf16 300.0 ms" in later.reason
    hardware.decision_file().write_text("{not json")  # a damaged file: probed again, and kept
    hardware.cpu_bf16_auto.cache_clear()
    assert resolve_precision().amp_dtype is None and len(probes) == 2  # this probe's fp32 (bf16 2.0 s)
    assert json.loads(hardware.decision_file().read_text())["bf16"] is False
    assert "precision:" not in capsys.readouterr().out


def test_explicit_settings_win_over_auto(monkeypatch, fresh_decision):
    probes = _cpu(monkeypatch, native=False)
    forced = resolve_precision("cpu", True, "auto")
    assert (
        forced.amp_dtype == torch.bfloat16
        and forced.channels_last
        and forced.reason == "train.cpu_bf16 = true"
    )
    assert resolve_precision("cpu", "auto", True).channels_last and probes == []
    assert resolve_precision("cpu", False, False).describe() == "cpu, float32, NCHW (train.cpu_bf16 = false)"


def test_compile_auto_compiles_regions_where_a_compiler_can(monkeypatch, tmp_path):
    cpu_fp32 = Precision(torch.device("cpu"), None, False)
    cpu_bf16 = Precision(torch.device("cpu"), torch.bfloat16, True)
    cuda = Precision(torch.device("cuda"), torch.float16, True)
    assert resolve_compile("full", cpu_fp32) == ("full", "train.compile = full")
    assert resolve_compile("off", cpu_bf16) == ("off", "train.compile = off")
    fake_cxx = tmp_path / "g++"
    fake_cxx.write_text("#!/bin/sh\n")
    fake_cxx.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    how, reason = resolve_compile("auto", cpu_fp32)
    assert how == "regions" and "float32" in reason and "g++" in reason
    assert resolve_compile("auto", cpu_bf16)[0] == "regions"
    fake_cxx.unlink()
    how, reason = resolve_compile("auto", cpu_fp32)  # nothing to compile with: off, and why
    assert how == "off" and "no C++ compiler" in reason
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    assert resolve_compile("auto", cuda) == ("off", "auto: off (no Triton installed)")


def test_the_machine_is_named_with_model_isa_threads_and_torch():
    summary = hardware.machine_summary()
    assert hardware.cpu_model() in summary and f"ISA {hardware.cpu_isa()}" in summary
    assert f"{torch.get_num_threads()} threads" in summary and torch.__version__ in summary
    assert hardware.cpu_isa().split(" + ")[0] == torch.backends.cpu.get_cpu_capability()


def test_the_real_probe_times_both_settings():
    assert 0 < hardware._probe_seconds(None, False, repeats=1) < 10
