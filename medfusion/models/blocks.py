"""Blocks shared by two or more models."""

from __future__ import annotations

from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    """[Conv3x3-BN-ReLU] x 2, the unit of U-Net-style encoders and decoders.

    Args:
        in_channels: input channels.
        out_channels: output channels of both convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def check_input_size(x: Tensor, multiple: int = 16) -> None:
    """Raise a clear error when H or W is not a multiple of `multiple` (the encoders downsample 4x by 2)."""
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"input size {h}x{w} is not a multiple of {multiple}; resize or pad the input (data.image_size)"
        )
