"""Frozen dataclasses that mirror params.yaml; `load_params(path) -> Params`.

params.yaml is read once, at the entry point, and every check happens here, before any work:
unknown or missing keys, wrong types, unknown dataset or model names and out-of-range values raise
`ConfigError` with the dotted key, what was found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfusion.common import UserError
from medfusion.data.registry import CUSTOM_MODALITIES, DATASET_NAMES, DATASETS, DatasetSpec, dataset_spec


class ConfigError(UserError, ValueError):
    """A params.yaml problem, with the key that caused it."""


@dataclass(frozen=True)
class SyntheticParams:
    """Generator settings of the `synthetic` (2-D) and `synthetic_volumes` (3-D) datasets."""

    num_images: int
    num_volumes: int
    slices_per_volume: int
    seed: int


PAPER_DATASETS = (
    "kvasir_seg",
    "promise12",
    "chase_db1",
    "lits17",
)  # the paper's four, as data.custom.paper_dataset names them


@dataclass(frozen=True)
class CustomDataParams:
    """The user's own dataset (`datasets: [custom]`, files under data.sources.custom)."""

    kind: str  # image | volume
    modality: str  # rgb | gray (2-D); ct | mri (volumes)
    class_names: list[str]  # index 0 is background; masks hold these indices (or 0/255 for 2 classes)
    group_pattern: (
        str | None
    )  # regex with one group: the patient id in a file stem; null = one file, one patient
    title: str
    # the paper dataset this data stands in for (claims.md puts it beside that number); optional: a
    # params file without it reads as null
    paper_dataset: str | None = dataclasses.field(default=None, metadata={"optional": True})
    # grey masks (lossy exports: 0/255 plus a few values between) binarised at > threshold; null: a
    # mask that holds neither class indices nor {0, 255} is refused. Optional, as paper_dataset
    mask_threshold: int | None = dataclasses.field(default=None, metadata={"optional": True})
    # image files per case (nnU-Net's raw layout: <case>_0000, <case>_0001, ..., one per channel of
    # dataset.json's channel_names); each file is one grey image or one volume. Optional: 1
    channels: int = dataclasses.field(default=1, metadata={"optional": True})


@dataclass(frozen=True)
class DataParams:
    """`image_size`: the side S every 2-D image or slice is resized to (the paper: 256), or "native":
    2-D images keep their size (padded to a multiple of 16), the model trains on random
    `patch_size` x `patch_size` patches and predicts by sliding window (an option beyond the paper)."""

    image_size: int | typing.Literal["native"]
    sources: dict[str, str | None]
    synthetic: SyntheticParams
    n4: bool  # N4 bias-field correction of MRI (SimpleITK)
    ct_window: list[float]  # Hounsfield window [low, high] for CT
    clahe_clip: float  # CLAHE clip limit for grayscale images and slices (8x8 tiles)
    workers: int  # preprocessing processes
    # the `custom` dataset's description, or several named ones ({my_clinic: {...}, other: {...}}: each
    # name is a dataset of its own, listed in `datasets` and read from data.sources.<name>)
    custom: CustomDataParams | dict[str, CustomDataParams]
    patch_size: int | None = None  # with image_size: native, the side of the training patches and windows
    max_image_pixels: int | None = None  # 2-D files with more pixels are refused (null: Pillow's 89,478,485)

    @property
    def native(self) -> bool:
        return self.image_size == "native"

    @property
    def model_size(self) -> int:
        """The side of the model's input: image_size, or patch_size for native images."""
        return int(self.patch_size if self.native else self.image_size)


@dataclass(frozen=True)
class ModelsParams:
    """Which models the pipeline trains: `casnet` (CASNet and its ablation variants, each a key of
    `ablations`) and `baselines` (registry names). Two lists because their DVC stages depend on
    different params sections: CASNet entries on `model` (+ their override), a baseline on its own."""

    casnet: list[str]
    baselines: list[str]


Fail = typing.Callable[[str, Any, str], None]  # (dotted key, value found, what is expected) -> raises


