"""evaluate_model: every run and the fold ensemble, raw and post-processed, per test case; 2-D and volumes."""

from pathlib import Path

import numpy as np
import pytest
from conftest import fp32, replace, tiny_raw_params, train_fold, train_folds

from medfusion.config import params_from_dict
from medfusion.data.fetch import fetch_dataset
from medfusion.data.io import read_json
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.evaluation import evaluate_model

FP32 = fp32()


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_volumes"])
def test_runs_ensemble_raw_and_post_per_case(tmp_path, dataset, monkeypatch):
    params = params_from_dict(tiny_raw_params())
    params = replace(params, "train", epochs=1)
    fetch_dataset(dataset, tmp_path / "raw", None, params.data.synthetic)
    preprocess_dataset(dataset, tmp_path / "raw", tmp_path / "proc", 32)
    cases = read_json(tmp_path / "proc" / "cases.json")
    split = make_split({c["case_id"]: c["group"] for c in cases}, "fraction", 2, 0, 0.2)
    runs = train_folds(params, dataset, "unet", tmp_path / "proc", split, tmp_path / "runs")

    per_case, info, examples = evaluate_model(runs, tmp_path / "runs", tmp_path / "proc", split, 8, FP32)

    assert set(per_case["run"]) == {"fold0_seed0", "fold1_seed0", "ensemble"}
    assert set(per_case["postprocess"]) == {"raw", "post"}
    assert set(per_case["case_id"]) == set(split["test"])  # a volume is one case, not its slices
    assert set(per_case["metric"]) == {"dice", "iou", "precision", "recall", "f1", "hd95", "assd", "present",
                                       "penalised"}  # fmt: skip
    overlap = per_case[~per_case["metric"].isin(["hd95", "assd"])]["value"]
    assert overlap.between(0, 1).all() and per_case["value"].notna().all()  # no NaN: missed = diagonal
    n_classes = 2 if dataset == "synthetic_volumes" else 1
    assert len(per_case) == 3 * 2 * len(split["test"]) * n_classes * 9
    assert info["distance_unit"] == ("mm" if dataset == "synthetic_volumes" else "px")
    assert set(info["postprocess"]) == {"fold0_seed0", "fold1_seed0", "ensemble"}
    for chosen in info["postprocess"].values():  # chosen on validation: never worse there
        assert chosen["val_dice_after"] >= chosen["val_dice_before"] - 1e-12
    regions = {"organ": [1, 2], "lesion": [2]} if dataset == "synthetic_volumes" else {"blob": [1]}
    assert info["regions"] == regions and set(per_case["class"]) == set(regions)  # scored as LiTS
    assert set(info["global_dice"]) == {"fold0_seed0", "fold1_seed0", "ensemble"}
    for kinds in info["global_dice"].values():
        assert set(kinds) == {"raw", "post"} and set(kinds["post"]) == set(regions)
        assert all(0 <= v <= 1 for v in kinds["post"].values())
    # the runs' probabilities set aside in files instead of memory (a large case): the same rows
    from medfusion import evaluation

    stores = []

    class Spilling(evaluation._CaseStore):
        def __init__(self):
            super().__init__(in_memory=0)
            stores.append(self)

    monkeypatch.setattr(evaluation, "_CaseStore", Spilling)
    spilled, _, _ = evaluate_model(runs, tmp_path / "runs", tmp_path / "proc", split, 8, FP32)
    assert stores and stores[0].folder is not None and not stores[0].files  # written, read back
    assert not Path(stores[0].folder.name).exists()  # and removed
    assert spilled.equals(per_case)
    n = min(4, len(split["test"]))
    assert examples["images"].shape[0] == examples["targets"].shape[0] == examples["preds"].shape[0] == n
    assert (
        examples["targets"].shape[1:] == (32, 32) and list(examples["case_ids"]) == sorted(split["test"])[:n]
    )


def test_the_ensemble_averages_the_runs_probabilities(tmp_path, synthetic_processed):
    """Two copies of one checkpoint: the ensemble must score exactly like either run (raw)."""
    import shutil

    processed, split = synthetic_processed
    params = replace(params_from_dict(tiny_raw_params()), "train", epochs=1)
    train_fold(params, "synthetic", "unet", processed, split, 0, 0, tmp_path / "fold0_seed0")
    shutil.copytree(tmp_path / "fold0_seed0", tmp_path / "fold1_seed0")
    runs = [{"fold": 0, "seed": 0}, {"fold": 1, "seed": 0}]
    per_case, _, _ = evaluate_model(runs, tmp_path, processed, split, 8, FP32)
    raw = per_case[(per_case["postprocess"] == "raw") & (per_case["metric"] == "dice")]
    one = raw[raw["run"] == "fold0_seed0"].set_index("case_id")["value"]
    ens = raw[raw["run"] == "ensemble"].set_index("case_id")["value"]
    assert np.allclose(one.sort_index(), ens.sort_index(), atol=1e-3)  # float16 probabilities


