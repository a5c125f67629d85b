"""ResNet backbone shared by DeepLabV3 and TransUNet, written from the paper (no pretrained weights).

Reference:
    K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
    arXiv:1512.03385. Dilated stages as in DeepLab (Chen et al. 2017, arXiv:1706.05587).

No weights can be downloaded here, so every model built on it trains from scratch.
"""

from __future__ import annotations

from torch import Tensor, nn

# depth -> (block type, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv(kernel, 'same' padding for stride 1)-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(
            c_in, c_out, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(c_in, width, 3, stride, dilation),
            nn.Conv2d(width, c_out, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand x4, with a shortcut; ResNet-50/101 (stride on the 3x3)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(c_in, width, 1),
            conv_bn_relu(width, width, 3, stride, dilation),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """ResNet feature extractor: 7x7/2 stem + 3x3/2 max-pool, then up to four residual stages.

    Args:
        in_channels: input channels.
        depth: 18, 34, 50 or 101.
        base_channels: stem width and first-stage width (64 in the paper); stage i has width 2**i * base.
        blocks: blocks per stage, overriding the depth's (TransUNet's R50 hybrid uses (3, 4, 9)).
        dilations: per stage, 1 for a normal stage or d > 1 to keep the resolution and dilate by d
            (DeepLabV3: output stride 16 = (1, 1, 1, 2), output stride 8 = (1, 1, 2, 4)).

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
        self.stem = conv_bn_relu(in_channels, base_channels, 7, stride=2)
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
            layers = [block(c_in, width, stride, first_dilation)]
            c_in = width * block.expansion
            layers += [block(c_in, width, 1, dilation) for _ in range(n - 1)]
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
