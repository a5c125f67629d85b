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


class UNetEncoder(nn.Module):
    """Five `DoubleConv` stages of widths w, 2w, 4w, 8w, 16w with 2x2 max-pooling between them.

    Args:
        in_channels: input channels.
        base_channels: width w of the first stage.

    Shape:
        forward: (B, C_in, H, W) -> 5 feature maps, stage i of shape (B, w * 2**i, H / 2**i, W / 2**i).
    """

    def __init__(self, in_channels: int, base_channels: int) -> None:
        super().__init__()
        self.widths = [base_channels * 2**i for i in range(5)]
        self.stages = nn.ModuleList(
            DoubleConv(c_in, c_out)
            for c_in, c_out in zip([in_channels, *self.widths[:-1]], self.widths, strict=True)
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            features.append(x)
        return features
