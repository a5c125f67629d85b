"""The one place that knows a model entry: `resolve_entry(params, dataset, name) -> Entry`.

An entry is a name params.yaml lists under `models`: a baseline (`unet`, its own section) or CASNet
and its ablation variants (`casnet`, `casnet_wo_br`: the `model` section with the variant's
`ablations` override). Only this module knows that CASNet entries read `model`, that `use_boundary`
and `drgo` are loss settings rather than constructor arguments, that `modalities: null` comes from
the dataset, which constructors take the image size, and how DRGO is configured. Training,
evaluation, the executor and tracking take an `Entry` and read no model facts from `Params`.

What a run depends on (`Entry.run_hash`), what MLflow records (`Entry.tracking_params`) and what a
checkpoint records (`Entry.checkpoint_record`) all come from `Entry.config()`, so they cannot
disagree. Settings that cannot change a result (`config.RESOURCE_KEYS`: loader workers, the
evaluation batch size, the executor) are not part of an entry; they travel as `Resources`.

Adding a model: its file in medfusion/models/, its line in `medfusion.models.MODELS`, its params.yaml
section with its dataclass in medfusion/config.py (a `ModelSection` with a `TINY` line), and nothing here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion.config import TRAINING_KEYS, AugmentParams, Params, config_hash
from medfusion.losses.drgo import DRGOSettings


@dataclass(frozen=True)
class ModelSpec:
    """A network: its registry name and constructor keyword arguments (no loss settings)."""

    architecture: str
    kwargs: dict[str, Any]

    def build(self, in_channels: int, num_classes: int) -> Any:
        from medfusion.models import build_model

        return build_model(self.architecture, in_channels, num_classes, **self.kwargs)


@dataclass(frozen=True)
class Recipe:
    """How an entry is optimised: the `train` section's keys that change a result (all but num_workers)."""

    device: str
    cpu_bf16: bool | str
    channels_last: bool | str
    optimizer: str
    scheduler: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    compile: str


@dataclass(frozen=True)
class Resources:
    """How a run is computed without changing its numbers (`config.RESOURCE_KEYS`)."""

    num_workers: int = 0  # DataLoader workers; augmentation is a function of (seed, epoch, sample)
    eval_batch_size: int = 16  # images per forward pass in validation and evaluation


@dataclass(frozen=True)
class Entry:
    """Everything one model entry's runs on one dataset depend on, besides the data, fold and seed."""

    name: str  # as params.yaml lists it (casnet_wo_br)
    dataset: str
    model: ModelSpec
    in_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int | str  # data.image_size: S, or "native"
    drgo: DRGOSettings | None  # None: trained with L_seg alone
    ce_weight: float  # L_seg = soft Dice + ce_weight x cross-entropy
    recipe: Recipe
    augment: AugmentParams | None  # None: no augmentation (train.augment: false)
    preprocess: dict[str, Any]  # what `medfusion predict` must do to new images
    patch_size: int | None = None  # native images: training patches and sliding windows of this side
    pretrained: str | None = None  # the encoder's starting weights (<model>.pretrained), None = from scratch
    roi_loss: bool = False  # eval.roi_loss: loss and validation inside the data's field of view

    @property
    def native(self) -> bool:
        return self.image_size == "native"

    @property
    def architecture(self) -> str:
        return self.model.architecture

    @property
    def boundary(self) -> bool:
        """Whether the loss needs DRGO's distance maps d(x)."""
        return self.drgo is not None and self.drgo.use_boundary

    def build(self) -> Any:
        """The entry's network, freshly initialised (nn.Module)."""
        return self.model.build(self.in_channels, self.num_classes)

    def config(self) -> dict[str, Any]:
        """Everything above as plain JSON-able data."""
        return {
            "dataset": self.dataset,
            "entry": self.name,
            "architecture": self.architecture,
            "model_kwargs": self.model.kwargs,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            # only where it is used, so that the runs of a fixed image size keep their hashes
            **({"patch_size": self.patch_size} if self.native else {}),
            # the file's content, not its path, so that another file at the same path retrains
            **({"pretrained_sha256": self.pretrained_sha256()} if self.pretrained else {}),
            "drgo": dataclasses.asdict(self.drgo) if self.drgo else None,
            "loss": {"ce_weight": self.ce_weight},
            "train": dataclasses.asdict(self.recipe),
            "augment": dataclasses.asdict(self.augment) if self.augment else None,
            "preprocess": self.preprocess,
            # only where it is set, so that runs without it keep their hashes
            **({"roi_loss": True} if self.roi_loss else {}),
        }

    def pretrained_sha256(self) -> str:
        """sha256 of the pretrained file (a clear error when it does not exist); read once per version."""
        from medfusion.models.pretrained import PretrainedError

        path = Path(self.pretrained)
        if not path.is_file():
            raise PretrainedError(
                f"{self.architecture}.pretrained: {path} does not exist; expected the state dict "
                "medfusion/models/pretrained.py names for this model, or null to train from scratch"
            )
        stat = path.stat()
        return _file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)

    def run_hash(self, data_sha256: str, fold_split: dict, fold: int, seed: int) -> str:
        """What a finished (fold, seed) run depends on: the entry, the processed data (meta.json's
        sha256), the fold's cases and the code that trains it (`provenance.code_fingerprint`: every
        medfusion module training imports). Its result.json carries it; a run with another is retrained."""
        from medfusion.provenance import code_fingerprint

        return config_hash(self.config(), data_sha256, fold_split, fold, seed, code_fingerprint()[0])

    def tracking_params(self) -> dict[str, Any]:
        """The entry's settings flat ('train.lr', 'model_kwargs.base_channels', ...), for MLflow.
        DRGO's and augmentation's keys appear only where they are used."""
        config = self.config()
        flat = {"dataset": self.dataset, "model": self.name, "architecture": self.architecture}
        flat["data.image_size"] = self.image_size
        if self.native:
            flat["data.patch_size"] = self.patch_size
        if self.pretrained:
            flat["pretrained"], flat["pretrained_sha256"] = self.pretrained, self.pretrained_sha256()
        for section in ("model_kwargs", "train", "loss", "drgo", "augment"):
            if config[section] is not None:
                flat.update(_flatten(config[section], f"{section}."))
        return flat

    def checkpoint_record(self) -> dict[str, Any]:
        """What model.pt records beside the weights, so that evaluation and `medfusion predict` can
        rebuild the network and preprocess new images as the training data was."""
        return {
            "model": self.name,
            "architecture": self.architecture,
            "kwargs": self.model.kwargs,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "class_names": list(self.class_names),
            "preprocess": self.preprocess,
            "dataset": self.dataset,
            "pretrained": {"file": self.pretrained, "sha256": self.pretrained_sha256()}
            if self.pretrained
            else None,
        }