@dataclass(frozen=True)
class ModelSection:
    """A model's params section: its constructor's keyword arguments plus `drgo` (train it with DRGO).

    A baseline's section is named as its registry entry (`unet`, ...); CASNet's is `model`. The
    fields of a subclass are the section's keys; `TINY` holds the overrides that make the model
    tiny (the quickstart and the tests train it at these widths: a quarter of the paper's width,
    so CASNet 8 and the 64-wide baselines 16; MedT 16, half its 32, because base_channels / 2 must
    divide by 2 x heads, with the two-stage `blocks: [1, 2]` so that small inputs fit); `check` validates the values (every integer >= 1 unless a subclass says more).
    """

    TINY: typing.ClassVar[dict[str, Any]] = {}

    def check(self, key: str, fail: Fail) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                fail(f"{key}.{f.name}", value, "an integer >= 1")


@dataclass(frozen=True)
class CASNetParams(ModelSection):
    """CASNet's settings (METHOD.md section 1), the `model` section; ablation variants override keys.
    `use_boundary` and `drgo` are settings of the loss, the others of the network."""

    base_channels: int
    use_hfe: bool
    use_attention: bool
    use_msf: bool
    use_transformer: bool
    use_boundary: bool
    atrous_rates: list[int]
    transformer_dim: int
    transformer_layers: int
    transformer_scales: list[int]
    modalities: int | None
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {
        "base_channels": 8,
        "transformer_dim": 32,
        "transformer_layers": 1,
    }

    def check(self, key: str, fail: Fail) -> None:
        if self.modalities is not None and self.modalities < 1:
            fail(f"{key}.modalities", self.modalities, "null (from the dataset) or an integer >= 1")
        super().check(key, fail)
        if self.transformer_dim % 8:
            fail(f"{key}.transformer_dim", self.transformer_dim, "a multiple of 8 (8 attention heads)")
        if not self.atrous_rates or min(self.atrous_rates) < 1:
            fail(f"{key}.atrous_rates", self.atrous_rates, "a non-empty list of integers >= 1")
        if not self.transformer_scales or not set(self.transformer_scales) <= {8, 16}:
            fail(f"{key}.transformer_scales", self.transformer_scales, "a non-empty subset of [8, 16]")


@dataclass(frozen=True)
class UNetParams(ModelSection):
    base_channels: int
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {"base_channels": 16}


@dataclass(frozen=True)
class SegNetParams(ModelSection):
    base_channels: int
    pretrained: str | None  # a torchvision vgg16_bn state dict (medfusion/models/pretrained.py)
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {"base_channels": 16}


@dataclass(frozen=True)
class DeepLabV3Params(ModelSection):
    base_channels: int
    depth: int
    output_stride: int
    aspp_channels: int
    pretrained: str | None  # a torchvision ResNet state dict of this depth (medfusion/models/pretrained.py)
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {"base_channels": 16, "depth": 18, "aspp_channels": 32}

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        if self.depth not in (18, 34, 50, 101):
            fail(f"{key}.depth", self.depth, "one of [18, 34, 50, 101]")
        if self.output_stride not in (8, 16):
            fail(f"{key}.output_stride", self.output_stride, "8 or 16")


@dataclass(frozen=True)
class AttentionUNetParams(ModelSection):
    base_channels: int
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {"base_channels": 16}


@dataclass(frozen=True)
class TransUNetParams(ModelSection):
    base_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    decoder_scale: float
    norm: str  # the R50's: group (GN + weight standardisation, the paper's) | batch
    pretrained: str | None  # timm's R50 + ViT-B/16 hybrid state dict (medfusion/models/pretrained.py)
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {
        "base_channels": 16,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "mlp_dim": 128,
        "decoder_scale": 0.25,
    }

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        if self.hidden_size % self.num_heads:
            fail(f"{key}.hidden_size", self.hidden_size, f"a multiple of {key}.num_heads ({self.num_heads})")
        if not self.decoder_scale > 0:
            fail(f"{key}.decoder_scale", self.decoder_scale, "a number > 0")
        if self.norm not in ("group", "batch"):
            fail(f"{key}.norm", self.norm, "group (the paper's GN + weight standardisation) or batch")


