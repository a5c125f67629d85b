"""TransUNet: a ResNet-50 + ViT hybrid encoder and a cascaded up-sampler with skip connections.

Reference:
    J. Chen, Y. Lu, Q. Yu, X. Luo, E. Adeli, Y. Wang, L. Lu, A. L. Yuille, Y. Zhou, "TransUNet:
    Transformers Make Strong Encoders for Medical Image Segmentation", arXiv:2102.04306, 2021.

As in the paper (R50-ViT-B/16): the CNN part is ResNet-50's stem and first three stages (3, 4, 9
bottleneck blocks), giving skips at 1/2, 1/4 and 1/8 and a 1/16 feature map; that map is embedded as
1x1 patches (so each token covers 16x16 input pixels), a learnable position embedding is added, and
12 pre-norm transformer layers of width 768 (12 heads, MLP 3072) encode it; the tokens are reshaped
to the 1/16 grid, a 3x3 convolution maps them to 512 channels, and the cascaded up-sampler (CUP)
applies four blocks of [bilinear x2, concatenation with the skip, two Conv3x3-BN-ReLU] with widths
256, 128, 64, 16, the last without a skip, then a 3x3 segmentation head. The R50 has the paper's
group norm after weight-standardised convolutions (`norm="group"`, the default; `norm="batch"` for
BN as earlier versions of this model had); the decoder has BN, as in the authors' code. Deliberate
changes: no ImageNet-21k pre-training by default (nothing is downloaded here; `transunet.pretrained`
starts the encoder from timm's R50 + ViT-B/16 hybrid in a local file: medfusion/models/pretrained.py),
and the position embedding is resized bilinearly
for inputs other than the reference size. Width and depth are parameters for CPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.blocks import check_input_size
from medfusion.models.resnet import ResNet, conv_bn_relu
from medfusion.models.transformer import PositionEmbedding2d, TransformerEncoder

DECODER_WIDTHS = (256, 128, 64, 16)


class CupBlock(nn.Module):
    """Bilinear x2 up-sampling, optional skip concatenation, two Conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.convs(x if skip is None else torch.cat([x, skip], dim=1))


class TransUNet(nn.Module):
    """TransUNet (R50-ViT-B/16 hybrid, trained from scratch).

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: ResNet width (64 in the paper).
        hidden_size: ViT token width (768).
        num_layers: ViT layers (12).
        num_heads: attention heads (12).
        mlp_dim: ViT MLP width (3072).
        decoder_scale: multiplies the CUP widths 256, 128, 64, 16 (1.0 in the paper).
        image_size: reference input side of the position embedding (256 here; 224 in the paper).
        norm: the R50's normalisation, "group" (GN + weight standardisation, the paper's) or "batch".

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        decoder_scale: float = 1.0,
        image_size: int = 256,
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.cnn = ResNet(in_channels, depth=50, base_channels=base_channels, blocks=(3, 4, 9), norm=norm)
        stem, s4, s8, s16 = self.cnn.out_channels  # widths at 1/2, 1/4, 1/8, 1/16
        self.patch_embed = nn.Conv2d(s16, hidden_size, 1)
        self.pos = PositionEmbedding2d(hidden_size, image_size // 16)
        self.vit = TransformerEncoder(hidden_size, num_layers, num_heads, mlp_dim / hidden_size)
        widths = [max(1, round(w * decoder_scale)) for w in DECODER_WIDTHS]
        self.conv_more = conv_bn_relu(hidden_size, widths[0] * 2)
        skips = (s8, s4, stem, 0)
        c_in = widths[0] * 2
        self.decoder = nn.ModuleList()
        for skip, width in zip(skips, widths, strict=True):
            self.decoder.append(CupBlock(c_in, skip, width))
            c_in = width
        self.head = nn.Conv2d(widths[-1], num_classes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        stem, s4, s8, s16 = self.cnn(x)  # (B, C, H/2), (H/4), (H/8), (H/16)
        h, w = s16.shape[-2:]
        tokens = self.patch_embed(s16).flatten(2).transpose(1, 2) + self.pos(h, w)  # (B, h*w, D)
        tokens = self.vit(tokens)
        x = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, D, H/16, W/16)
        x = self.conv_more(x)
        for block, skip in zip(self.decoder, (s8, s4, stem, None), strict=True):
            x = block(x, skip)
        return self.head(x)
