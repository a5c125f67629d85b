"""Robustness of loading trained models: truncated or foreign checkpoints in `evaluate` and `predict`,
and running out of memory while predicting.

What the user must get: one short message naming the model.pt and what is wrong with it (not PyTorch's
page-long state_dict traceback); `medfusion predict` exits 1 and writes no output folder; the file
itself is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.evaluation import evaluate_model, evaluate_run
from medfusion.hardware import Precision
from medfusion.inference.checkpoint import CheckpointError, load_checkpoint
from medfusion.models import build_model
from medfusion.models.unet import UNet

runner = CliRunner()
FP32 = Precision(torch.device("cpu"), None, False)


def write_checkpoint(path: Path, weights: dict | None = None, **record) -> Path:
    """A model.pt in run_fold's format: a U-Net (base_channels 4, RGB, 2 classes) unless `record` says otherwise."""
    torch.manual_seed(0)
    base = {
        "model": "unet",
        "architecture": "unet",
        "kwargs": {"base_channels": 4},
        "in_channels": 3,
        "num_classes": 2,
        "image_size": 32,
        "dataset": "synthetic",
        "fold": 0,
        "seed": 0,
        "epoch": 0,
    }
    base.update(record)
    if weights is None:
        weights = build_model(
            base["architecture"], base["in_channels"], base["num_classes"], **base["kwargs"]
        )
        weights = weights.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**base, "state_dict": weights}, path)
    return path


def unet_weights(**kwargs) -> dict:
    args = {"in_channels": 3, "num_classes": 2, "base_channels": 4, **kwargs}
    return UNet(**args).state_dict()


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CHECKPOINTS = {
    # case: (how model.pt is made, what the message must say)
    "truncated file": (
        lambda p: truncated(write_checkpoint(p)),
        ["not a readable medfusion checkpoint", "truncated or corrupt"],
    ),
    "empty file": (lambda p: p.write_bytes(b""), ["not a readable medfusion checkpoint"]),
    "not a checkpoint": (
        lambda p: torch.save({"weights": unet_weights()}, p),
        ["not a medfusion checkpoint: no [", "'state_dict'", "it holds keys ['weights']"],
    ),
    "bare state_dict": (
        lambda p: torch.save(unet_weights(), p),
        [
            "not a medfusion checkpoint",
            "only weights (a bare state_dict of",
            "Expected a model.pt written by",
        ],
    ),
    "U-Net weights, record says casnet": (
        lambda p: write_checkpoint(p, unet_weights(), model="casnet", architecture="casnet"),
        [
            "its weights do not fit the model its record describes (casnet {'base_channels': 4}",
            "missing from the file",
        ],
    ),
    "other widths": (
        lambda p: write_checkpoint(p, unet_weights(base_channels=8)),
        [
            "do not fit",
            "of another shape (e.g. 'encoder.stages.0.0.weight': (8, 3, 3, 3) in the file, (4, 3, 3, 3)",
        ],
    ),
    "other classes": (
        lambda p: write_checkpoint(p, unet_weights(num_classes=3)),
        ["do not fit", "2 classes", "in the file", "(2, 4, 1, 1) in the model"],
    ),
    "unknown architecture": (
        lambda p: write_checkpoint(p, unet_weights(), model="vnet", architecture="vnet"),
        ["cannot build the model it records, vnet", "unknown model 'vnet'"],
    ),
}


@pytest.fixture(params=list(BAD_CHECKPOINTS))
def bad_checkpoint(request, tmp_path) -> tuple[Path, list[str], bytes]:
    make, expected = BAD_CHECKPOINTS[request.param]
    path = tmp_path / "runs" / "synthetic" / "unet" / "fold0_seed0" / "model.pt"
    path.parent.mkdir(parents=True)
    make(path)
    return path, expected, path.read_bytes()


