import dataclasses

import numpy as np
import pytest
import torch
from conftest import REPO, fp32, raw_params, replace, train_fold
from scipy import ndimage

from medfusion.config import AugmentParams, ConfigError, load_params, params_from_dict
from medfusion.data.augment import MixCollate, augment_sample, build_transform, mix_batch
from medfusion.data.dataset import SegDataset, zscore
from medfusion.data.distance import distance_map
from medfusion.losses import segmentation_loss
from medfusion.losses.drgo import DRGOSettings, batch_confidence, drgo_loss
from medfusion.training.fold import make_loader
from medfusion.training.loop import DRGOObjective, plain_objective

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentParams) if f.name.endswith("_p")]
NONE = AugmentParams(**dict.fromkeys(PROBABILITIES, 0.0))
GEOMETRIC = dataclasses.replace(NONE, hflip_p=0.5, vflip_p=0.5, rotate_p=1.0, scale_p=1.0, elastic_p=1.0)
LEVELS = np.array([40, 120, 200])  # image intensity of classes 0, 1, 2


def labelled_image(seed: int, channels: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A 3-class mask of random boxes and its image (C, S, S) uint8: class k drawn at LEVELS[k]."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, size - 16, 2)
        h, w = rng.integers(8, 24, 2)
        mask[y : y + h, x : x + w] = rng.integers(1, 3)
    image = np.repeat(LEVELS[mask][None], channels, axis=0).astype(np.uint8)  # (C, S, S)
    return image, mask


@pytest.mark.parametrize("channels", [1, 3])
def test_geometric_transforms_move_image_and_mask_together(channels):
    transform = build_transform(GEOMETRIC)
    changed = 0
    for seed in range(6):
        image, mask = labelled_image(seed, channels)
        out_image, out_mask = augment_sample(transform, image, mask, seed=0, epoch=0, index=seed)
        assert out_image.shape == image.shape and out_image.dtype == np.uint8
        assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1, 2}  # nearest neighbour, 0 border: valid indices only
        # the class read back from the (bilinear) image agrees with the (nearest) mask except at edges
        read_back = np.abs(out_image[0][..., None].astype(int) - LEVELS).argmin(-1)
        edges = ndimage.binary_dilation(out_mask != ndimage.grey_erosion(out_mask, 3), iterations=2)
        edges |= ndimage.binary_dilation(out_mask != ndimage.grey_dilation(out_mask, 3), iterations=2)
        assert not ((read_back != out_mask) & ~edges).any()
        changed += not np.array_equal(out_mask, mask)
    assert changed == 6


def test_full_augmentation_keeps_valid_class_indices():
    transform = build_transform(AugmentParams(**dict.fromkeys(PROBABILITIES, 1.0)))
    for seed in range(4):
        image, mask = labelled_image(seed, 3)
        _, out_mask = augment_sample(transform, image, mask, seed=1, epoch=2, index=seed)
        assert set(np.unique(out_mask)) <= {0, 1, 2}


@pytest.mark.parametrize("key", [k for k in PROBABILITIES if k not in ("mixup_p", "cutmix_p")])
def test_each_transform_alone_changes_the_image(key):
    image, mask = labelled_image(0, 3)
    image = (image + np.random.default_rng(0).integers(0, 30, image.shape)).astype(np.uint8)
    out, _ = augment_sample(build_transform(dataclasses.replace(NONE, **{key: 1.0})), image, mask, 0, 0, 0)
    assert not np.array_equal(out, image)


def test_zero_probabilities_are_the_identity(synthetic_processed):
    image, mask = labelled_image(0, 3)
    out_image, out_mask = augment_sample(build_transform(NONE), image, mask, 0, 0, 0)
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)
    processed, split = synthetic_processed
    plain, off = SegDataset(processed, split["test"]), SegDataset(processed, split["test"], augment=NONE)
    items = [off[(3, i)] for i in range(4)]
    for i, item in enumerate(items):
        assert torch.equal(item["image"], plain[i]["image"]) and torch.equal(item["mask"], plain[i]["mask"])
    batch = MixCollate(NONE, seed=0)(items)
    assert "mix_lambda" not in batch and torch.equal(batch["mask"], torch.stack([it["mask"] for it in items]))


def test_same_seed_epoch_index_same_augmentation(synthetic_processed):
    processed, split = synthetic_processed
    ds = SegDataset(processed, split["test"], augment=True, seed=3, distance=True)
    first = ds[(1, 2)]
    for i in range(4):  # other items in between: no shared stream
        ds[(1, i)]
    again, other_epoch = ds[(1, 2)], ds[(2, 2)]
    assert all(torch.equal(first[k], again[k]) for k in ("image", "mask", "distance"))
    assert not torch.equal(first["image"], other_epoch["image"])
    ds.set_epoch(1)
    assert torch.equal(ds[2]["image"], first["image"]) and ds[2]["epoch"] == 1
    other_seed = SegDataset(processed, split["test"], augment=True, seed=4)
    assert not torch.equal(other_seed[(1, 2)]["image"], first["image"])


