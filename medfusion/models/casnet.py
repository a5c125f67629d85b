"""CASNet, the Context-Aware Segmentation Network of MedFusion-TransNet (METHOD.md section 1).

An encoder-decoder whose parts can each be switched off for the ablations (a switch that is off
removes the module and its parameters):

* HFE (`use_hfe`): 5 encoder stages of [Conv3x3-BN-ReLU] x 2 (widths w, 2w, 4w, 8w, 16w, 2x2
  max-pooling between them); the decoder up-samples bilinearly x2, concatenates the stage's skip and
  applies [Conv3x3-BN-ReLU] x 2; a 1x1 head gives K logits at input size. Off: no skip connections,
  the decoder sees only the up-sampled path (and no skip attention or 1/8-scale fusion exists).
* CA (`use_attention`), `ContextualAttention` on every skip and on the bottleneck.
* MSF (`use_msf`), `MultiScaleFusion` at the bottleneck.
* TF (`use_transformer`), `TransformerFusion` at the bottleneck (scale 16) and, where
  `transformer_scales` lists 8, on the 1/8-scale skip.

Multi-modal input: `modalities` M splits the C_in input channels into M equal groups (for example
T2 and ADC). Each group runs through the shared encoder (modalities folded into the batch); the
transformer lets all modalities' tokens attend to each other in one sequence, with a learnable
modality embedding, and averages its output over modalities; skips (and the bottleneck when the
transformer is off) are averaged over modalities before CA. M = 1 is ordinary single-image input.

Decisions where METHOD.md is silent (also in the closing note of the model-zoo issue):
* Order at the bottleneck: encoder -> MSF (per modality) -> TF (fuses modalities) -> CA -> decoder.
* MSF branches have a quarter of the bottleneck width each (four rates concatenate back to it; at full
  width MSF alone cost 0.8x a U-Net training step on CPU); no residual around MSF.
* TF is residual: output = mean over modalities of its input + 1x1 projection of the encoded tokens,
  so that a freshly initialised transformer does not scramble the CNN features.
* The reduction of CA's shared axis-pooling convolution is 8, like its channel MLP (at least 1 channel).
* The position embedding is learned on the token grid of a 256x256 input (16x16 at scale 16, 32x32 at
  scale 8) and resized bilinearly for other sizes.
* `use_boundary` is a loss setting (DRGO boundary refinement), not part of the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.blocks import DoubleConv, UNetEncoder, check_input_size
from medfusion.models.resnet import conv_bn_relu
from medfusion.models.transformer import PositionEmbedding2d, TransformerEncoder

REFERENCE_SIZE = 256  # the input side the position embeddings are learned for
TRANSFORMER_HEADS = 8
SCALE_STAGE = {16: 4, 8: 3}  # transformer scale -> encoder stage index
BRANCH_REDUCTION = 4  # each MSF branch has bottleneck width / 4 channels


class ContextualAttention(nn.Module):
    """Channel, axis and local attention with a learnable blend (METHOD.md section 1, CA).

    a_c = sigmoid(MLP(GAP(F))) (reduction 8); axis pooling z_h = mean_W F, z_w = mean_H F through a
    shared 1x1 conv-BN-ReLU, then one 1x1 conv each and a sigmoid -> a_h (C, H, 1), a_w (C, 1, W);
    s = sigmoid(conv7x7([mean_c F; max_c F])); F' = F a_c a_h a_w s; out = alpha F' + (1 - alpha) F with
    alpha = sigmoid(theta), theta a learnable scalar initialised to 0 (alpha = 0.5).

    Shape:
        forward: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel = nn.Sequential(  # the MLP on GAP(F), as 1x1 convolutions
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.axis_shared = conv_bn_relu(channels, hidden, 1)
        self.axis_h = nn.Conv2d(hidden, channels, 1)
        self.axis_w = nn.Conv2d(hidden, channels, 1)
        self.local = nn.Conv2d(2, 1, 7, padding=3)
        self.theta = nn.Parameter(torch.zeros(()))

    @property
    def alpha(self) -> Tensor:
        return torch.sigmoid(self.theta)

    def forward(self, f: Tensor) -> Tensor:
        h, w = f.shape[-2:]
        z_h = f.mean(dim=3, keepdim=True)  # (B, C, H, 1)
        a_c = torch.sigmoid(self.channel(z_h.mean(dim=2, keepdim=True)))  # GAP(F) = mean_H z_h: (B, C, 1, 1)
        z = torch.cat([z_h, f.mean(dim=2, keepdim=True).transpose(2, 3)], dim=2)
        z_h, z_w = self.axis_shared(z).split([h, w], dim=2)  # (B, hidden, H, 1), (B, hidden, W, 1)
        a_h = torch.sigmoid(self.axis_h(z_h))  # (B, C, H, 1)
        a_w = torch.sigmoid(self.axis_w(z_w)).transpose(2, 3)  # (B, C, 1, W)
        s = torch.sigmoid(
            self.local(torch.cat([f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)], dim=1))
        )
        alpha = self.alpha
        # alpha F' + (1 - alpha) F = F * ((1 - alpha) + (alpha a_c a_h) a_w s): the scalar and the small
        # factors are combined first, so only three full-size tensors are made (this runs at full resolution)
        gate = torch.addcmul(
            (1 - alpha).to(f.dtype), (alpha * a_c * a_h).to(f.dtype) * a_w.to(f.dtype), s.to(f.dtype)
        )
        return f * gate