@dataclass(frozen=True)
class MedTParams(ModelSection):
    base_channels: int
    heads: int
    local_grid: int
    blocks: list[int]
    drgo: bool

    TINY: typing.ClassVar[dict[str, Any]] = {"base_channels": 16, "heads": 4, "blocks": [1, 2]}

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        if len(self.blocks) < 2 or min(self.blocks) < 1:
            fail(f"{key}.blocks", self.blocks, "a list of at least two integers >= 1 (blocks per stage)")
        if self.base_channels % 4 or (self.base_channels // 2) % (2 * self.heads):
            fail(
                f"{key}.base_channels",
                self.base_channels,
                f"a multiple of 4 with base_channels / 2 divisible by 2 x {key}.heads ({self.heads})",
            )


@dataclass(frozen=True)
class DRGOParams:
    """DRGO (METHOD.md section 2) for the entries whose section says `drgo: true`."""

    use_sampling: bool
    use_adaptive: bool
    alpha: float
    beta: float
    delta: float
    smooth_weight: float
    gamma0: float
    confidence_momentum: float
    region_size: int
    regions_per_image: int
    tau: float
    eps: float
    importance_weights: list[float]


@dataclass(frozen=True)
class TrainParams:
    """The `train` section. `device`, `cpu_bf16`, `channels_last` and `compile` take `auto`, resolved on
    the machine that trains (medfusion/hardware.py). `num_workers` is a resource: it cannot change a
    result (augmentation is a function of seed, epoch and sample), so no run's hash and no train
    stage's params hold it (`RESOURCE_KEYS`)."""

    device: str
    cpu_bf16: bool | typing.Literal["auto"]
    channels_last: bool | typing.Literal["auto"]
    optimizer: str
    scheduler: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    augment: bool
    num_workers: int
    compile: str = "auto"  # auto | off | regions | full: medfusion.hardware.resolve_compile


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation, the `augment` section (on when `train.augment`); medfusion/data/augment.py
    says what each key does and why its default is what it is. Probabilities are per sample, except
    `mixup_p` (per batch). The defaults equal params.yaml's and serve callers without params
    (`SegDataset(augment=True)` in tests and benchmarks); the pipeline always reads params.yaml."""

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rotate_p: float = 0.5
    rotate_limit: float = 30.0  # degrees, uniform in [-limit, limit]
    scale_p: float = 0.5
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.8, 1.2])
    elastic_p: float = 0.2
    elastic_alpha: float = 200.0  # pixels at data.image_size
    elastic_sigma: float = 10.0  # pixels
    brightness_contrast_p: float = 0.3
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    gamma_p: float = 0.3
    gamma_range: list[float] = dataclasses.field(default_factory=lambda: [0.8, 1.25])
    noise_p: float = 0.2
    noise_std_range: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.05])  # of 255
    mixup_p: float = 0.2
    mixup_alpha: float = 0.4
    cutmix_p: float = 0.2
    cutmix_area_range: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.3])


@dataclass(frozen=True)
class LossParams:
    ce_weight: float


@dataclass(frozen=True)
class CVParams:
    n_folds: int
    seeds: list[int]
    split_seed: int
    test_fraction: float


@dataclass(frozen=True)
class EvalParams:
    """`batch_size`: images per forward pass in validation and evaluation, a memory knob (a resource:
    every loss and metric is a mean over samples, so it cannot change a result).
    `resolution`: where test cases are scored. "original" (the field's way, the default): each case's
    probabilities are resampled to its original geometry and scored against the original ground truth
    from data/raw (HD95/ASSD in mm where the spacing is known); "processed": at data.image_size against
    the resized masks, as the models see them."""

    batch_size: int
    resolution: typing.Literal["original", "processed"] = "original"
    # cross-dataset evaluation without retraining: {training dataset: [target datasets]}, stage
    # transfer@<training dataset> (medfusion/transfer.py). Optional: a params file without it reads as {}
    transfer: dict[str, list[str]] = dataclasses.field(default_factory=dict, metadata={"optional": True})
    # train inside the field of view too (medfusion.training.loop.inside_roi); metrics always are.
    # Optional: a params file without it reads as false
    roi_loss: bool = dataclasses.field(default=False, metadata={"optional": True})
    # "flip": the fold ensemble is also scored with flip test-time augmentation, as its own row
    # (run "ensemble_tta"; medfusion.evaluation.evaluate_model). Optional: absent reads as "none"
    tta: typing.Literal["none", "flip"] = dataclasses.field(default="none", metadata={"optional": True})


# Settings that cannot change a result: no run's hash and no train stage's params hold them, so
# changing one (the out-of-memory advice `-S eval.batch_size=8`, more loader workers, another
# executor) retrains nothing. tests/test_resources.py checks both.
RESOURCE_KEYS = ("train.num_workers", "eval.batch_size", "executor")


# The paper's protocol (METHOD.md section 3), as params.yaml's defaults hold it (tests/test_config.py
# checks that they do): what each run's MLflow note compares its settings with (`protocol_note`)
PAPER_PROTOCOL = {
    "data.image_size": 256,
    "train.optimizer": "adam",
    "train.lr": 1e-4,
    "train.scheduler": "cosine",
    "train.batch_size": 16,
    "train.epochs": 100,
    "train.patience": 10,
    "train.augment": True,
    "cv.n_folds": 5,
    "cv.seeds": [0, 1, 2],
    "eval.resolution": "original",
}


def protocol_differences(params: Params) -> dict[str, tuple[Any, Any]]:
    """{key: (this value, the paper's)} for each PAPER_PROTOCOL key `params` sets otherwise."""
    out = {}
    for key, paper in PAPER_PROTOCOL.items():
        section, name = key.split(".")
        value = getattr(getattr(params, section), name)
        if value != paper:
            out[key] = (value, paper)
    return out


def protocol_note(params: Params) -> str:
    """A run's MLflow note: which settings differ from the paper protocol, or that none does."""
    differ = protocol_differences(params)
    if not differ:
        return "The paper protocol (METHOD.md section 3): no setting differs from it."
    items = "; ".join(f"{k} = {v!r} (paper: {paper!r})" for k, (v, paper) in differ.items())
    return f"Differs from the paper protocol (METHOD.md section 3) in: {items}."


@dataclass(frozen=True)
class MLflowParams:
    tracking_uri: str | None
    experiment_prefix: str


@dataclass(frozen=True)
class SlurmParams:
    """One array task per (fold, seed) run, each on one node. The names are submitit's
    (AutoExecutor's generic ones, `partition`/`account`/`array_parallelism`/`setup` its slurm_ ones)."""

    partition: str | None = None  # null: the cluster's default partition
    account: str | None = None  # null: the user's default account
    gpus_per_node: int = 1  # GPUs of each run
    cpus_per_task: int = 8  # CPUs of each run (DataLoader workers + the main process)
    mem_gb: float = 32.0
    timeout_min: int = 1440  # wall-clock limit of each run
    array_parallelism: int = 16  # runs of one train stage on the cluster at a time
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before each run
    max_requeues: int = 3  # a run at its time limit is requeued (resuming from last.pt) this many times


@dataclass(frozen=True)
class ExecutorParams:
    """How the train stage runs its (fold, seed) runs: medfusion/training/executor.py. Not part of any
    run's hash: where a run was trained does not change what it depends on."""

    kind: str = "local"  # local | slurm
    processes: int = 1  # local: 1 = serially in this process; N > 1 = N at a time; 0 = one per visible GPU
    folder: str = "logs/submitit"  # submitit's job pickles and each job's stdout/stderr (relative: repo root)
    slurm: SlurmParams = dataclasses.field(default_factory=SlurmParams)


@dataclass(frozen=True)
class Params:
    datasets: list[str]
    models: ModelsParams
    ablations: dict[str, dict[str, Any]]
    data: DataParams
    model: CASNetParams
    unet: UNetParams
    segnet: SegNetParams
    deeplabv3: DeepLabV3Params
    attention_unet: AttentionUNetParams
    transunet: TransUNetParams
    medt: MedTParams
    drgo: DRGOParams
    train: TrainParams
    augment: AugmentParams
    loss: LossParams
    cv: CVParams
    eval: EvalParams
    mlflow: MLflowParams
    executor: ExecutorParams = dataclasses.field(default_factory=ExecutorParams)

    @property
    def model_names(self) -> list[str]:
        """Every model entry the pipeline runs: CASNet and its ablations first, then the baselines."""
        return [*self.models.casnet, *self.models.baselines]

    @property
    def custom_datasets(self) -> dict[str, CustomDataParams]:
        """The user's datasets by name: {"custom": data.custom} for one description, else data.custom's
        named entries."""
        c = self.data.custom
        return {"custom": c} if isinstance(c, CustomDataParams) else dict(c)

    def custom_description(self, dataset: str) -> dict | None:
        """data.custom's description of `dataset` as a dict (None for a dataset of the registry)."""
        c = self.custom_datasets.get(dataset)
        return None if c is None else dataclasses.asdict(c)

    def custom_key(self, dataset: str) -> str:
        """Where `dataset`'s description is in params.yaml: data.custom or data.custom.<name>."""
        return "data.custom" if isinstance(self.data.custom, CustomDataParams) else f"data.custom.{dataset}"

    def spec(self, dataset: str) -> DatasetSpec:
        """The DatasetSpec of `dataset`; the user's own are defined by data.custom."""
        return dataset_spec(dataset, self.custom_description(dataset))


def model_sections() -> dict[str, type[ModelSection]]:
    """Params' model sections by key: `model` (CASNet) and one per baseline, named as its registry entry."""
    hints = typing.get_type_hints(Params)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Params)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], ModelSection)
    }


