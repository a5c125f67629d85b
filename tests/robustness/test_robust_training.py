"""Robustness of training: a full disk, an unreachable MLflow server, an interrupted run, a NaN loss,
out of memory, CUDA asked for where there is none.

What the user must get: the error names the path / step / samples / setting and says what to change;
the run folder never holds a half-written checkpoint, and what was finished (the previous model.pt,
last.pt) is kept so that a rerun continues. The real SIGKILL at several points is tests/test_resume.py.
"""

from __future__ import annotations

import ast
import errno

import pytest
import torch
from conftest import fp32, replace, train_cv, train_fold

from medfusion.common import TrainingError
from medfusion.data.dataset import SegDataset
from medfusion.data.io import read_history, write_json
from medfusion.entries import resolve_entry
from medfusion.hardware import out_of_memory_explained, resolve_precision
from medfusion.inference.checkpoint import load_checkpoint
from medfusion.models import build_model
from medfusion.models.unet import UNet
from medfusion.training.fold import run_fold
from medfusion.training.loop import train_one_epoch, validate

FP32 = fp32()
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
CPU_OOM = "[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"


def no_log(metrics, step):
    pass


def fold(params, synthetic_processed, run_dir, log=no_log, resume_key="k"):
    processed, split = synthetic_processed
    return train_fold(params, "synthetic", "unet", processed, split, 0, 0, run_dir, log, FP32, resume_key)


