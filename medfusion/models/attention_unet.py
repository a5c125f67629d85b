"""Attention U-Net: U-Net whose skip connections pass through additive attention gates.

Reference:
    O. Oktay, J. Schlemper, L. Le Folgoc, M. Lee, M. Heinrich, K. Misawa, K. Mori, S. McDonagh,
    N. Y. Hammerla, B. Kainz, B. Glocker, D. Rueckert, "Attention U-Net: Learning Where to Look for
    the Pancreas", MIDL 2018. arXiv:1804.03999.

As in the paper, the gate compares a skip feature map x (resolution H) with the gating signal g
from the next coarser decoder level (H/2): x is brought to g's grid by a 2x2 stride-2 convolution,
the two are added, passed through ReLU, a 1x1 convolution to one channel and a sigmoid, and the
coefficients are resampled bilinearly to H and multiply x, followed by a 1x1 conv + BN. Deliberate
changes: 2-D instead of the paper's 3-D, the same 5-stage BN backbone and 'same' padding as our
U-Net (so the two differ only by the gates), and no deep supervision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.blocks import DoubleConv, UNetEncoder, check_input_size


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay 2018, Fig. 2).

    Args:
        skip_channels: channels of x (the skip connection).
        gate_channels: channels of g (the coarser gating signal).
        inter_channels: channels of the joint space.

    Shape:
        forward: x (B, Cx, H, W), g (B, Cg, H/2, W/2) -> (B, Cx, H, W)
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.theta_x = nn.Conv2d(skip_channels, inter_channels, 2, stride=2, bias=False)
        self.phi_g = nn.Conv2d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv2d(inter_channels, 1, 1, bias=True)
        self.out = nn.Sequential(nn.Conv2d(skip_channels, skip_channels, 1), nn.BatchNorm2d(skip_channels))

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return self.out(x * self.coefficients(x, g))

    def coefficients(self, x: Tensor, g: Tensor) -> Tensor:
        """The attention map (B, 1, H, W) in [0, 1]."""
        joint = F.relu(self.theta_x(x) + self.phi_g(g))  # (B, Ci, H/2, W/2)
        alpha = torch.sigmoid(self.psi(joint))  # (B, 1, H/2, W/2)
        return F.interpolate(alpha, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)


class AttentionUNet(nn.Module):
    """Attention U-Net: encoder widths w, 2w, 4w, 8w, 16w; a gate on each of the 4 skips.

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: width w of the first stage (64, as our U-Net).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    compile_regions = (AttentionGate,)  # what `train.compile: regions` compiles

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 64) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, base_channels)
        widths = self.encoder.widths
        skips = list(reversed(widths[:-1]))  # 8w, 4w, 2w, w
        self.gates = nn.ModuleList(AttentionGate(w, w * 2, max(w // 2, 1)) for w in skips)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in skips)
        self.decoders = nn.ModuleList(DoubleConv(w * 2, w) for w in skips)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        skips = self.encoder(x)
        x = skips.pop()  # bottleneck (B, 16w, H/16, W/16): the first gating signal
        for gate, up, decoder in zip(self.gates, self.ups, self.decoders, strict=True):
            skip = gate(skips.pop(), x)  # (B, w_i, 2h, 2w)
            x = decoder(torch.cat([up(x), skip], dim=1))  # cat -> (B, 2 w_i, 2h, 2w)
        return self.head(x)
