"""The model registry: `MODELS` (name -> class) and `build_model()`, the only way models are made."""

from __future__ import annotations

from typing import Any

from torch import nn

from medfusion.models.attention_unet import AttentionUNet
from medfusion.models.casnet import CASNet
from medfusion.models.deeplabv3 import DeepLabV3
from medfusion.models.medt import MedT
from medfusion.models.segnet import SegNet
from medfusion.models.transunet import TransUNet
from medfusion.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "casnet": CASNet,
    "unet": UNet,
    "segnet": SegNet,
    "deeplabv3": DeepLabV3,
    "attention_unet": AttentionUNet,
    "transunet": TransUNet,
    "medt": MedT,
}


def build_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate registered model `name`.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


RESOLVED_COMPILE = ("off", "regions", "full")  # what train.compile resolves to (medfusion.hardware)
RECOMPILE_LIMIT = 64  # one graph per (region shape, train/eval); CASNet has 5 attention shapes


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The submodules `compile_model(..., "regions")` compiles: instances of the model class's
    `compile_regions` classes (CASNet: ContextualAttention; Attention U-Net: AttentionGate)."""
    kinds = tuple(getattr(type(model), "compile_regions", ()))
    return [m for m in model.modules() if kinds and isinstance(m, kinds)]


def compile_model(model: nn.Module, how: str, mode: str = "default") -> int:
    """torch.compile `model` in place (`train.compile` as resolve_compile resolved it); returns how many
    modules were compiled.

    * "off": nothing (eager).
    * "regions": only the model's element-wise hot spots (`compile_regions`), each with
      `nn.Module.compile(dynamic=False)`. On CPU these are memory-bound chains of pooling, sigmoid
      and broadcasting products that eager PyTorch runs as one pass (and one full-size temporary)
      per operation; inductor fuses each region into a few loops. Convolutions stay in oneDNN.
      CASNet's contextual attention on the full-resolution skip is the case this exists for
      (reports/benchmarks.md). A model with no regions (U-Net) is left eager.
    * "full": the whole model, `dynamic=False`.

    Compiling in place keeps the parameter names, so checkpoints are the same as an eager run's.
    Shapes are static (one graph per feature-map size and per train/eval mode); the recompile limit
    is raised to `RECOMPILE_LIMIT` so that the regions of one model do not exhaust it. The first
    step of each shape pays the compilation (about 20-50 s on a 2-core CPU for CASNet).
    """
    if how not in RESOLVED_COMPILE:
        raise ValueError(f"train.compile = {how!r}; expected one of {list(RESOLVED_COMPILE)}")
    if how == "off":
        return 0
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    targets = [model] if how == "full" else compile_regions(model)
    for module in targets:
        module.compile(dynamic=False, mode=mode)
    return len(targets)