def test_worker_count_does_not_change_the_batches(synthetic_processed):
    processed, split = synthetic_processed
    ids = split["folds"][0]["train"]
    params = dataclasses.replace(AugmentParams(), mixup_p=0.5, cutmix_p=0.5)

    def epochs(workers: int) -> list[list[dict]]:
        dataset = SegDataset(processed, ids, augment=params, seed=5, distance=True)
        loader = make_loader(dataset, 4, True, workers, seed=5, pin=False, collate_fn=MixCollate(params, 5))
        out = []
        for epoch in range(2):  # persistent workers: the epoch must reach them through the sampler
            loader.sampler.set_epoch(epoch)
            out.append(list(loader))
        return out

    serial, parallel = epochs(0), epochs(2)
    for batches_a, batches_b in zip(serial, parallel, strict=True):
        for a, b in zip(batches_a, batches_b, strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(serial[0][0]["index"], serial[1][0]["index"])  # a new order each epoch
    assert any("mix_lambda" in b for e in serial for b in e)


def constant_batch(size: int = 4, side: int = 32) -> dict:
    """Sample b: image all b, mask all b, so a pasted box shows whose it is."""
    values = torch.arange(size)
    mask = values[:, None, None].expand(size, side, side).clone()
    return {
        "image": mask[:, None].float().expand(size, 3, side, side).clone(),
        "mask": mask,
        "distance": torch.stack([torch.from_numpy(distance_map(m.numpy())) for m in mask]),
        "index": values,
    }


def test_cutmix_pastes_a_box_of_another_sample_and_recomputes_distance():
    params = dataclasses.replace(NONE, cutmix_p=1.0, cutmix_area_range=[0.1, 0.3])
    for seed in range(5):
        batch = mix_batch(constant_batch(), params, np.random.default_rng(seed))
        assert "mix_lambda" not in batch
        for b, (image, mask) in enumerate(zip(batch["image"], batch["mask"], strict=True)):
            pasted = mask != b  # inside the box: the other mask; outside: the sample's own
            assert len(torch.unique(mask[pasted])) == 1 and int(mask[pasted][0]) != b
            rows, cols = torch.nonzero(pasted, as_tuple=True)
            box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
            assert int(pasted.sum()) == (box[1] - box[0]) * (box[3] - box[2])  # a full rectangle
            assert 0.08 <= float(pasted.float().mean()) <= 0.33
            assert torch.equal(image, mask[None].float().expand_as(image))  # the image box is the mask box
            assert torch.equal(batch["distance"][b], torch.from_numpy(distance_map(mask.numpy())))


def test_mixup_blends_images_keeps_both_masks_and_weights_the_loss():
    batch_in = constant_batch()
    batch_in["image"] = torch.randn(4, 3, 32, 32)
    params = dataclasses.replace(NONE, mixup_p=1.0, mixup_alpha=0.4)
    batch = mix_batch(batch_in, params, np.random.default_rng(1))
    lam = float(batch["mix_lambda"])
    assert 0 <= lam <= 1
    partner = batch["mix_mask"][:, 0, 0]  # constant masks: the partner's index
    assert sorted(partner.tolist()) == [0, 1, 2, 3] and (partner != torch.arange(4)).all()
    expected_image = lam * batch_in["image"] + (1 - lam) * batch_in["image"][partner]
    assert torch.allclose(batch["image"], expected_image, atol=1e-6)
    assert torch.equal(batch["mix_distance"], batch_in["distance"][partner])
    assert torch.equal(batch["mask"], batch_in["mask"])

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 3, padding=1)
    logits, target = model(batch["image"]), batch["mask"]
    loss = plain_objective(segmentation_loss)(logits, target, batch)
    expected = lam * segmentation_loss(logits, target) + (1 - lam) * segmentation_loss(
        logits, batch["mix_mask"]
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()  # one graph through both terms


def test_drgo_mixup_batch_updates_the_confidence_average_once():
    batch = mix_batch(
        constant_batch(side=32), dataclasses.replace(NONE, mixup_p=1.0), np.random.default_rng(2)
    )
    lam = float(batch["mix_lambda"])
    logits = torch.randn(4, 4, 32, 32)
    settings, class_freq = DRGOSettings(region_size=8, regions_per_image=4), torch.full((4,), 0.25)
    objective = DRGOObjective(settings, class_freq, 0.0, seed=0)
    loss = objective(logits, batch["mask"], batch)
    assert float(objective.confidence) == pytest.approx(
        0.1 * float(batch_confidence(logits.softmax(1)))
    )  # one update from 0
    generator = torch.Generator().manual_seed(0)  # the objective's draws, in its order: y_a, then y_b
    a, _ = drgo_loss(logits, batch["mask"], class_freq, settings, 0.0, batch["distance"], 0.0, generator)
    b, _ = drgo_loss(
        logits, batch["mix_mask"], class_freq, settings, 0.0, batch["mix_distance"], 0.0, generator
    )
    assert float(loss) == pytest.approx(float(lam * a + (1 - lam) * b), rel=1e-6)


def test_validation_and_test_data_are_never_augmented(
    tiny_params, synthetic_processed, tmp_path, monkeypatch
):
    import medfusion.evaluation as evaluation
    import medfusion.training.fold as fold

    made: list[SegDataset] = []

    class Recording(SegDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(fold, "SegDataset", Recording)
    monkeypatch.setattr(evaluation, "SegDataset", Recording)
    processed, split = synthetic_processed
    params = replace(tiny_params, "train", epochs=1)
    train_fold(params, "synthetic", "unet", processed, split, 0, 0, tmp_path)
    evaluation.evaluate_run(tmp_path / "model.pt", processed, split["test"], 8, fp32())
    train, val, test = made
    assert train.augment == params.augment and val.augment is None and test.augment is None
    raw = np.asarray(test.images[test.indices[0]])
    assert torch.equal(test[(7, 0)]["image"], torch.from_numpy(zscore(raw)))


def test_augment_params_are_validated_and_mirror_params_yaml():
    assert load_params(REPO / "params.yaml").augment == AugmentParams()
    for key, value in (("rotate_p", 1.5), ("scale_range", [1.2, 0.8]), ("cutmix_area_range", [0.0, 0.3])):
        raw = raw_params()
        raw["augment"][key] = value
        with pytest.raises(ConfigError, match=f"augment.{key}"):
            params_from_dict(raw)