def temporary_files(run_dir):
    return [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- 14: disk full while writing a checkpoint


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(
    tiny_params, synthetic_processed, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "fold0_seed0"
    real_save, saved = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saved.append(f)
        if len(saved) > 2:  # epoch 1 wrote model.pt and last.pt; during epoch 2 the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr("medfusion.training.fold.torch.save", save_until_full)
    with pytest.raises(OSError) as err:
        fold(tiny_params, synthetic_processed, run_dir)
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    target = run_dir / ("model.pt" if "model.pt" in message else "last.pt")
    assert f"cannot write checkpoint {target} (No space left on device); the previous one is kept" in message
    assert temporary_files(run_dir) == []  # no half-written .model.pt.tmp
    assert not (run_dir / "history.json").exists() and not (run_dir / "result.json").exists()
    monkeypatch.undo()
    model, checkpoint = load_checkpoint(run_dir / "model.pt", FP32)  # intact and loadable
    assert checkpoint["epoch"] == 0 and isinstance(model, UNet)
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    capsys.readouterr()
    result = fold(tiny_params, synthetic_processed, run_dir)  # space freed: the rerun continues
    assert "resumed after epoch 1 of 2" in capsys.readouterr().out
    assert result["epochs_run"] == 2 and temporary_files(run_dir) == []


# ---------------------------------------------------------------- 17: MLflow server unreachable


def test_unreachable_mlflow_server_says_so_and_training_runs(
    tiny_params, synthetic_processed, tmp_path, monkeypatch, capsys
):
    from medfusion.training import tracking

    monkeypatch.setattr(tracking, "git_state", lambda root: {"commit": "test", "dirty": False})
    processed, split = synthetic_processed
    write_json(tmp_path / "split.json", split)
    out = tmp_path / "runs"
    tracker = tracking.Tracker(
        "http://127.0.0.1:9/", "medfusion/synthetic", "unet", {}, {}, out / "mlflow.json"
    )
    err = capsys.readouterr().err
    assert "MLflow tracking at http://127.0.0.1:9/ is unavailable (" in err
    assert "training continues untracked" in err
    params = replace(tiny_params, "train", epochs=1)
    results = train_cv(params, "synthetic", "unet", processed, tmp_path / "split.json", out, tracker.child)
    tracker.finish()
    assert [r["mlflow_run_id"] for r in results] == [None, None]
    assert all((out / f"fold{k}_seed0" / "model.pt").exists() for k in (0, 1))
    assert not (out / "mlflow.json").exists()  # no parent-run record: a later tracked rerun starts clean


# ---------------------------------------------------------------- 18: interrupted mid-epoch, resumed


def test_run_interrupted_mid_epoch_resumes_from_last_pt_with_the_same_numbers(
    tiny_params, synthetic_processed, tmp_path, capsys
):
    reference = fold(tiny_params, synthetic_processed, tmp_path / "reference")
    run_dir = tmp_path / "run"

    def killed_in_epoch_2(metrics, step):
        if step == 1:  # after epoch 2's training and validation, before its checkpoints
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fold(tiny_params, synthetic_processed, run_dir, killed_in_epoch_2)
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    assert not (run_dir / "result.json").exists() and temporary_files(run_dir) == []
    capsys.readouterr()
    resumed = fold(tiny_params, synthetic_processed, run_dir)
    assert "resumed after epoch 1 of 2" in capsys.readouterr().out
    volatile = {"seconds", "train_seconds"}
    assert {k: v for k, v in resumed.items() if k not in volatile} == pytest.approx(
        {k: v for k, v in reference.items() if k not in volatile}
    )
    history = [read_history(d / "history.json") for d in (tmp_path / "reference", run_dir)]
    for got, want in zip(history[1], history[0], strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)


# ---------------------------------------------------------------- 19: NaN loss


def test_nan_loss_stops_with_the_step_the_samples_and_advice(
    tiny_params, synthetic_processed, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        "medfusion.training.fold.segmentation_loss", lambda logits, target, ce: logits.sum() * float("nan")
    )
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        fold(tiny_params, synthetic_processed, run_dir)
    message = str(err.value)
    assert message.startswith("epoch 1: loss is nan at step 0 (sample indices [")
    train_ids = set(synthetic_processed[1]["folds"][0]["train"])
    cases = ast.literal_eval(message.split("cases ")[1].split("]")[0] + "]")
    assert len(cases) == tiny_params.train.batch_size and set(cases) <= train_ids
    assert "lower train.lr (now 0.003)" in message
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no checkpoint of a diverged model


# ---------------------------------------------------------------- 20: out of memory


def _raise(message, kind=torch.OutOfMemoryError):
    def forward(self, x):
        raise kind(message)

    return forward


@pytest.mark.parametrize(("error", "kind"), [(CUDA_OOM, torch.OutOfMemoryError), (CPU_OOM, RuntimeError)])
def test_out_of_memory_in_training_says_what_to_lower(
    error, kind, tiny_params, synthetic_processed, tmp_path, monkeypatch
):
    monkeypatch.setattr(UNet, "forward", _raise(error, kind))
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        fold(tiny_params, synthetic_processed, run_dir)
    message = str(err.value)
    assert message.startswith("epoch 1, step 0: out of memory on cpu with a batch of 4 images of 3x32x32")
    assert "through UNet" in message and error.splitlines()[0] in message
    assert "`-S train.batch_size=2`" in message and "`-S data.image_size=16`" in message
    assert "`-S train.device=cuda`" in message
    assert isinstance(err.value.__cause__, kind) and str(err.value.__cause__) == error
    assert list(run_dir.iterdir()) == []


def test_out_of_memory_on_a_gpu_suggests_the_cpu_and_validation_names_eval_batch_size(synthetic_processed):
    images = torch.zeros(16, 3, 256, 256)
    with pytest.raises(TrainingError) as err:
        with out_of_memory_explained(
            "epoch 3, step 7", images, UNet(3, 2, base_channels=4), torch.device("cuda")
        ):
            raise torch.OutOfMemoryError(CUDA_OOM)
    message = str(err.value)
    assert "out of memory on cuda with a batch of 16 images of 3x256x256 through UNet" in message
    assert "`-S train.batch_size=8`" in message and "`-S data.image_size=128`" in message
    assert "`-S train.device=cpu`" in message
    processed, split = synthetic_processed
    model = build_model("unet", 3, 2, base_channels=4)
    model.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError(CUDA_OOM))
    loader = torch.utils.data.DataLoader(SegDataset(processed, split["test"]), batch_size=4)
    with pytest.raises(TrainingError, match=r"validation, step 0: .*`-S eval.batch_size=2`"):
        validate(model, loader, lambda logits, target: logits.sum(), FP32, 2)


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(synthetic_processed):
    processed, split = synthetic_processed
    model = build_model("unet", 3, 2, base_channels=4)
    model.forward = lambda x: (_ for _ in ()).throw(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    loader = torch.utils.data.DataLoader(SegDataset(processed, split["test"]), batch_size=4)
    with pytest.raises(RuntimeError, match="^mat1 and mat2") as err:
        train_one_epoch(model, loader, torch.optim.Adam(model.parameters()), lambda lg, t, b: lg.sum(), FP32)
    assert not isinstance(err.value, TrainingError)


# ---------------------------------------------------------------- CUDA asked for, none present


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_requested_without_cuda(tiny_params, synthetic_processed, tmp_path):
    params = replace(tiny_params, "train", device="cuda")
    processed, split = synthetic_processed
    with pytest.raises(
        TrainingError, match=r"train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
    ):
        run_fold(resolve_entry(params, "synthetic", "unet"), processed, split, 0, 0, tmp_path / "run", no_log)
    assert not (tmp_path / "run").exists()
    assert resolve_precision("auto", False, False).device.type == "cpu"
