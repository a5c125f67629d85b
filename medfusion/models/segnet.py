"""SegNet: a VGG16 encoder and a decoder that up-samples with the encoder's max-pooling indices.

Reference:
    V. Badrinarayanan, A. Kendall, R. Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
    Architecture for Image Segmentation", IEEE TPAMI 39(12), 2017. arXiv:1511.00561.

As in the paper: the 13 convolutional layers of VGG16 (blocks of 2, 2, 3, 3, 3 Conv3x3-BN-ReLU,
widths 64, 128, 256, 512, 512), 2x2 max-pooling that records its indices; a mirrored decoder in which
each block first max-unpools with the indices of the matching encoder pool (sparse up-sampling, no
learned up-sampling and no skip of features), then convolves; a final 1x1 classifier. Deliberate
changes: `base_channels` scales the widths (64 = VGG16) for CPU runs; no ImageNet initialisation by
default (`segnet.pretrained: PATH` starts the encoder from a torchvision vgg16_bn state dict:
medfusion/models/pretrained.py). Unpooling is given the encoder's pre-pool size, so inputs need only be multiples of
16 (five poolings of a side 16k floor some sizes; the unpooling restores them exactly).
"""

from __future__ import annotations

from torch import Tensor, nn

from medfusion.models.blocks import check_input_size
from medfusion.models.resnet import conv_bn_relu

VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (1, 2, 4, 8, 8)  # x base_channels


class SegNet(nn.Module):
    """SegNet with a VGG16 encoder (13 convolutions) and an index-unpooling decoder.

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: width of the first block (64 in the paper).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 64) -> None:
        super().__init__()
        widths = [base_channels * m for m in VGG16_WIDTHS]
        self.encoders = nn.ModuleList()
        c_in = in_channels
        for n, width in zip(VGG16_BLOCKS, widths, strict=True):
            self.encoders.append(
                nn.Sequential(*[conv_bn_relu(c_in if i == 0 else width, width) for i in range(n)])
            )
            c_in = width
        # decoder block i mirrors encoder block i: n convs, the last one narrowing to the previous width
        self.decoders = nn.ModuleList()
        for i in reversed(range(len(widths))):
            width, n = widths[i], VGG16_BLOCKS[i]
            out = widths[i - 1] if i > 0 else widths[0]
            self.decoders.append(
                nn.Sequential(*[conv_bn_relu(width, width if j < n - 1 else out) for j in range(n)])
            )
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        memory = []
        for encoder in self.encoders:
            x = encoder(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            memory.append((indices, size))
        for decoder in self.decoders:
            indices, size = memory.pop()
            x = decoder(self.unpool(x, indices, output_size=size))
        return self.head(x)
