"""MedT: gated axial-attention transformer with the local-global (LoGo) training strategy.

Reference:
    J. M. J. Valanarasu, P. Oza, I. Hacihaliloglu, V. M. Patel, "Medical Transformer: Gated
    Axial-Attention for Medical Image Segmentation", MICCAI 2021. arXiv:2102.10662.

As in the paper: axial attention (self-attention along the height axis, then along the width axis)
with relative position encodings for queries, keys and values, and four learnable gates that control
how much the positional terms contribute (eq. 4: y = softmax(q k + G_Q q r_q + G_K k r_k)
(G_V1 v + G_V2 r_v)); gated axial blocks (1x1 conv down, height and width attention, 1x1 conv up x2,
residual); a convolutional stem (7x7/2, 3x3, 3x3); the LoGo strategy: a shallow global branch runs on
the whole stem feature map (blocks at 1/2 and 1/4, decoder with additive skips), a deeper local branch
runs on a grid of `local_grid` x `local_grid` patches of the same map (folded into the batch), their
outputs are added at input resolution and a 1x1 head gives the logits. Gates start at 0.1 (positional
terms) and 1.0 (value term) as in the authors' code, and are learned, as the paper says.

Deliberate changes: the relative-position tables are learned for the reference size `image_size`
(the paper used 128) and resized linearly for other sizes, so any input that is a multiple of 16 works;
the global branch has 1 + 2 gated axial blocks and the local branch 1 + 3, in two stages (the
code has four in the local branch), so that its patches stay at least one
pixel wide for every multiple of 16; logits are scaled by 1/sqrt(d) in place of the original's batch
normalisation of the similarity maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.blocks import check_input_size
from medfusion.models.resnet import conv_bn_relu


class GatedAxialAttention(nn.Module):
    """Multi-head gated self-attention along one axis with relative position encodings.

    Args:
        channels: C (in and out).
        heads: attention heads; C / heads must be even (queries and keys take half each head's width).
        span: reference length of the attended axis (the relative tables have 2 * span - 1 entries).
        axis: "height" or "width".

    Shape:
        forward: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, heads: int, span: int, axis: str) -> None:
        super().__init__()
        if channels % (2 * heads):
            raise ValueError(f"gated axial attention: width {channels} is not divisible by 2 x {heads} heads")
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        self.heads, self.axis = heads, axis
        self.dv = channels // heads
        self.dq = self.dv // 2
        self.qkv = nn.Sequential(
            nn.Conv1d(channels, 2 * channels, 1, bias=False), nn.BatchNorm1d(2 * channels)
        )
        self.relative = nn.Parameter(
            torch.randn(2 * self.dv, 2 * span - 1) * self.dv**-0.5
        )  # r_q | r_k | r_v
        self.gate_q = nn.Parameter(torch.tensor(0.1))
        self.gate_k = nn.Parameter(torch.tensor(0.1))
        self.gate_v1 = nn.Parameter(torch.tensor(1.0))
        self.gate_v2 = nn.Parameter(torch.tensor(0.1))

    def relative_embeddings(self, length: int) -> Tensor:
        """(2 * dv, L, L) with entry [:, i, j] = table[:, i - j + L - 1]."""
        table = self.relative
        if table.shape[1] != 2 * length - 1:
            table = F.interpolate(table[None], size=2 * length - 1, mode="linear", align_corners=True)[0]
        offsets = torch.arange(length, device=table.device)
        return table[:, offsets[:, None] - offsets[None, :] + length - 1]

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        lines = x.permute(0, 3, 1, 2) if self.axis == "height" else x.permute(0, 2, 1, 3)  # (B, N, C, L)
        n, length = lines.shape[1], lines.shape[3]
        qkv = self.qkv(lines.reshape(b * n, c, length)).reshape(b * n, self.heads, 2 * self.dv, length)
        q, k, v = qkv.split([self.dq, self.dq, self.dv], dim=2)  # (BN, heads, d, L)
        r_q, r_k, r_v = self.relative_embeddings(length).split([self.dq, self.dq, self.dv], dim=0)
        logits = (
            torch.einsum("nhdi,nhdj->nhij", q, k)
            + self.gate_q * torch.einsum("nhdi,dij->nhij", q, r_q)
            + self.gate_k * torch.einsum("nhdj,dji->nhij", k, r_k)
        ) * self.dq**-0.5
        attn = logits.softmax(dim=-1)  # (BN, heads, L, L)
        out = self.gate_v1 * torch.einsum("nhij,nhdj->nhdi", attn, v) + self.gate_v2 * torch.einsum(
            "nhij,dij->nhdi", attn, r_v.to(attn.dtype)
        )
        out = out.reshape(b, n, c, length)
        return out.permute(0, 2, 3, 1) if self.axis == "height" else out.permute(0, 2, 1, 3)