def baseline_names() -> list[str]:
    """The baselines params.yaml can name: every model section but CASNet's."""
    return sorted(set(model_sections()) - {"model"})


LOSS_KEYS = ("use_boundary", "drgo")  # settings of the loss, not constructor arguments
TRAINING_KEYS = (*LOSS_KEYS, "pretrained")  # nor is the file the encoder starts from
DEVICES = ("auto", "cpu", "cuda")
COMPILE_CHOICES = ("auto", "off", "regions", "full")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("cosine", "constant")
EXECUTOR_KINDS = ("local", "slurm")


def parse_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads params.yaml (ruamel.yaml): `off`, `on`, `yes` and `no` are strings, only
    `true`/`false` are booleans. PyYAML's YAML 1.1 would read the bare `compile: off` that
    `dvc exp run -S train.compile=off` writes as false, and so disagree with DVC about a param."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def read_yaml(path: str | Path) -> Any:
    """parse_yaml of a file; an unreadable or malformed file raises ConfigError naming it."""
    from ruamel.yaml import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        return parse_yaml(path.read_text())
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read (YAML 1.2, as DVC does) and validate params.yaml.

    Raises:
        ConfigError: naming the dotted key, the value found and what was expected.
    """
    return params_from_dict(read_yaml(path), source=str(path))


def params_from_dict(raw: Any, source: str = "params") -> Params:
    params = _build(Params, raw, prefix="", source=source)
    _check_values(params, source)
    return params


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {[prefix + k for k in unknown]}; allowed in {where}: {names}"
        )
    optional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("optional")}  # may be left out
    missing = [n for n in names if n not in raw and n not in optional]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {[prefix + k for k in missing]} in {where}")
    return cls(**{n: _coerce(hints[n], raw[n], prefix + n, source) for n in names if n in raw})


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, key, source)
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        mappings = [o for o in options if typing.get_origin(o) is dict]
        if sections and mappings and isinstance(value, dict):
            # `Section | dict[str, Section]`: a mapping with the section's keys is one, else named ones
            # (each option's own errors, naming the key, rather than a vague "expected either")
            is_section = bool({f.name for f in dataclasses.fields(sections[0])} & set(value))
            return _coerce(sections[0] if is_section else mappings[0], value, key, source)
        for option in options:  # `bool | Literal["auto"]`: the first that fits
            try:
                return _coerce(option, value, key, source)
            except ConfigError:
                pass
        raise ConfigError(
            f"{source}: {key}: expected {' or '.join(_describe(o) for o in options)}, "
            f"got {type(value).__name__} {value!r}"
        )
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(
                f"{source}: {key}: expected {_describe(tp)}, got {type(value).__name__} {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _describe(tp: Any) -> str:
    """A type as the error messages name it: bool, int, 'auto'."""
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_data(p: Params, fail: Fail) -> None:
    d = p.data
    if len(d.ct_window) != 2 or d.ct_window[0] >= d.ct_window[1]:
        fail("data.ct_window", d.ct_window, "[low, high] in Hounsfield units with low < high")
    if d.clahe_clip <= 0:
        fail("data.clahe_clip", d.clahe_clip, "a positive clip limit (2.0 is usual)")
    if d.workers < 0:
        fail("data.workers", d.workers, "an integer >= 0 (0 = one per CPU core)")
    for name, c in p.custom_datasets.items():
        key = p.custom_key(name)
        if name != "custom" and (
            not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in (*DATASETS, "transfer")
        ):
            fail(
                key,
                name,
                f"a new lower-case name (letters, digits, _), not one of the registry's {sorted(DATASETS)}",
            )
        _check_custom(c, key, fail)
        if name in p.datasets and not d.sources.get(name):
            fail(
                f"data.sources.{name}",
                d.sources.get(name),
                f"the folder of your data (images/ + masks/, or an nnU-Net raw dataset) because `datasets` includes {name}",
            )


def _check_custom(c: CustomDataParams, key: str, fail: Fail) -> None:
    """One description of the user's data (data.custom, or data.custom.<name> as `key`)."""
    if c.kind not in ("image", "volume"):
        fail(f"{key}.kind", c.kind, "image (2-D files) or volume (NIfTI)")
    allowed = ("rgb", "gray") if c.kind == "image" else ("ct", "mri")
    if c.modality not in allowed:
        fail(f"{key}.modality", c.modality, f"one of {list(allowed)} for kind {c.kind}")
    assert set(allowed) <= set(CUSTOM_MODALITIES)
    if len(c.class_names) < 2 or len(set(c.class_names)) != len(c.class_names):
        fail(f"{key}.class_names", c.class_names, "at least 2 distinct names, background first")
    if c.group_pattern is not None:
        try:
            groups = re.compile(c.group_pattern).groups
        except re.error as err:
            fail(f"{key}.group_pattern", c.group_pattern, f"a regular expression ({err})")
        if groups != 1:
            fail(
                f"{key}.group_pattern",
                c.group_pattern,
                "a regex with exactly one (group): the patient id",
            )
    if c.paper_dataset is not None and c.paper_dataset not in PAPER_DATASETS:
        fail(f"{key}.paper_dataset", c.paper_dataset, f"null or one of {list(PAPER_DATASETS)}")
    if isinstance(c.channels, bool) or not isinstance(c.channels, int) or c.channels < 1:
        fail(
            f"{key}.channels",
            c.channels,
            "an integer >= 1: image files per case (nnU-Net's _0000, _0001, ...)",
        )
    if c.channels > 1 and c.modality == "rgb":
        fail(
            f"{key}.modality",
            c.modality,
            f"gray with {key}.channels = {c.channels}: each channel file is one grey image",
        )
    if c.mask_threshold is not None:
        if isinstance(c.mask_threshold, bool) or not 0 <= c.mask_threshold <= 254:
            fail(f"{key}.mask_threshold", c.mask_threshold, "null or an integer grey value 0..254")
        if c.kind != "image" or len(c.class_names) != 2:
            fail(
                f"{key}.mask_threshold",
                c.mask_threshold,
                "null: a threshold binarises 2-D masks of a 2-class dataset (kind image, two class_names)",
            )


