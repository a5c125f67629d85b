"""ResNet backbone shared by DeepLabV3 and TransUNet, written from the paper (no pretrained weights).

Reference:
    K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    arXiv:1512.03385. Dilated stages as in DeepLab (Chen et al. 2017, arXiv:1706.05587).

Normalisation: batch norm (`norm="batch"`, He et al.) or, as in TransUNet's R50 (the BiT ResNet of
Kolesnikov et al. 2020, arXiv:1912.11370), group norm (32 groups, eps 1e-6; fewer groups where a
narrow width has fewer channels) after convolutions with weight standardisation (`norm="group"`).
Trained from scratch unless a model loads pretrained weights (medfusion/models/pretrained.py).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "group")

# depth -> (block type, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class StdConv2d(nn.Conv2d):
    """A convolution with weight standardisation: each filter is shifted to mean 0 and scaled to
    variance 1 (over its input channels and taps, eps 1e-5) before it is applied (Qiao et al. 2019;
    BiT and TransUNet's R50). Parameter names are Conv2d's."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (var + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with 32 groups (the greatest divisor of `channels` up to 32), eps 1e-6."""
    if norm not in NORMS:
        raise ValueError(f"normalisation {norm!r} is not one of {list(NORMS)}")
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def conv(
    c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, norm: str = "batch"
) -> nn.Conv2d:
    """A bias-free convolution ('same' padding for stride 1), weight-standardised under group norm."""
    cls = StdConv2d if norm == "group" else nn.Conv2d
    return cls(c_in, c_out, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False)


def conv_bn_relu(
    c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1, norm: str = "batch"
) -> nn.Sequential:
    """Conv(kernel, 'same' padding for stride 1)-Norm-ReLU (BN; or StdConv-GN with norm="group")."""
    return nn.Sequential(
        conv(c_in, c_out, kernel, stride, dilation, norm), norm_layer(norm, c_out), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(
        self, c_in: int, width: int, stride: int = 1, dilation: int = 1, norm: str = "batch"
    ) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(c_in, width, 3, stride, dilation, norm),
            conv(width, c_out, 3, 1, dilation, norm),
            norm_layer(norm, c_out),
        )
        self.shortcut = _shortcut(c_in, c_out, stride, norm)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand x4, with a shortcut; ResNet-50/101 (stride on the 3x3)."""

    expansion = 4

    def __init__(
        self, c_in: int, width: int, stride: int = 1, dilation: int = 1, norm: str = "batch"
    ) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(c_in, width, 1, norm=norm),
            conv_bn_relu(width, width, 3, stride, dilation, norm),
            conv(width, c_out, 1, norm=norm),
            norm_layer(norm, c_out),
        )
        self.shortcut = _shortcut(c_in, c_out, stride, norm)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int, norm: str = "batch") -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(conv(c_in, c_out, 1, stride, norm=norm), norm_layer(norm, c_out))


class ResNet(nn.Module):
    """ResNet feature extractor: 7x7/2 stem + 3x3/2 max-pool, then up to four residual stages.

    Args:
        in_channels: input channels.
        depth: 18, 34, 50 or 101.
        base_channels: stem width and first-stage width (64 in the paper); stage i has width 2**i * base.
        blocks: blocks per stage, overriding the depth's (TransUNet's R50 hybrid uses (3, 4, 9)).
        dilations: per stage, 1 for a normal stage or d > 1 to keep the resolution and dilate by d
            (DeepLabV3: output stride 16 = (1, 1, 1, 2), output stride 8 = (1, 1, 2, 4)).
        norm: "batch" (BN) or "group" (GN after weight-standardised convolutions, TransUNet's R50).

    Shape:
        forward: (B, C, H, W) -> [stem (B, base, H/2, W/2), stage 1 (H/4), stage 2, ...]; a stage's
        stride is 2 (1 for the first) unless its dilation is > 1.
    """

    def __init__(
        self,
        in_channels: int,
        depth: int = 50,
        base_channels: int = 64,
        blocks: tuple[int, ...] | None = None,
        dilations: tuple[int, ...] | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(DEPTHS)}")
        kind, default_blocks = DEPTHS[depth]
        blocks = tuple(blocks or default_blocks)
        dilations = tuple(dilations or (1,) * len(blocks))
        if len(dilations) != len(blocks):
            raise ValueError(f"dilations {dilations} must have one entry per stage ({len(blocks)})")
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.stem = conv_bn_relu(in_channels, base_channels, 7, stride=2, norm=norm)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = nn.ModuleList()
        self.out_channels = [base_channels]
        c_in = base_channels
        for i, (n, dilation) in enumerate(zip(blocks, dilations, strict=True)):
            width = base_channels * 2**i
            stride = 1 if i == 0 or dilation > 1 else 2
            first_dilation = (
                max(1, dilation // 2) if dilation > 1 else 1
            )  # DeepLab: dilate from the 2nd block
            layers = [block(c_in, width, stride, first_dilation, norm)]
            c_in = width * block.expansion
            layers += [block(c_in, width, 1, dilation, norm) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*layers))
            self.out_channels.append(c_in)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
