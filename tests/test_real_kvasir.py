"""A few epochs on 40-80 real Kvasir-SEG pairs: Dice must rise above a trivial predictor's."""

import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATASETS, replace, tiny_raw_params, train_fold

from medfusion.config import params_from_dict
from medfusion.data.io import read_json
from medfusion.data.preprocess import preprocess_dataset
from medfusion.data.splits import make_split
from medfusion.evaluation import evaluate_run
from medfusion.hardware import resolve_precision

KVASIR = SHARED_DATASETS / "kvasir_seg"

pytestmark = pytest.mark.skipif(not KVASIR.is_dir(), reason=f"{KVASIR} not present (real-data test)")


# CASNet trains with DRGO, whose extra terms slow the start: in fp32 (AVX2 EPYC), at lr 3e-3, 25 epochs
# of 3 steps gave Dice 0.19 against all-foreground's 0.27 and 40 epochs of 6 steps 0.30-0.36 (L_seg
# alone: 0.42 at 25 x 3); at lr 1e-3, 40 x 6 gave 0.37-0.39 with 1 or 2 threads. With the labels resized
# centre-aligned (2026-12-07), 40 pairs at seeds 0, 1, 2 gave 0.33, 0.35, 0.25 (before: 0.35, 0.35, 0.30;
# all-foreground 0.27) on an AMX Xeon, fp32: 24 training images leave CASNet at the trivial level on
# some seeds, before and after. 80 pairs (48 training images, 12 steps an epoch) gave 0.45, 0.35, 0.51.
@pytest.mark.parametrize(
    ("model", "section", "widths", "epochs", "batch", "lr", "pairs"),
    [("unet", "unet", {"base_channels": 8}, 25, 8, 3e-3, 40),
     ("casnet", "model", {"base_channels": 8, "transformer_dim": 32, "transformer_layers": 1}, 40, 4, 1e-3, 80)],
)  # fmt: skip
def test_model_learns_on_real_kvasir_pairs(tmp_path, model, section, widths, epochs, batch, lr, pairs):
    raw = tmp_path / "raw"
    for sub in ("images", "masks"):
        (raw / sub).mkdir(parents=True)
    for image in sorted((KVASIR / "images").glob("*.jpg"))[:pairs]:
        shutil.copy(image, raw / "images" / image.name)
        shutil.copy(KVASIR / "masks" / image.name, raw / "masks" / image.name)
    preprocess_dataset("kvasir_seg", raw, tmp_path / "proc", 64)
    groups = {c["case_id"]: c["group"] for c in read_json(tmp_path / "proc" / "cases.json")}
    split = make_split(groups, "fraction", 4, seed=0, test_fraction=0.2)  # 40 pairs: 8 test, 24 train, 8 val

    params = params_from_dict(tiny_raw_params())
    params = replace(params, "data", image_size=64)
    params = replace(params, section, **widths)
    params = replace(params, "train", epochs=epochs, batch_size=batch, lr=lr, patience=epochs)
    # U-Net: what this CPU trains with by default (auto). CASNet: fp32, the numbers above; under bf16
    # (auto on an AVX512-BF16 EPYC) 40 x 6 steps gave 0.27 against all-foreground's 0.27 in one of
    # two runs (two pytest workers), so its slower start there is not what this test is about
    precision = resolve_precision("cpu", cpu_bf16=False if model == "casnet" else "auto")
    train_fold(
        params, "kvasir_seg", model, tmp_path / "proc", split, 0, 0, tmp_path / "run", precision=precision
    )
    rows = evaluate_run(tmp_path / "run" / "model.pt", tmp_path / "proc", split["test"], 8, precision)
    dice = np.mean([r["value"] for r in rows if r["metric"] == "dice"])

    # trivial predictor: everything is polyp (beats 'nothing is polyp', which scores 0)
    masks = np.load(tmp_path / "proc" / "masks.npy")
    cases = read_json(tmp_path / "proc" / "cases.json")
    test_masks = [masks[i] for i, c in enumerate(cases) if c["case_id"] in set(split["test"])]
    trivial = np.mean([2 * m.sum() / (m.sum() + m.size) for m in test_masks])
    print(f"{model}: Dice {dice:.3f} vs all-foreground {trivial:.3f}")
    assert dice > trivial + 0.05, f"Dice {dice:.3f} vs all-foreground {trivial:.3f}"
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["dataset"] == "kvasir_seg"
