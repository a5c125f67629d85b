"""Transformer pieces shared by CASNet's fusion module and TransUNet: pre-norm encoder, 2-D position
embeddings that follow the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TransformerEncoder(nn.Module):
    """`layers` pre-norm encoder layers (multi-head self-attention + MLP), then a final LayerNorm.

    Args:
        dim: token width D.
        layers: number of encoder layers.
        heads: attention heads (D must be divisible by it).
        mlp_ratio: MLP hidden width / D.
        dropout: dropout inside the layers (0 by default).

    Shape:
        forward: (B, N, D) -> (B, N, D)
    """

    def __init__(
        self, dim: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by its {heads} heads")
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.layers(tokens))


class PositionEmbedding2d(nn.Module):
    """Learnable 2-D position embedding on a reference grid, resized bilinearly to other grids.

    Args:
        dim: embedding width D.
        grid: reference grid side (the token grid at the default 256x256 input).

    Shape:
        forward(h, w) -> (1, h * w, D)
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, dim, grid, grid))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, h: int, w: int) -> Tensor:
        pos = self.weight
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)  # (1, h*w, D)
