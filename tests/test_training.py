import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import RecordingTracker, fp32, replace, train_cv, train_fold

from medfusion.common import TrainingError
from medfusion.data.io import read_history, write_json
from medfusion.entries import resolve_entry
from medfusion.evaluation import evaluate_run
from medfusion.hardware import resolve_precision
from medfusion.report import summarize_runs
from medfusion.training.loop import train_one_epoch
from medfusion.training.tracking import Tracker

FP32 = fp32()


def _fold(params, processed, split, tmp_path, name="run", precision=FP32):
    logged = []
    result = train_fold(params, "synthetic", "unet", processed, split, 0, 0, tmp_path / name,
                        lambda m, step: logged.append((step, m)), precision)  # fmt: skip
    return result, logged


def test_run_fold_trains_logs_and_keeps_the_best_checkpoint(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    result, logged = _fold(tiny_params, processed, split, tmp_path)
    assert [step for step, _ in logged] == [0, 1]
    assert {"train_loss", "val_loss", "val_dice", "lr", "seconds"} <= set(logged[0][1])
    history = read_history(tmp_path / "run" / "history.json")
    assert result["best_val_loss"] == min(r["val_loss"] for r in history)
    recorded = json.loads((tmp_path / "run" / "history.json").read_text())
    assert recorded["amp_dtype"] == "float32" and recorded["compile"] == "off"  # how it computed, and why
    assert recorded["precision_reason"] and recorded["compile_reason"] == "train.compile = off"
    checkpoint = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert checkpoint["model"] == "unet" and checkpoint["kwargs"] == {"base_channels": 4}
    assert checkpoint["epoch"] == result["best_epoch"]


def test_same_params_same_numbers_on_cpu(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    a, _ = _fold(tiny_params, processed, split, tmp_path, "a")
    b, _ = _fold(tiny_params, processed, split, tmp_path, "b")
    assert a["best_val_loss"] == b["best_val_loss"] and a["best_val_dice"] == b["best_val_dice"]


def test_bf16_channels_last_trains_finite(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    precision = resolve_precision("cpu", cpu_bf16=True, channels_last=True)
    assert precision.amp_dtype == torch.bfloat16
    result, _ = _fold(tiny_params, processed, split, tmp_path, precision=precision)
    assert np.isfinite(result["best_val_loss"]) and result["amp_dtype"] == "bfloat16"


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TrainingError, match="train.device = 'cuda' but no CUDA device"):
        resolve_precision("cuda", True, True)


def test_non_finite_loss_stops_with_step_and_samples(tiny_params, synthetic_processed):
    from medfusion.data.dataset import SegDataset
    from medfusion.models import build_model

    processed, split = synthetic_processed
    loader = torch.utils.data.DataLoader(SegDataset(processed, split["test"]), batch_size=2)
    model = build_model("unet", 3, 2, base_channels=4)
    with pytest.raises(TrainingError, match=r"loss is nan at step 0 \(sample indices \[0, 1\]\)"):
        train_one_epoch(
            model,
            loader,
            torch.optim.Adam(model.parameters()),
            lambda lg, t, b: lg.sum() * float("nan"),
            FP32,
        )


def test_run_cv_skips_finished_runs_and_redoes_changed_ones(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    write_json(tmp_path / "split.json", split)
    tracker = RecordingTracker()
    out = tmp_path / "runs"
    train_cv(tiny_params, "synthetic", "unet", processed, tmp_path / "split.json", out, tracker)
    assert tracker.started == [(0, 0), (1, 0)]
    (out / "fold1_seed0" / "result.json").unlink()  # as if the stage was killed during fold 1
    train_cv(tiny_params, "synthetic", "unet", processed, tmp_path / "split.json", out, tracker)
    assert tracker.started[2:] == [(1, 0)]  # fold 0 was not redone
    changed = replace(tiny_params, "unet", base_channels=2)
    train_cv(changed, "synthetic", "unet", processed, tmp_path / "split.json", out, tracker)
    assert tracker.started[3:] == [(0, 0), (1, 0)]  # a new config retrains everything
    fewer = replace(changed, "cv", seeds=[0], n_folds=2)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["fold"], r["seed"]) for r in summary["runs"]] == [(0, 0), (1, 0)]
    assert fewer.cv.n_folds == 2


def test_mlflow_parent_children_metrics_and_tags(tiny_params, synthetic_processed, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    processed, split = synthetic_processed
    write_json(tmp_path / "split.json", split)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_STAGE", "train@synthetic-unet")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "medfusion/synthetic", "unet", {"train.lr": 0.003}, {"dataset": "synthetic"},
                      tmp_path / "runs" / "mlflow.json")  # fmt: skip
    results = train_cv(
        tiny_params, "synthetic", "unet", processed, tmp_path / "split.json", tmp_path / "runs", tracker.child
    )
    tracker.finish()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("medfusion/synthetic")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tracker.parent_id]
    assert len(parent) == 1 and len(children) == 2
    child = children[0]
    assert (
        child.data.tags["dvc.stage"] == "train@synthetic-unet"
        and child.data.tags["dvc.exp_name"] == "exp-test"
    )
    assert "mlflow.source.git.commit" in child.data.tags and child.data.params["train.lr"] == "0.003"
    assert len(client.get_metric_history(child.info.run_id, "val/dice")) == 2
    assert {r["mlflow_run_id"] for r in results} == {c.info.run_id for c in children}
    assert child.data.tags["amp_dtype"] == results[0]["amp_dtype"] and child.data.tags["precision_reason"]


