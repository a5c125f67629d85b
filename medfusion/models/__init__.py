"""The model registry: `MODELS` (name -> class) and `build_model()`, the only way models are made."""

from __future__ import annotations

from typing import Any

from torch import nn

from medfusion.models.attention_unet import AttentionUNet
from medfusion.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "attention_unet": AttentionUNet,
}


def build_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate registered model `name`.

    Raises:
        KeyError: for an unknown name, listing the registered ones.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
