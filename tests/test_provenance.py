"""Code in the run hash: the import closure found from the code, a code change retrains with the reason
logged, an interrupted run with the same code resumes, and result.json records code and commit."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from conftest import tiny_raw_params

from medfusion import provenance
from medfusion.config import params_from_dict
from medfusion.data.io import read_json, write_json
from medfusion.provenance import changed_files, code_fingerprint, import_closure


def _package(root: Path) -> None:
    """A small package: a imports b inside a function, b imports c relatively, d is imported by nobody."""
    pkg = root / "medfusion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from medfusion.sub import b\n    return b.g()\n")
    (pkg / "sub" / "b.py").write_text("from .c import VALUE\n\ndef g():\n    return VALUE\n")
    (pkg / "sub" / "c.py").write_text("VALUE = 1\n")
    (pkg / "d.py").write_text("VALUE = 2\n")


def test_the_closure_follows_imports_in_functions_and_relative_ones(tmp_path):
    _package(tmp_path)
    found = {p.relative_to(tmp_path).as_posix() for p in import_closure(["medfusion.a"], tmp_path)}
    assert found == {
        "medfusion/__init__.py", "medfusion/a.py", "medfusion/sub/__init__.py", "medfusion/sub/b.py",
        "medfusion/sub/c.py",
    }  # fmt: skip
    before = code_fingerprint(["medfusion.a"], tmp_path)
    (tmp_path / "medfusion" / "d.py").write_text("VALUE = 3\n")  # not imported: the same code
    provenance._fingerprint.cache_clear()
    assert code_fingerprint(["medfusion.a"], tmp_path) == before
    (tmp_path / "medfusion" / "sub" / "c.py").write_text("VALUE = 4\n")
    provenance._fingerprint.cache_clear()
    after = code_fingerprint(["medfusion.a"], tmp_path)
    assert after[0] != before[0] and changed_files(before[1], after[1]) == ["medfusion/sub/c.py"]


def test_the_training_closure_holds_models_and_losses_not_reporting():
    files = set(code_fingerprint()[1])
    assert {"medfusion/models/unet.py", "medfusion/models/casnet.py", "medfusion/losses/drgo.py",
            "medfusion/training/fold.py", "medfusion/data/augment.py", "medfusion/config.py"} <= files  # fmt: skip
    assert not {"medfusion/report.py", "medfusion/training/tracking.py", "medfusion/evaluation.py"} & files


@contextlib.contextmanager
def _silent(fold, seed, run_params):
    yield lambda metrics, step: None


def _edited(path: str):
    """A fingerprint as if `path` had been edited: its digest changed, the rest as they are."""
    real = provenance._fingerprint.__wrapped__

    def fingerprint(roots, root):
        whole, files = real(roots, root)
        files = tuple((f, digest if f != path else "0" * 64) for f, digest in files)
        return whole[::-1], files

    return fingerprint


def test_a_code_change_retrains_every_run_and_says_which_file(
    synthetic_processed, tmp_path, monkeypatch, capsys
):
    from medfusion.entries import resolve_entry, resources
    from medfusion.training.cv import run_cv

    processed, split = synthetic_processed
    raw = tiny_raw_params()
    raw["train"]["epochs"] = 1
    params = params_from_dict(raw)
    entry = resolve_entry(params, "synthetic", "unet")
    write_json(tmp_path / "split.json", split)
    out = tmp_path / "runs"

    def train():
        return run_cv(entry, processed, tmp_path / "split.json", out, _silent, params.cv, resources(params))

    first = train()
    record = read_json(out / "fold0_seed0" / "result.json")
    assert (
        record["code_fingerprint"] == code_fingerprint()[0]
        and "medfusion/models/unet.py" in record["code_files"]
    )
    assert len(record["git_commit"]) in (40, 7) or record["git_commit"] == "unknown"
    train()
    assert capsys.readouterr().out.count("finished earlier with this config and code, skipped") == 2
    monkeypatch.setattr(provenance, "_fingerprint", _edited("medfusion/models/unet.py"))
    again = train()
    log = capsys.readouterr().out
    assert log.count("code changed: medfusion/models/unet.py, trained again") == 2
    assert [r["config_hash"] for r in again] != [r["config_hash"] for r in first]
    assert read_json(out / "fold1_seed0" / "result.json")["code_fingerprint"] == code_fingerprint()[0]


class _Stop(Exception):
    pass


def _stopping(fold, seed, run_params):
    """A tracker whose log stops the run at its second epoch, after epoch 1's last.pt is written."""

    @contextlib.contextmanager
    def child():
        def log(metrics, step):
            if step == 1:
                raise _Stop

        yield log

    return child()


@pytest.mark.parametrize("code_changed", [False, True])
def test_an_interrupted_run_resumes_only_with_the_same_code(
    synthetic_processed, tmp_path, monkeypatch, capsys, code_changed
):
    from medfusion.entries import resolve_entry, resources
    from medfusion.training.cv import run_cv

    processed, split = synthetic_processed
    raw = tiny_raw_params()
    raw["train"].update(epochs=3, patience=3)
    raw["cv"]["n_folds"] = 2
    params = params_from_dict(raw)
    entry = resolve_entry(params, "synthetic", "unet")
    write_json(tmp_path / "split.json", split)
    out = tmp_path / "runs"
    with pytest.raises(_Stop):
        run_cv(entry, processed, tmp_path / "split.json", out, _stopping, params.cv, resources(params))
    assert (out / "fold0_seed0" / "last.pt").is_file() and not (out / "fold0_seed0" / "result.json").exists()
    if code_changed:
        monkeypatch.setattr(provenance, "_fingerprint", _edited("medfusion/losses/dice.py"))
    capsys.readouterr()
    run_cv(entry, processed, tmp_path / "split.json", out, _silent, params.cv, resources(params))
    log = capsys.readouterr().out
    if code_changed:
        assert "resume checkpoint from other settings; training this run from epoch 1" in log
        assert "resumed after epoch" not in log
    else:
        assert "synthetic/unet fold0_seed0: resumed after epoch 1 of 3" in log
    assert read_json(out / "fold0_seed0" / "result.json")["code_fingerprint"] == code_fingerprint()[0]


class _Planted:
    """What a tampered resume file could hold: unpickling it would create `marker` (run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_resume_file_with_a_pickled_object_is_refused_not_run(synthetic_processed, tmp_path, capsys):
    import torch
    from conftest import train_fold

    from medfusion.training.fold import RESUME_FILE, load_resume_state

    processed, split = synthetic_processed
    raw = tiny_raw_params()
    raw["train"].update(epochs=1, patience=1)
    params = params_from_dict(raw)
    out = tmp_path / "run"
    train_fold(params, "synthetic", "unet", processed, split, 0, 0, out, resume_key="k")
    state = torch.load(out / RESUME_FILE, weights_only=True)  # what the pipeline writes: plain data
    assert state["key"] == "k" and load_resume_state(out / RESUME_FILE, "k") is not None
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Planted(marker)}, out / RESUME_FILE)
    assert load_resume_state(out / RESUME_FILE, "k") is None
    assert not marker.exists()
    said = capsys.readouterr().out
    assert "resume checkpoint refused" in said and "Unsupported global" in said and "from epoch 1" in said