class GatedAxialBlock(nn.Module):
    """1x1 conv down to `width`, height then width gated axial attention (then 2x2 average pooling
    when `stride` is 2), 1x1 conv up to 2 * width, residual (projected where shapes differ).

    Shape:
        forward: (B, C_in, H, W) -> (B, 2 * width, H / stride, W / stride)
    """

    def __init__(self, in_channels: int, width: int, heads: int, span: int, stride: int = 1) -> None:
        super().__init__()
        out = 2 * width
        self.down = conv_bn_relu(in_channels, width, 1)
        self.attention = nn.Sequential(
            GatedAxialAttention(width, heads, span, "height"),
            GatedAxialAttention(width, heads, span, "width"),
            nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
            nn.ReLU(inplace=True),
        )
        self.up = nn.Sequential(nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out
            else nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.up(self.attention(self.down(x))) + self.shortcut(x))


class AxialEncoderDecoder(nn.Module):
    """Two gated-axial stages (1 block at full size, `deep` blocks with stride 2) and a two-step decoder
    with an additive skip, ending at twice the input size with `out_channels` channels; the LoGo branches."""

    def __init__(
        self, in_channels: int, width: int, heads: int, span: int, deep: int, out_channels: int
    ) -> None:
        super().__init__()
        self.stage1 = GatedAxialBlock(in_channels, width // 2, heads, span)  # -> width
        self.stage2 = nn.Sequential(
            GatedAxialBlock(width, width, heads, span, stride=2),  # -> 2 width, /2
            *[GatedAxialBlock(2 * width, width, heads, max(1, span // 2)) for _ in range(deep - 1)],
        )
        self.decode2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.decode1 = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.stage1(x)
        x = F.relu(F.interpolate(self.decode2(self.stage2(x1)), scale_factor=2, mode="bilinear")) + x1
        return F.relu(F.interpolate(self.decode1(x), scale_factor=2, mode="bilinear"))


class MedT(nn.Module):
    """MedT (gated axial attention + local-global branches).

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: width w of the first axial stage (32 as in the paper's code: 16 x expansion 2);
            the stem has w / 4 channels (w * 4 in its middle convolution) and the second stage 2w.
            Must be a multiple of 4.
        heads: attention heads per axial layer (8); w / 2 must be divisible by 2 x heads.
        local_grid: the local branch splits the stem map into local_grid x local_grid patches (4).
        image_size: reference input side for the relative position tables (256 here; 128 in the paper).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16 (and of 2 x local_grid).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        heads: int = 8,
        local_grid: int = 4,
        image_size: int = 256,
    ) -> None:
        super().__init__()
        if base_channels % 4:
            raise ValueError(f"MedT base_channels must be a multiple of 4, got {base_channels}")
        w, stem = base_channels, base_channels // 4
        self.grid = local_grid
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, stem, 7, stride=2), conv_bn_relu(stem, 4 * w), conv_bn_relu(4 * w, stem)
        )
        half = image_size // 2
        self.global_branch = AxialEncoderDecoder(stem, w, heads, half, deep=2, out_channels=w // 2)
        self.local_branch = AxialEncoderDecoder(
            stem, w, heads, max(1, half // local_grid), deep=3, out_channels=w // 2
        )
        self.fuse = conv_bn_relu(w // 2, w // 2)
        self.head = nn.Conv2d(w // 2, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        g = self.grid
        if x.shape[-2] % (2 * g) or x.shape[-1] % (2 * g):
            raise ValueError(
                f"MedT: input size {tuple(x.shape[-2:])} is not a multiple of 2 x local_grid ({2 * g})"
            )
        feats = self.stem(x)  # (B, w/4, H/2, W/2)
        global_out = self.global_branch(feats)  # (B, w/2, H, W)
        b, c, h, w = feats.shape
        patches = feats.reshape(b, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5)
        local = self.local_branch(patches.reshape(b * g * g, c, h // g, w // g))  # (B g g, w/2, 2h/g, 2w/g)
        c2, ph, pw = local.shape[1:]
        local = local.reshape(b, g, g, c2, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c2, g * ph, g * pw)
        return self.head(self.fuse(global_out + local))