class MultiScaleFusion(nn.Module):
    """Parallel dilated Conv3x3-BN-ReLU branches weighted by softmax(phi), concatenated, 1x1 conv-BN-ReLU.

    Each branch has C / 4 channels (so four rates concatenate to C), as ASPP narrows its branches.

    Shape:
        forward: (B, C, h, w) -> (B, C, h, w)
    """

    def __init__(self, channels: int, rates: list[int]) -> None:
        super().__init__()
        width = max(1, channels // BRANCH_REDUCTION)
        self.branches = nn.ModuleList(conv_bn_relu(channels, width, 3, dilation=r) for r in rates)
        self.phi = nn.Parameter(torch.zeros(len(rates)))
        self.project = conv_bn_relu(width * len(rates), channels, 1)

    def branch_weights(self) -> Tensor:
        """w_r = softmax(phi)_r, shape (len(rates),), sums to 1."""
        return self.phi.softmax(dim=0)

    def forward(self, f: Tensor) -> Tensor:
        weights = self.branch_weights()
        return self.project(
            torch.cat([weights[i] * branch(f) for i, branch in enumerate(self.branches)], dim=1)
        )


class TransformerFusion(nn.Module):
    """Tokens of every modality attend to each other; output averaged over modalities, residual.

    Args:
        channels: feature width C.
        dim: token width D (transformer_dim).
        layers: pre-norm encoder layers (8 heads, MLP ratio 4).
        modalities: M; a learnable modality embedding is added when M > 1.
        grid: token grid side of the reference 256x256 input.

    Shape:
        forward: (B * M, C, h, w) -> (B, C, h, w)
    """

    def __init__(self, channels: int, dim: int, layers: int, modalities: int, grid: int) -> None:
        super().__init__()
        self.modalities = modalities
        self.project_in = nn.Conv2d(channels, dim, 1)
        self.pos = PositionEmbedding2d(dim, grid)
        self.modality = nn.Parameter(0.02 * torch.randn(modalities, dim)) if modalities > 1 else None
        self.encoder = TransformerEncoder(dim, layers, TRANSFORMER_HEADS, mlp_ratio=4.0)
        self.project_out = nn.Conv2d(dim, channels, 1)

    def forward(self, f: Tensor) -> Tensor:
        bm, c, h, w = f.shape
        m = self.modalities
        tokens = self.project_in(f).flatten(2).transpose(1, 2) + self.pos(h, w)  # (B M, h w, D)
        tokens = tokens.reshape(bm // m, m, h * w, -1)
        if self.modality is not None:
            tokens = tokens + self.modality[None, :, None, :]
        tokens = self.encoder(tokens.flatten(1, 2))  # (B, M h w, D): one sequence across modalities
        tokens = tokens.reshape(bm // m, m, h * w, -1).mean(dim=1)  # (B, h w, D)
        out = self.project_out(tokens.transpose(1, 2).reshape(bm // m, -1, h, w))
        return mean_over_modalities(f, m) + out


def mean_over_modalities(f: Tensor, modalities: int) -> Tensor:
    """(B * M, C, h, w) -> (B, C, h, w)."""
    if modalities == 1:
        return f
    return f.reshape(-1, modalities, *f.shape[1:]).mean(dim=1)


class CASNet(nn.Module):
    """Context-Aware Segmentation Network.

    Args:
        in_channels: input channels (C_in), a multiple of `modalities`.
        num_classes: output classes (K), including background.
        base_channels: width w of the first stage (32).
        use_hfe, use_attention, use_msf, use_transformer: the ablation switches (see the module docstring).
        atrous_rates: MSF dilation rates ([1, 2, 4, 6]).
        transformer_dim: token width D (256); divisible by 8 heads.
        transformer_layers: encoder layers (4).
        transformer_scales: where TF runs: 16 (bottleneck) and/or 8 (the 1/8 skip); ([16]).
        modalities: M, how many equal channel groups the input holds (1).

    Shape:
        forward: (B, C_in, H, W) -> logits (B, K, H, W); H and W multiples of 16.
    """

    compile_regions = (ContextualAttention,)  # what `train.compile: regions` compiles

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        use_hfe: bool = True,
        use_attention: bool = True,
        use_msf: bool = True,
        use_transformer: bool = True,
        atrous_rates: list[int] | tuple[int, ...] = (1, 2, 4, 6),
        transformer_dim: int = 256,
        transformer_layers: int = 4,
        transformer_scales: list[int] | tuple[int, ...] = (16,),
        modalities: int = 1,
    ) -> None:
        super().__init__()
        if modalities < 1 or in_channels % modalities:
            raise ValueError(
                f"CASNet: in_channels {in_channels} cannot be split into {modalities} equal modalities"
            )
        unknown = sorted(set(transformer_scales) - set(SCALE_STAGE))
        if unknown:
            raise ValueError(
                f"CASNet: transformer_scales {unknown} not supported; use a subset of {sorted(SCALE_STAGE)}"
            )
        if not atrous_rates and use_msf:
            raise ValueError("CASNet: use_msf needs at least one atrous rate")
        self.modalities = modalities
        self.use_hfe = use_hfe
        self.encoder = UNetEncoder(in_channels // modalities, base_channels)
        widths = self.encoder.widths  # w .. 16w
        bottleneck = widths[-1]
        self.msf = MultiScaleFusion(bottleneck, list(atrous_rates)) if use_msf else None
        scales = set(transformer_scales) if use_transformer else set()
        if not use_hfe:
            scales.discard(8)  # the 1/8 scale lives on a skip connection, which HFE-off removes
        self.fusion = nn.ModuleDict(
            {
                str(scale): TransformerFusion(
                    widths[SCALE_STAGE[scale]],
                    transformer_dim,
                    transformer_layers,
                    modalities,
                    REFERENCE_SIZE // scale,
                )
                for scale in sorted(scales, reverse=True)
            }
        )
        self.bottleneck_attention = ContextualAttention(bottleneck) if use_attention else None
        skip_widths = list(reversed(widths[:-1]))  # 8w, 4w, 2w, w
        self.skip_attention = (
            nn.ModuleList(ContextualAttention(w) for w in skip_widths) if use_attention and use_hfe else None
        )
        self.decoders = nn.ModuleList(
            DoubleConv(w * 2 + (w if use_hfe else 0), w) for w in skip_widths
        )  # input: up-sampled 2w (+ skip w)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input_size(x)
        b, c, h, w = x.shape
        m = self.modalities
        if c % m:
            raise ValueError(f"CASNet: got {c} input channels, not a multiple of {m} modalities")
        features = self.encoder(x.reshape(b * m, c // m, h, w))  # 5 maps of (B M, w_i, H/2^i, W/2^i)
        x = features[4]
        if self.msf is not None:
            x = self.msf(x)
        x = (
            self.fusion["16"](x) if "16" in self.fusion else mean_over_modalities(x, m)
        )  # (B, 16w, H/16, W/16)
        if self.bottleneck_attention is not None:
            x = self.bottleneck_attention(x)
        for i, decoder in enumerate(self.decoders):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if self.use_hfe:
                stage = 3 - i
                skip = features[stage]
                skip = (
                    self.fusion["8"](skip)
                    if stage == 3 and "8" in self.fusion
                    else mean_over_modalities(skip, m)
                )
                if self.skip_attention is not None:
                    skip = self.skip_attention[i](skip)
                x = torch.cat([x, skip], dim=1)
            x = decoder(x)
        return self.head(x)
