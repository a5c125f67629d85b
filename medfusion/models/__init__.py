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