def test_an_interrupted_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    """After a kill (the run left RUNNING) or an exception (FAILED), the rerun of the same (fold, seed,
    config) logs into the same MLflow run; another config starts a new one."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "medfusion/synthetic", "unet", {}, {}, tmp_path / "mlflow.json")
    with pytest.raises(KeyboardInterrupt):
        with tracker.child(0, 0, {"config_hash": "abc"}) as log:
            log({"val_dice": 0.5}, 0)
            raise KeyboardInterrupt
    with tracker.child(0, 0, {"config_hash": "abc"}) as log:
        log({"val_dice": 0.6}, 1)
    with tracker.child(0, 0, {"config_hash": "other"}) as other:
        other({"val_dice": 0.1}, 0)
    client = MlflowClient(uri)
    assert log.run_id != other.run_id
    assert [m.step for m in client.get_metric_history(log.run_id, "val/dice")] == [0, 1]
    assert client.get_run(log.run_id).info.status == "FINISHED"


def test_unreachable_tracking_server_does_not_stop_training(
    tiny_params, synthetic_processed, tmp_path, capsys
):
    processed, split = synthetic_processed
    write_json(tmp_path / "split.json", split)
    tracker = Tracker("http://127.0.0.1:9/", "x", "unet", {}, {})
    assert tracker.client is None
    assert "training continues untracked" in capsys.readouterr().err
    results = train_cv(
        tiny_params, "synthetic", "unet", processed, tmp_path / "split.json", tmp_path / "runs", tracker.child
    )
    assert len(results) == 2


def test_evaluation_rows_and_summary(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    _fold(tiny_params, processed, split, tmp_path)
    rows = evaluate_run(tmp_path / "run" / "model.pt", processed, split["test"], 8, FP32)
    table = pd.DataFrame(rows).assign(dataset="synthetic", model="unet", run="fold0_seed0")
    assert set(table["case_id"]) == set(split["test"]) and set(table["class"]) == {"blob"}
    overlap = table[table["metric"].isin(["dice", "iou", "precision", "recall", "f1"])]
    assert overlap["value"].between(0, 1).all()
    distances = table[table["metric"].isin(["hd95", "assd"])]["value"].dropna()  # pixels: no spacing in 2-D
    assert len(distances) and (distances >= 0).all()
    summary = summarize_runs(table)
    assert set(summary["metric"]) == {"dice", "iou", "precision", "recall", "f1", "hd95", "assd"}
    assert (summary["runs"] == 1).all() and (summary["std"] == 0).all()


def test_entry_params_are_flattened_for_tracking(tiny_params):
    flat = resolve_entry(tiny_params, "synthetic", "unet").tracking_params()
    assert flat["train.lr"] == 0.003 and flat["train.epochs"] == 2 and flat["model_kwargs.base_channels"] == 4
    assert not any(isinstance(v, dict) for v in flat.values())
    assert "train.num_workers" not in flat and not any(k.startswith("drgo.") for k in flat)  # plain L_seg


def test_resumed_stage_reuses_its_parent_run_only_for_the_same_params(tmp_path):
    uri, state = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow.json"
    first = Tracker(uri, "e", "unet", {"train.lr": 0.1}, {}, state)
    again = Tracker(uri, "e", "unet", {"train.lr": 0.1}, {}, state)
    changed = Tracker(uri, "e", "unet", {"train.lr": 0.2}, {}, state)
    assert first.parent_id == again.parent_id != changed.parent_id


def test_casnet_trains_with_drgo_and_the_switches_change_the_run(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    params = replace(tiny_params, "model", base_channels=4, transformer_dim=16, transformer_layers=1)
    params = replace(params, "drgo", region_size=8)
    casnet, wo_br = (resolve_entry(params, "synthetic", n) for n in ("casnet", "casnet_wo_br"))
    assert casnet.drgo.use_boundary and casnet.boundary and not wo_br.boundary and wo_br.drgo is not None
    results = {}
    for name in ("casnet", "casnet_wo_br"):
        results[name] = train_fold(params, "synthetic", name, processed, split, 0, 0, tmp_path / name)
        assert np.isfinite(results[name]["best_val_loss"])
    history = [read_history(tmp_path / n / "history.json") for n in results]
    assert history[0][0]["train_loss"] != history[1][0]["train_loss"]  # the boundary term is in one only
    assert {"drgo_seg", "drgo_ada", "drgo_drs", "drgo_bnd", "drgo_gamma"} <= set(history[0][0])
    assert "drgo_bnd" not in history[1][0] and "drgo_ada" in history[1][0]
    checkpoint = torch.load(tmp_path / "casnet_wo_br" / "model.pt", weights_only=True)
    assert checkpoint["architecture"] == "casnet" and "use_boundary" not in checkpoint["kwargs"]


def test_drgo_is_a_setting_of_each_model(tiny_params, synthetic_processed, tmp_path):
    processed, split = synthetic_processed
    with_drgo = replace(replace(tiny_params, "unet", drgo=True), "drgo", region_size=8)
    assert resolve_entry(with_drgo, "synthetic", "unet").drgo is not None
    assert resolve_entry(tiny_params, "synthetic", "unet").drgo is None
    a, _ = _fold(tiny_params, processed, split, tmp_path, "plain")
    b, _ = _fold(with_drgo, processed, split, tmp_path, "drgo")
    history = [read_history(tmp_path / n / "history.json") for n in ("plain", "drgo")]
    assert history[0][0]["train_loss"] < history[1][0]["train_loss"]  # extra non-negative terms
    assert history[0][0]["val_loss"] == pytest.approx(history[1][0]["val_loss"], rel=0.5)  # both L_seg


def test_dataset_distance_maps_follow_the_augmented_mask(synthetic_processed):
    from medfusion.data.dataset import SegDataset
    from medfusion.data.distance import distance_map

    processed, split = synthetic_processed
    dataset = SegDataset(processed, split["test"], augment=True, seed=1, distance=True)
    for i in range(4):
        item = dataset[i]
        assert item["distance"].shape == item["mask"].shape
        assert np.array_equal(item["distance"].numpy(), distance_map(item["mask"].numpy()))
    assert "distance" not in SegDataset(processed, split["test"])[0]


def test_a_compile_failure_names_the_setting_and_the_way_out():
    from torch._dynamo.exc import BackendCompilerFailed

    from medfusion.training.fold import compile_errors_explained

    with pytest.raises(TrainingError, match=r"train.compile = 'regions'.*-S train.compile=off"):
        with compile_errors_explained("regions"):
            raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler found"), None)
