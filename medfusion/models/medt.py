"""MedT: gated axial-attention transformer with the local-global (LoGo) training strategy.

Reference:
    J. M. J. Valanarasu, P. Oza, I. Hacihaliloglu, V. M. Patel, "Medical Transformer: Gated
    Axial-Attention for Medical Image Segmentation", MICCAI 2021. arXiv:2102.10662.

As in the paper and the authors' code (`medt_net(AxialBlock_dynamic, AxialBlock_wopos, [1, 2, 4, 1],
s=0.125)`, about 1.4 M parameters at 3 input channels): axial attention (self-attention along the
height axis, then along the width axis) with relative position encodings for queries, keys and
values, and four learnable gates that control how much the positional terms contribute (eq. 4:
y = softmax(q k + G_Q q r_q + G_K k r_k) (G_V1 v + G_V2 r_v)); gated axial blocks (1x1 conv down,
height and width attention, 1x1 conv up x2, residual). The LoGo strategy: a global branch (its own
convolutional stem 7x7/2, 3x3, 3x3, then `blocks[0]` gated blocks at 1/2 and `blocks[1]` at 1/4, a
decoder with additive skips) on the whole image, and a local branch (its own stem, then all of
`blocks`: 1, 2, 4 and 1 blocks at 1/2 to 1/16 of a patch, axial attention without positional terms
as the code's `AxialBlock_wopos`, a five-step decoder with additive skips) on each of the
`local_grid` x `local_grid` patches of the image (folded into the batch); their outputs are added at
input resolution, then a 3x3 convolution and a 1x1 head give the logits. Gates start at 0.1
(positional terms) and 1.0 (value term) as in the authors' code, and are learned, as the paper says.

Deliberate changes: the relative-position tables are learned for the reference size `image_size`
(the paper used 128) and resized linearly for other sizes; logits are scaled by 1/sqrt(d) in place
of the original's batch normalisation of the similarity and output maps. `blocks` is a parameter:
the default [1, 2, 4, 1] needs input sides that are multiples of 2 x local_grid x 8 (64 at the
default grid of 4); a shorter list (the tiny [1, 2], the global branch's depth, in both branches)
fits multiples of 16 for small CPU runs.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        positional: False for plain axial attention (no relative terms, no gates: the authors'
            `AxialAttention_wopos` of the local branch).

    Shape:
        forward: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, heads: int, span: int, axis: str, positional: bool = True) -> None:
        super().__init__()
        if channels % (2 * heads):
            raise ValueError(f"gated axial attention: width {channels} is not divisible by 2 x {heads} heads")
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        self.heads, self.axis, self.positional = heads, axis, positional
        self.dv = channels // heads
        self.dq = self.dv // 2
        self.qkv = nn.Sequential(
            nn.Conv1d(channels, 2 * channels, 1, bias=False), nn.BatchNorm1d(2 * channels)
        )
        if positional:
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
        logits = torch.einsum("nhdi,nhdj->nhij", q, k)
        if self.positional:
            r_q, r_k, r_v = self.relative_embeddings(length).split([self.dq, self.dq, self.dv], dim=0)
            logits = (
                logits
                + self.gate_q * torch.einsum("nhdi,dij->nhij", q, r_q)
                + self.gate_k * torch.einsum("nhdj,dji->nhij", k, r_k)
            )
        attn = (logits * self.dq**-0.5).softmax(dim=-1)  # (BN, heads, L, L)
        out = torch.einsum("nhij,nhdj->nhdi", attn, v)
        if self.positional:
            out = self.gate_v1 * out + self.gate_v2 * torch.einsum("nhij,dij->nhdi", attn, r_v.to(attn.dtype))
        out = out.reshape(b, n, c, length)
        return out.permute(0, 2, 3, 1) if self.axis == "height" else out.permute(0, 2, 1, 3)


class GatedAxialBlock(nn.Module):
    """1x1 conv down to `width`, height then width (gated) axial attention (then 2x2 average pooling
    when `stride` is 2), 1x1 conv up to 2 * width, residual (projected where shapes differ).

    Shape:
        forward: (B, C_in, H, W) -> (B, 2 * width, H / stride, W / stride)
    """

    def __init__(
        self, in_channels: int, width: int, heads: int, span: int, stride: int = 1, positional: bool = True
    ) -> None:
        super().__init__()
        out = 2 * width
        self.down = conv_bn_relu(in_channels, width, 1)
        self.attention = nn.Sequential(
            GatedAxialAttention(width, heads, span, "height", positional),
            GatedAxialAttention(width, heads, span, "width", positional),
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


class AxialBranch(nn.Module):
    """One LoGo branch: a stem (7x7/2 to w/4, 3x3 to 4w, 3x3 back to w/4), stages of gated axial
    blocks (stage k: `blocks[k]` blocks of width w/2 x 2^k, output w x 2^k, stride 2 from the second
    stage), and a decoder that adds each stage's output back on the way up (a 3x3 convolution, x2
    bilinear, ReLU, the skip), ending at the input size with w/2 channels. `bottleneck` adds the
    local branch's first decoder step (a stride-2 3x3 convolution, x2, the last stage's output added).

    Shape:
        forward: (B, C_in, H, W) -> (B, w / 2, H, W)
    """

    def __init__(
        self, in_channels: int, width: int, heads: int, span: int, blocks: Sequence[int], positional: bool,
        bottleneck: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        stem = width // 4
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, stem, 7, stride=2),
            conv_bn_relu(stem, 4 * width),
            conv_bn_relu(4 * width, stem),
        )
        self.stages = nn.ModuleList()
        c_in = stem
        for k, n in enumerate(blocks):
            planes, side = width // 2 * 2**k, max(1, span // 2 ** max(0, k - 1))  # side: the stage's input
            first = GatedAxialBlock(c_in, planes, heads, side, 1 if k == 0 else 2, positional)
            later = max(1, side // 2) if k > 0 else side
            rest = [GatedAxialBlock(2 * planes, planes, heads, later, 1, positional) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(first, *rest))
            c_in = 2 * planes
        outs = [width * 2**k for k in range(len(blocks))]
        self.bottleneck = nn.Conv2d(outs[-1], outs[-1], 3, stride=2, padding=1) if bottleneck else None
        self.decoders = nn.ModuleList(
            [nn.Conv2d(outs[k], outs[k - 1], 3, padding=1) for k in range(len(blocks) - 1, 0, -1)]
        )
        self.last = nn.Conv2d(outs[0], width // 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        skips = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        if self.bottleneck is not None:
            x = _up(self.bottleneck(x), skips[-1].shape[-2:]) + skips[-1]
        for decoder, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            x = _up(decoder(x), skip.shape[-2:]) + skip
        return _up(self.last(x), size)


def _up(x: Tensor, size) -> Tensor:
    return F.relu(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))


class MedT(nn.Module):
    """MedT (gated axial attention + local-global branches) at the authors' size by default.

    Args:
        in_channels: input channels (C_in).
        num_classes: output classes (K), including background.
        base_channels: width w of the first axial stage (32 as in the code: int(128 x 0.125) x
            expansion 2); each stem has w / 4 channels (w x 4 in its middle convolution). A multiple of 4.
        heads: attention heads per axial layer (8); w / 2 must be divisible by 2 x heads.
        local_grid: the local branch splits the image into local_grid x local_grid patches (4).
        blocks: gated axial blocks per stage of the local branch ([1, 2, 4, 1] as in the code); the
            global branch has the first two stages. At least two.
        image_size: reference input side for the relative position tables (256 here; 128 in the paper).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16 and of
        2 x local_grid x 2^(len(blocks) - 1) (64 at the defaults).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        heads: int = 8,
        local_grid: int = 4,
        blocks: Sequence[int] = (1, 2, 4, 1),
        image_size: int = 256,
    ) -> None:
        super().__init__()
        if base_channels % 4:
            raise ValueError(f"MedT base_channels must be a multiple of 4, got {base_channels}")
        if len(blocks) < 2 or min(blocks) < 1:
            raise ValueError(f"MedT blocks {list(blocks)}: at least two stages of at least one block each")
        self.grid, self.multiple = local_grid, 2 * local_grid * 2 ** (len(blocks) - 1)
        self._check_side(image_size, "reference size (data.image_size or data.patch_size)")
        w, half = base_channels, image_size // 2
        self.global_branch = AxialBranch(in_channels, w, heads, half, blocks[:2], True, False)
        self.local_branch = AxialBranch(
            in_channels, w, heads, max(1, half // local_grid), blocks, False, True
        )
        self.fuse = nn.Conv2d(w // 2, w // 2, 3, padding=1)
        self.head = nn.Conv2d(w // 2, num_classes, 1)

    def _check_side(self, side: int, what: str) -> None:
        if side % self.multiple:
            raise ValueError(
                f"MedT: {what} {side} is not a multiple of 2 x local_grid x 2^(stages - 1) = {self.multiple} "
                "(medt.local_grid, medt.blocks); choose a size that is, or fewer medt.blocks"
            )

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        for side in x.shape[-2:]:
            self._check_side(side, "input side")
        g = self.grid
        b, c, h, w = x.shape
        global_out = self.global_branch(x)  # (B, w/2, H, W)
        patches = (
            x.reshape(b, c, g, h // g, g, w // g)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b * g * g, c, h // g, w // g)
        )
        local = self.local_branch(patches)  # (B g g, w/2, H/g, W/g)
        c2, ph, pw = local.shape[1:]
        local = local.reshape(b, g, g, c2, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c2, h, w)
        return self.head(F.relu(self.fuse(global_out + local)))