def test_eval_tta_scores_the_flipped_ensemble_as_its_own_row(tmp_path, synthetic_processed):
    """eval.tta flip: run "ensemble_tta" beside "ensemble", each of its labels the argmax of the runs'
    probabilities averaged over the four mirrorings (checked by hand at the processed size); the
    trained runs stay scored without TTA and the statistics leave both ensembles out."""
    import shutil

    import torch

    from medfusion.data.dataset import SegDataset
    from medfusion.inference.checkpoint import load_checkpoint
    from medfusion.metrics import overlap_metrics
    from medfusion.stats import case_means

    processed, split = synthetic_processed
    params = replace(params_from_dict(tiny_raw_params()), "train", epochs=1)
    train_fold(params, "synthetic", "unet", processed, split, 0, 0, tmp_path / "fold0_seed0")
    shutil.copytree(tmp_path / "fold0_seed0", tmp_path / "fold1_seed0")
    runs = [{"fold": 0, "seed": 0}, {"fold": 1, "seed": 0}]
    plain, _, _ = evaluate_model(runs, tmp_path, processed, split, 8, FP32, resolution="processed")
    per_case, info, _ = evaluate_model(
        runs, tmp_path, processed, split, 8, FP32, resolution="processed", tta="flip"
    )
    assert set(per_case["run"]) == {"fold0_seed0", "fold1_seed0", "ensemble", "ensemble_tta"}
    assert info["tta"] == "flip" and "ensemble_tta" in info["global_dice"]
    without = per_case[per_case["run"] != "ensemble_tta"].reset_index(drop=True)
    assert without.equals(plain.reset_index(drop=True))  # every other row as without TTA
    model, _ = load_checkpoint(tmp_path / "fold0_seed0" / "model.pt", FP32)
    test_set = SegDataset(processed, split["test"])
    raw = per_case[(per_case["run"] == "ensemble_tta") & (per_case["postprocess"] == "raw")]
    dice = raw[raw["metric"] == "dice"].set_index("case_id")["value"]
    for i, sample in enumerate(test_set.samples):
        image = test_set[i]["image"][None]
        flips = [image, image.flip(3), image.flip(2), image.flip((2, 3))]
        probs = [model(x).softmax(1).flip(d) if d else model(x).softmax(1)
                 for x, d in zip(flips, [(), (3,), (2,), (2, 3)], strict=True)]  # fmt: skip
        labels = (torch.stack(probs).mean(0)[0].argmax(0) == 1).detach().numpy()
        truth = test_set[i]["mask"].numpy() == 1
        assert dice[sample["case_id"]] == pytest.approx(overlap_metrics(labels, truth)["dice"], abs=2e-3)
    named = {"dataset": "synthetic", "model": "unet"}
    means, before = case_means(per_case.assign(**named)), case_means(plain.assign(**named))
    assert means.equals(before)  # the trained runs only, as before


def test_post_labels_wait_in_the_store_while_the_raw_ones_are_scored():
    """A case whose post-processing changes its labels (a 2-voxel speck removed): scored with a store
    that writes everything to files, the rows are those of scoring without one, and nothing is left."""
    from medfusion import evaluation
    from medfusion.postprocess import PostProcess

    target = np.zeros((6, 16, 16), np.uint8)
    target[1:5, 4:12, 4:12] = 1
    probs = np.zeros((2, 6, 8, 8), np.float32)
    probs[0] = 1.0
    probs[1, 1:5, 2:6, 2:6] = 2.0  # the organ, at half the in-plane size
    probs[1, 0, 7, 7] = 2.0  # a speck far from it: 2 x 2 voxels once resized, removed by min_size 10
    post = PostProcess(min_size=10)
    rows = {}
    for name, store in (("plain", None), ("store", evaluation._CaseStore(in_memory=0))):
        scores = evaluation._Scores({"organ": [1]})
        case = evaluation._Case("c", target, None, (2.0, 1.0, 1.0))
        labels = case.score(scores, "r", probs.copy(), post, store)
        if store is not None:
            assert store.folder is not None and not store.files  # written and read back
            store.__exit__(None, None, None)
        rows[name] = scores.rows
        assert labels[0, 7, 7] == 0 and labels[2, 8, 8] == 1
    assert rows["plain"] == rows["store"]
    dice = {
        kind: next(r["value"] for r in rows["plain"][("r", kind)] if r["metric"] == "dice")
        for kind in ("raw", "post")
    }
    assert dice["post"] > dice["raw"]
