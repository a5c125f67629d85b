"""DeepLabV3: a dilated ResNet and Atrous Spatial Pyramid Pooling with image-level features.

Reference:
    L.-C. Chen, G. Papandreou, F. Schroff, H. Adam, "Rethinking Atrous Convolution for Semantic Image
    Segmentation", arXiv:1706.05587, 2017.

As in the paper: ResNet backbone (depth 50 by default) whose last stages trade stride for dilation
(output stride 16: stage 4 dilated by 2, ASPP rates 6, 12, 18; output stride 8: stages 3 and 4 dilated
by 2 and 4, rates doubled); ASPP = one 1x1 and three 3x3 atrous convolutions plus global average
pooling, each with BN, concatenated and fused by a 1x1 convolution; logits are up-sampled bilinearly
to the input size. Deliberate changes: by default no ImageNet (or COCO) pre-training: the backbone
trains from scratch under the same protocol as every other model, which is the fair comparison but
lowers DeepLabV3's numbers against published ones; `deeplabv3.pretrained: PATH` starts the backbone
from a torchvision ResNet state dict instead (medfusion/models/pretrained.py; nothing is downloaded). No multi-grid unit rates
and no multi-scale inference. `base_channels` scales the backbone width (64 in the paper) and
`aspp_channels` the head (256 in the paper) so that CPU runs are feasible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.blocks import check_input_size
from medfusion.models.resnet import ResNet, conv_bn_relu

DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3, Fig. 5).

    Shape:
        forward: (B, C_in, h, w) -> (B, C_out, h, w)
    """

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels, 1))
        self.project = conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3(nn.Module):
    """DeepLabV3 with a ResNet backbone, trained from scratch.

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: ResNet stem/first-stage width (64 in the paper).
        depth: ResNet depth, 18, 34, 50 (the paper's default here) or 101.
        output_stride: 16 or 8.
        aspp_channels: ASPP and head width (256 in the paper).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        depth: int = 50,
        output_stride: int = 16,
        aspp_channels: int = 256,
    ) -> None:
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f"DeepLabV3 output_stride {output_stride} is not one of {sorted(DILATIONS)}")
        self.backbone = ResNet(in_channels, depth, base_channels, dilations=DILATIONS[output_stride])
        self.aspp = ASPP(self.backbone.out_channels[-1], aspp_channels, ASPP_RATES[output_stride])
        self.head = nn.Sequential(
            conv_bn_relu(aspp_channels, aspp_channels, 3), nn.Conv2d(aspp_channels, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        features = self.backbone(x)[-1]  # (B, C, H/os, W/os)
        logits = self.head(self.aspp(features))  # (B, K, H/os, W/os)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