def test_evaluate_names_the_checkpoint_and_what_is_wrong(bad_checkpoint, synthetic_processed):
    path, expected, content = bad_checkpoint
    processed, split = synthetic_processed
    with pytest.raises(CheckpointError) as err:
        evaluate_run(path, processed, split["test"], 8, FP32)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and all(text in message for text in expected), message
    assert len(message) - len(str(path)) < 500 and "Error(s) in loading state_dict" not in message
    runs = [{"fold": 0, "seed": 0}]
    with pytest.raises(CheckpointError, match=str(path)):  # the evaluate stage: before it writes anything
        evaluate_model(runs, path.parent.parent, processed, split, 8, FP32)
    assert path.read_bytes() == content  # the file is left as it was


def test_predict_names_the_checkpoint_and_writes_nothing(bad_checkpoint, tmp_path):
    path, expected, content = bad_checkpoint
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out"
    for run in (path, path.parent.parent):  # one model.pt, or the run folder of every fold
        result = runner.invoke(
            app, ["predict", "--run", str(run), str(tmp_path / "x.png"), "--out", str(out)]
        )
        assert result.exit_code == 1, result.output
        assert f"{path}: " in result.output and all(t in result.output for t in expected), result.output
        assert result.output.count(str(path)) == 1  # named once, not "path: cannot load (path: ...)"
        assert "Traceback" not in result.output and "Error(s) in loading state_dict" not in result.output
        assert not out.exists()
    assert path.read_bytes() == content


def test_a_good_checkpoint_loads(tmp_path):
    model, checkpoint = load_checkpoint(write_checkpoint(tmp_path / "model.pt"), FP32)
    assert isinstance(model, UNet) and not model.training and checkpoint["num_classes"] == 2


def test_missing_checkpoint_is_named_by_evaluate(synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    runs = [{"fold": 0, "seed": 0}]  # summary.json lists a run whose model.pt is gone
    with pytest.raises(CheckpointError) as err:
        evaluate_model(runs, tmp_path, processed, split, 8, FP32)
    assert str(err.value).startswith(f"{tmp_path / 'fold0_seed0' / 'model.pt'}: no such checkpoint")


def test_checkpoint_of_another_dataset_is_refused_by_evaluate(synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    path = write_checkpoint(tmp_path / "model.pt", in_channels=1, num_classes=3, dataset="synthetic_volumes")
    with pytest.raises(CheckpointError) as err:
        evaluate_run(path, processed, split["test"], 8, FP32)
    assert str(err.value).startswith(
        f"{path}: trained for 3 classes from 1 channel(s), but {processed} has 2 classes and 3 channel(s)"
    )


def test_out_of_memory_in_predict_names_the_input_and_the_options(tmp_path, monkeypatch):
    run = write_checkpoint(tmp_path / "run" / "fold0_seed0" / "model.pt").parent.parent
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")

    def out_of_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet, "forward", out_of_memory)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", "--run", str(run), str(tmp_path / "big.png"), "--out", str(out), "--batch-size", "4"]
    )
    assert result.exit_code == 1
    assert (
        f"{tmp_path / 'big.png'}: prediction: out of memory on cpu with a batch of 1 images" in result.output
    )
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in result.output
    assert "`--device=cuda`" in result.output and "data.image_size" not in result.output
    assert list(out.iterdir()) == []  # no mask for the failed input


def test_out_of_memory_in_evaluate_names_eval_batch_size(synthetic_processed, tmp_path, monkeypatch):
    from medfusion.common import TrainingError
    from medfusion.data.dataset import SegDataset
    from medfusion.evaluation import predict_dataset_probs

    processed, split = synthetic_processed
    model, _ = load_checkpoint(write_checkpoint(tmp_path / "model.pt"), FP32)
    monkeypatch.setattr(UNet, "forward", lambda self, x: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(TrainingError) as err:
        predict_dataset_probs(model, SegDataset(processed, split["test"]), 4, FP32)
    message = str(err.value)
    assert message.startswith(
        "prediction of samples 0..3: out of memory on cpu with a batch of 4 images of 3x32x32"
    )
    assert "`-S eval.batch_size=2`" in message and "data.image_size" not in message