def _check_values(p: Params, source: str) -> None:
    def fail(key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{source}: {key} = {value!r}; expected {expected}")

    _check_names(p, source, fail)
    _check_data(p, fail)
    if p.data.native:
        patch = p.data.patch_size
        if patch is None or patch < 16 or patch % 16:
            fail("data.patch_size", patch, "a multiple of 16, at least 16, with data.image_size: native")
        volumes = [d for d in p.datasets if p.spec(d).kind == "volume"]
        if volumes:
            fail(
                "data.image_size",
                "native",
                f"a number (e.g. 256) for volume datasets {volumes}: native resolution is for 2-D images",
            )
    else:
        if p.data.image_size < 16 or p.data.image_size % 16:
            fail("data.image_size", p.data.image_size, "a multiple of 16, at least 16, or native")
        if p.data.patch_size is not None:
            fail("data.patch_size", p.data.patch_size, "null unless data.image_size is native")
    if p.data.max_image_pixels is not None and p.data.max_image_pixels < 1:
        fail("data.max_image_pixels", p.data.max_image_pixels, "null or a number of pixels >= 1")
    synthetic = p.data.synthetic
    for key in ("num_images", "num_volumes", "slices_per_volume"):
        if getattr(synthetic, key) < 1:
            fail(f"data.synthetic.{key}", getattr(synthetic, key), "an integer >= 1")
    if synthetic.num_images < 10 or synthetic.num_volumes < 4:
        fail("data.synthetic", synthetic, "num_images >= 10 and num_volumes >= 4 (room for folds)")
    for key in model_sections():
        getattr(p, key).check(key, fail)
    if "medt" in p.models.baselines:  # MedT's local branch halves each patch once per stage after the first
        medt = p.medt
        multiple = 2 * medt.local_grid * 2 ** (len(medt.blocks) - 1)
        if p.data.model_size % multiple:
            size_key = "data.patch_size" if p.data.native else "data.image_size"
            fail(size_key, p.data.model_size, f"a multiple of {multiple} for medt (2 x medt.local_grid x "
                 f"2^(stages - 1), medt.blocks {medt.blocks}), or fewer medt.blocks")  # fmt: skip
    _check_drgo(p.drgo, p.data.model_size, fail)
    _check_transfer(p, fail)
    _check_train(p, fail)
    _check_augment(p.augment, fail)
    _check_executor(p.executor, fail)


def _check_transfer(p: Params, fail: Fail) -> None:
    """eval.transfer: trained datasets of `datasets` as keys, other known datasets as targets."""
    known = sorted({*DATASETS, *p.custom_datasets})
    for trained, targets in p.eval.transfer.items():
        if trained not in p.datasets:
            fail(
                f"eval.transfer.{trained}",
                targets,
                f"a key that is one of `datasets` {p.datasets} (the models trained on it)",
            )
        for target in targets:
            if target not in known or target == trained:
                fail(
                    f"eval.transfer.{trained}",
                    targets,
                    f"targets other than {trained!r}, each one of {known}",
                )
            if target not in p.datasets and target in p.custom_datasets and not p.data.sources.get(target):
                fail(f"data.sources.{target}", None, f"the folder of transfer target {target!r}")


def _check_names(p: Params, source: str, fail: Fail) -> None:
    """Dataset, model and ablation names, and the ablations' overrides."""
    known = sorted({*DATASETS, *p.custom_datasets})  # the registry's and the user's (data.custom)
    for i, name in enumerate(p.datasets):
        if name not in known:
            fail(f"datasets[{i}]", name, f"one of {known}")
    baselines = baseline_names()
    for i, name in enumerate(p.models.baselines):
        if name not in baselines:
            fail(f"models.baselines[{i}]", name, f"one of {baselines}")
    for i, name in enumerate(p.models.casnet):
        if name not in p.ablations:
            fail(f"models.casnet[{i}]", name, f"a key of `ablations` ({sorted(p.ablations)})")
    hints = typing.get_type_hints(CASNetParams)
    for name, override in p.ablations.items():
        if name in baselines:
            fail(f"ablations.{name}", name, "a name that is not a baseline's")
        if not isinstance(override, dict):
            fail(f"ablations.{name}", override, "a mapping of `model` keys to values, e.g. {use_hfe: false}")
        for key, value in override.items():
            if key not in hints:
                fail(f"ablations.{name}.{key}", value, f"a key of `model`: {sorted(hints)}")
            _coerce(hints[key], value, f"ablations.{name}.{key}", source)
    for key, values in (("datasets", p.datasets), ("models", p.model_names)):
        if not values:
            fail(key, values, "a non-empty list")
        if len(set(values)) != len(values):
            fail(key, values, "no duplicates")
    for name in p.data.sources:
        if name not in {*DATASET_NAMES, *p.custom_datasets}:
            fail(
                f"data.sources.{name}",
                name,
                f"a dataset name, one of {sorted({*DATASET_NAMES, *p.custom_datasets})}",
            )


def _check_drgo(d: DRGOParams, image_size: int, fail: Fail) -> None:
    for key in ("alpha", "beta", "delta", "smooth_weight", "gamma0"):
        if getattr(d, key) < 0:
            fail(f"drgo.{key}", getattr(d, key), "a number >= 0")
    if not 0 <= d.confidence_momentum < 1:
        fail("drgo.confidence_momentum", d.confidence_momentum, "a number in [0, 1)")
    if not 0 <= d.eps <= 1:
        fail("drgo.eps", d.eps, "a number in [0, 1]")
    if not d.tau > 0:
        fail("drgo.tau", d.tau, "a number > 0")
    if d.region_size < 1 or image_size % d.region_size:
        fail("drgo.region_size", d.region_size, f"a divisor of the model's input size ({image_size})")
    if d.regions_per_image < 1:
        fail("drgo.regions_per_image", d.regions_per_image, "an integer >= 1")
    if len(d.importance_weights) != 3 or min(d.importance_weights) < 0 or not sum(d.importance_weights) > 0:
        fail(
            "drgo.importance_weights",
            d.importance_weights,
            "3 numbers >= 0 (frequency, boundary, entropy), not all 0",
        )


def _check_train(p: Params, fail: Fail) -> None:
    """The train, loss, eval and cv sections."""
    t = p.train
    for key in ("epochs", "batch_size", "patience"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", getattr(t, key), "an integer >= 1")
    if p.eval.batch_size < 1:
        fail("eval.batch_size", p.eval.batch_size, "an integer >= 1")
    if not t.lr > 0:
        fail("train.lr", t.lr, "a number > 0")
    if t.weight_decay < 0 or p.loss.ce_weight < 0:
        fail("train.weight_decay / loss.ce_weight", (t.weight_decay, p.loss.ce_weight), ">= 0")
    if t.num_workers < 0:
        fail("train.num_workers", t.num_workers, "an integer >= 0")
    for key, value, allowed in (
        ("train.device", t.device, DEVICES),
        ("train.optimizer", t.optimizer, OPTIMIZERS),
        ("train.scheduler", t.scheduler, SCHEDULERS),
        ("train.compile", t.compile, COMPILE_CHOICES),
    ):
        if value not in allowed:
            fail(key, value, f"one of {list(allowed)}")
    if p.cv.n_folds < 2:
        fail("cv.n_folds", p.cv.n_folds, "an integer >= 2")
    if not p.cv.seeds or len(set(p.cv.seeds)) != len(p.cv.seeds):
        fail("cv.seeds", p.cv.seeds, "a non-empty list of distinct integers")
    if not 0 < p.cv.test_fraction < 1:
        fail("cv.test_fraction", p.cv.test_fraction, "a number strictly between 0 and 1")


def _check_augment(a: AugmentParams, fail: Fail) -> None:
    for field in dataclasses.fields(a):
        if field.name.endswith("_p") and not 0 <= getattr(a, field.name) <= 1:
            fail(f"augment.{field.name}", getattr(a, field.name), "a probability in [0, 1]")
    ranges = {  # key: (low end must be > 0, high end at most)
        "scale_range": (True, float("inf")),
        "gamma_range": (True, float("inf")),
        "noise_std_range": (False, 1.0),
        "cutmix_area_range": (True, 1.0),
    }
    for key, (positive, most) in ranges.items():
        value = getattr(a, key)
        if len(value) != 2 or not (0 <= value[0] <= value[1] <= most) or (positive and value[0] == 0):
            fail(f"augment.{key}", value, f"[low, high], 0 {'<' if positive else '<='} low <= high <= {most}")
    if not 0 <= a.rotate_limit <= 180:
        fail("augment.rotate_limit", a.rotate_limit, "degrees in [0, 180]")
    if a.elastic_alpha < 0:
        fail("augment.elastic_alpha", a.elastic_alpha, "a number >= 0 (pixels)")
    if not a.elastic_sigma > 0:
        fail("augment.elastic_sigma", a.elastic_sigma, "a number > 0 (pixels)")
    for key in ("brightness_limit", "contrast_limit"):
        if not 0 <= getattr(a, key) <= 1:
            fail(f"augment.{key}", getattr(a, key), "a number in [0, 1]")
    if not a.mixup_alpha > 0:
        fail("augment.mixup_alpha", a.mixup_alpha, "a number > 0 (the Beta distribution's parameter)")


def _check_executor(e: ExecutorParams, fail: Fail) -> None:
    """Checked before any work: a bad slurm setting must not surface only after the first folds trained."""
    if e.kind not in EXECUTOR_KINDS:
        fail("executor.kind", e.kind, "local (this machine) or slurm (a submitit job array)")
    if e.processes < 0:
        fail(
            "executor.processes",
            e.processes,
            "an integer >= 0 (1 = serially in this process, N = N runs at a time, 0 = one per visible GPU)",
        )
    if not e.folder.strip():
        fail("executor.folder", e.folder, "a folder for submitit's job files and logs, e.g. logs/submitit")
    s = e.slurm
    if s.partition is not None and not s.partition.strip():
        fail("executor.slurm.partition", s.partition, "a partition name, or null for the cluster's default")
    if s.account is not None and not s.account.strip():
        fail("executor.slurm.account", s.account, "an account name, or null for your default account")
    if s.gpus_per_node < 0:
        fail("executor.slurm.gpus_per_node", s.gpus_per_node, "an integer >= 0 (GPUs of each run)")
    for key in ("cpus_per_task", "timeout_min", "array_parallelism"):
        if getattr(s, key) < 1:
            fail(f"executor.slurm.{key}", getattr(s, key), "an integer >= 1")
    if s.max_requeues < 0:
        fail(
            "executor.slurm.max_requeues",
            s.max_requeues,
            "an integer >= 0 (times a run that reaches timeout_min is requeued to continue)",
        )
    if not s.mem_gb > 0:
        fail("executor.slurm.mem_gb", s.mem_gb, "a number > 0 (GB of memory of each run)")


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (dataclasses allowed)."""
    blob = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
