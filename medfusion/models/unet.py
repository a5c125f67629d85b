"""U-Net with batch normalisation.

Reference:
    O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", MICCAI 2015. arXiv:1505.04597.

Deliberate changes from the paper: 'same' padding (output size = input size, no cropping of skips)
and BatchNorm after every convolution, as in most modern re-implementations; up-sampling is the
paper's 2x2 up-convolution (transposed convolution) halving the channels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medfusion.models.blocks import DoubleConv, UNetEncoder, check_input_size


class UNet(nn.Module):
    """U-Net: 5 encoder stages (widths w, 2w, 4w, 8w, 16w), 4 decoder stages with skip connections.

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: width w of the first stage (64 in the paper).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 64) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, base_channels)
        widths = self.encoder.widths
        self.ups = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in reversed(widths[:-1]))
        self.decoders = nn.ModuleList(DoubleConv(w * 2, w) for w in reversed(widths[:-1]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        skips = self.encoder(x)
        x = skips.pop()  # bottleneck (B, 16w, H/16, W/16)
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = up(x)  # (B, w_i, 2h, 2w)
            x = decoder(torch.cat([x, skips.pop()], dim=1))  # cat -> (B, 2 w_i, 2h, 2w)
        return self.head(x)