def is_casnet_entry(params: Params, name: str) -> bool:
    """CASNet and its ablation variants are the keys of `ablations`."""
    return name in params.ablations


def entry_section(params: Params, name: str) -> dict[str, Any]:
    """The params section entry `name` reads, as a dict: its baseline section, or `model` with the
    entry's ablation override applied (use_boundary and drgo included)."""
    if is_casnet_entry(params, name):
        return {**dataclasses.asdict(params.model), **params.ablations[name]}
    if name not in params.models.baselines and not hasattr(params, name):
        raise KeyError(f"unknown model entry {name!r}; params.yaml lists {params.model_names}")
    return dataclasses.asdict(getattr(params, name))


def resolve_model(params: Params, name: str, modalities: int = 1, image_size: int | None = None) -> ModelSpec:
    """The network of entry `name`: registry name and constructor kwargs. `modalities` fills CASNet's
    `modalities: null`; constructors that take `image_size` (position tables learned at a reference
    size: TransUNet, MedT) get `image_size`, default the model's input side (data.image_size, or
    data.patch_size for native images)."""
    from medfusion.models import MODELS

    architecture = "casnet" if is_casnet_entry(params, name) else name
    kwargs = {k: v for k, v in entry_section(params, name).items() if k not in TRAINING_KEYS}
    if kwargs.get("modalities", 0) is None:
        kwargs["modalities"] = modalities
    if "image_size" in inspect.signature(MODELS[architecture]).parameters:
        kwargs["image_size"] = image_size or params.data.model_size
    return ModelSpec(architecture, kwargs)


def drgo_settings(params: Params, name: str) -> DRGOSettings | None:
    """DRGO as entry `name` trains with it (its section's `drgo`), or None (L_seg only). The boundary
    term follows CASNet's `use_boundary` (with the entry's override); baselines with DRGO keep it on."""
    section = entry_section(params, name)
    if not section["drgo"]:
        return None
    drgo = dataclasses.asdict(params.drgo)
    drgo["importance_weights"] = tuple(drgo["importance_weights"])
    return DRGOSettings(**drgo, use_boundary=bool(section.get("use_boundary", True)))


def resolve_entry(params: Params, dataset: str, name: str) -> Entry:
    """Entry `name` of params.yaml trained on `dataset`."""
    spec = params.spec(dataset)
    t, d = params.train, params.data
    recipe = Recipe(**{f.name: getattr(t, f.name) for f in dataclasses.fields(Recipe)})
    preprocess = {
        "image_size": d.image_size,
        "modality": spec.modality,
        "in_channels": spec.in_channels,
        "kind": spec.kind,
        "ct_window": list(d.ct_window),
        "clahe_clip": d.clahe_clip,
        "n4": d.n4,
    }
    return Entry(
        name=name,
        dataset=dataset,
        model=resolve_model(params, name, spec.modalities),
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        class_names=tuple(spec.class_names),
        image_size=d.image_size,
        drgo=drgo_settings(params, name),
        ce_weight=params.loss.ce_weight,
        recipe=recipe,
        augment=params.augment if t.augment else None,
        preprocess=preprocess,
        patch_size=d.patch_size if d.native else None,
        pretrained=entry_section(params, name).get("pretrained"),
        roi_loss=params.eval.roi_loss,
    )


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    from medfusion.data.io import file_sha256

    return file_sha256(path)


def resources(params: Params) -> Resources:
    return Resources(num_workers=params.train.num_workers, eval_batch_size=params.eval.batch_size)


def hashed_train_keys() -> list[str]:
    """The params keys of `train` that an entry's runs depend on: what dvc.yaml's train stages list."""
    return [f"train.{f.name}" for f in dataclasses.fields(Recipe)] + ["train.augment"]


def _flatten(obj: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
