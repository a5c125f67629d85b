"""ImageNet-pretrained encoders from local files, in the standard (torchvision) parameter names.

`<model>.pretrained: PATH` in params.yaml (null by default: from scratch) initialises a model's
encoder from a state dict saved by torchvision (`torch.save(model.state_dict(), PATH)`, or a
checkpoint holding it under "state_dict" or "model"). Nothing is downloaded here. The names are
mapped onto ours, every encoder parameter must be filled, nothing but the classifier may be left
over, and every shape must agree; anything else is an error that names the keys.

| model | file (torchvision name) | where to get it |
| --- | --- | --- |
| deeplabv3 | ResNet-18/34/50/101 matching `deeplabv3.depth`, width 64 (`resnet50`) | `torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()`, or https://download.pytorch.org/models/resnet50-0676ba61.pth |
| segnet | VGG16 with batch norm, width 64 (`vgg16_bn`) | `torchvision.models.vgg16_bn(weights="IMAGENET1K_V1").state_dict()`, or https://download.pytorch.org/models/vgg16_bn-6c64b313.pth |
| transunet | timm's R50 + ViT-B/16 hybrid (`vit_base_r50_s16_224.orig_in21k`, the ImageNet-21k weights TransUNet started from), `transunet.norm: group` | `timm.create_model("vit_base_r50_s16_224.orig_in21k", pretrained=True).state_dict()` |

U-Net and Attention U-Net have no standard pretrained encoder of their shape (their encoders
double 64 -> 1024 with two convolutions per level, not VGG's blocks), nor have CASNet and MedT.

Our choices where the paper is silent (recorded here and in the closing note of the change):
- Input channels other than RGB: the first convolution's RGB filters are summed for one channel
  (grey, CT, MRI), and otherwise repeated cyclically and scaled by 3 / C (so the response to a
  constant image is kept), as is common practice (timm's `adapt_input_conv`).
- VGG's convolutions have biases and ours (followed by batch norm) do not: each bias b is folded
  into the following batch norm's running mean (mean - b), which gives the same output in
  evaluation and changes nothing in training (batch statistics subtract it anyway).
- The classifier (`fc.*`, `classifier.*`, `head.*`) is not used, nor is ViT's class token: TransUNet
  has none. ViT's position table (a class-token entry and a 14 x 14 grid at 224) loses its class
  entry and is resized bilinearly to our grid (16 x 16 at 256), as TransUNet's code does.
- timm's hybrid pads its first convolution 'same' the TensorFlow way and standardises weights with
  eps 1e-8; ours pads symmetrically with eps 1e-5 (TransUNet's code): the weights load unchanged.

Memory: the file's state dict, once, beside the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.common import UserError

PRETRAINED_ARCHITECTURES = ("deeplabv3", "segnet", "transunet")


class PretrainedError(UserError, ValueError):
    """A pretrained file that does not fit the model (missing, unexpected or mis-shaped keys)."""


def read_state_dict(path: str | Path, key: str) -> dict[str, Tensor]:
    """The tensors of a saved state dict (or of a checkpoint's "state_dict" / "model" entry)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(
            f"{key}: {path} does not exist; expected a torchvision state dict (.pth), or null to train from scratch"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same explanation
        raise PretrainedError(f"{key}: {path} is not a readable PyTorch state dict ({e})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedError(f"{key}: {path} holds no state dict of tensors (a whole pickled model?)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# --- name maps: standard name -> ours, None = not used --------------------------------------------

_BOTTLENECK = {"conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1.0", "bn2": "body.1.1",
               "conv3": "body.2", "bn3": "body.3", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}  # fmt: skip
_BASIC = {"conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1", "bn2": "body.2",
          "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}  # fmt: skip


def torchvision_resnet_name(name: str, prefix: str, bottleneck: bool) -> str | None:
    """torchvision ResNet name -> ours under `prefix` (medfusion.models.resnet.ResNet); None for fc."""
    if name.startswith("fc."):
        return None
    if m := re.fullmatch(r"conv1\.(\w+)", name):
        return f"{prefix}stem.0.{m[1]}"
    if m := re.fullmatch(r"bn1\.(\w+)", name):
        return f"{prefix}stem.1.{m[1]}"
    if m := re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(\w+)", name):
        part = (_BOTTLENECK if bottleneck else _BASIC).get(m[3])
        if part is not None:
            return f"{prefix}stages.{int(m[1]) - 1}.{m[2]}.{part}.{m[4]}"
    return f"?{name}"  # not a ResNet name: reported as unexpected


def _vgg16_bn_layers() -> dict[int, str]:
    """torchvision vgg16_bn `features` index -> our SegNet module: per convolution Conv (-> .0), BN
    (-> .1), ReLU; a max-pool closes each block (SegNet's VGG16_BLOCKS)."""
    from medfusion.models.segnet import VGG16_BLOCKS

    layers, index = {}, 0
    for block, n in enumerate(VGG16_BLOCKS):
        for conv in range(n):
            layers[index], layers[index + 1] = f"encoders.{block}.{conv}.0", f"encoders.{block}.{conv}.1"
            index += 3
        index += 1  # the max-pool
    return layers


_VGG16_BN_LAYERS = _vgg16_bn_layers()


def torchvision_vgg16_bn_name(name: str) -> str | None:
    """torchvision vgg16_bn name -> ours (SegNet's encoders); None for the classifier."""
    if name.startswith("classifier."):
        return None
    m = re.fullmatch(r"features\.(\d+)\.(\w+)", name)
    layer = _VGG16_BN_LAYERS.get(int(m[1])) if m else None
    return f"?{name}" if layer is None else f"{layer}.{m[2]}"


_TIMM_UNIT = {"conv1": "body.0.0", "norm1": "body.0.1", "conv2": "body.1.0", "norm2": "body.1.1",
              "conv3": "body.2", "norm3": "body.3", "downsample.conv": "shortcut.0", "downsample.norm": "shortcut.1"}  # fmt: skip
_TIMM_BLOCK = {"norm1": "norm1", "attn.qkv.weight": "self_attn.in_proj_weight",
               "attn.qkv.bias": "self_attn.in_proj_bias", "attn.proj": "self_attn.out_proj", "norm2": "norm2",
               "mlp.fc1": "linear1", "mlp.fc2": "linear2"}  # fmt: skip


def timm_vit_r50_name(name: str) -> str | None:
    """timm's R50 + ViT-B/16 hybrid name -> ours (medfusion.models.transunet.TransUNet); None for
    the class token and the classifier."""
    if name in ("cls_token",) or name.startswith(("head.", "pre_logits.", "fc_norm.")):
        return None
    if name == "pos_embed":
        return "pos.weight"
    backbone = "patch_embed.backbone."
    if name.startswith(backbone):
        rest = name[len(backbone) :]
        if m := re.fullmatch(r"stem\.(conv|norm)\.(\w+)", rest):
            return f"cnn.stem.{0 if m[1] == 'conv' else 1}.{m[2]}"
        if m := re.fullmatch(
            r"stages\.(\d)\.blocks\.(\d+)\.(conv\d|norm\d|downsample\.conv|downsample\.norm)\.(\w+)", rest
        ):
            return f"cnn.stages.{m[1]}.{m[2]}.{_TIMM_UNIT[m[3]]}.{m[4]}"
        return f"?{name}"
    if m := re.fullmatch(r"patch_embed\.proj\.(\w+)", name):
        return f"patch_embed.{m[1]}"
    if m := re.fullmatch(r"norm\.(\w+)", name):
        return f"vit.norm.{m[1]}"
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        for theirs, ours in _TIMM_BLOCK.items():
            if m[2] == theirs or m[2].startswith(theirs + "."):
                return f"vit.layers.layers.{m[1]}.{ours}{m[2][len(theirs) :]}"
    return f"?{name}"


def _position_table(tensor: Tensor, shape: torch.Size) -> Tensor:
    """ViT's (1, 1 + n^2, D) table (class entry first) -> ours (1, D, g, g), resized bilinearly."""
    if tensor.ndim != 3 or len(shape) != 4:
        return tensor  # reported as mis-shaped
    grid = tensor[:, 1:] if round((tensor.shape[1] - 1) ** 0.5) ** 2 == tensor.shape[1] - 1 else tensor
    side = round(grid.shape[1] ** 0.5)
    if side * side != grid.shape[1] or grid.shape[2] != shape[1]:
        return tensor
    table = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    return F.interpolate(table, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)


def _mapper(architecture: str, model: nn.Module) -> tuple[Callable[[str], str | None], tuple[str, ...]]:
    if architecture == "deeplabv3":
        bottleneck = any(".body.3." in k for k in model.state_dict())
        return (lambda n: torchvision_resnet_name(n, "backbone.", bottleneck)), ("backbone.",)
    if architecture == "segnet":
        return torchvision_vgg16_bn_name, ("encoders.",)
    if architecture == "transunet":
        if any(isinstance(m, nn.BatchNorm2d) for m in model.cnn.modules()):
            raise PretrainedError(
                "transunet.pretrained: the hybrid checkpoint has group norm; set transunet.norm: group"
            )
        return timm_vit_r50_name, ("cnn.", "patch_embed.", "pos.", "vit.")
    raise PretrainedError(
        f"{architecture}.pretrained: no standard pretrained encoder is known for {architecture}; "
        f"supported: {list(PRETRAINED_ARCHITECTURES)}"
    )


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters (O, 3, k, k) -> (O, C, k, k): summed for C = 1, else repeated and scaled by 3 / C."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_pretrained(model: nn.Module, architecture: str, path: str | Path) -> dict[str, int]:
    """Fill `model`'s encoder from the standard state dict at `path` (module docstring). Raises
    PretrainedError naming the missing, unexpected or mis-shaped keys before anything is changed.
    Returns {"loaded": tensors copied, "ignored": classifier tensors left out}."""
    key = f"{architecture}.pretrained"
    source = read_state_dict(path, key)
    mapper, encoder_prefix = _mapper(architecture, model)
    ours = model.state_dict()
    targets = {name: mapper(name) for name in source}
    ignored = sum(t is None for t in targets.values())
    mapped = {t: source[n] for n, t in targets.items() if t is not None and not t.startswith("?")}
    if architecture == "segnet":
        mapped = _fold_conv_biases(mapped)
    unexpected = [n for n, t in targets.items() if t is not None and (t.startswith("?") or t not in ours)
                  and not (architecture == "segnet" and t.endswith(".0.bias"))]  # fmt: skip
    mapped = {k: v for k, v in mapped.items() if k in ours}
    if "pos.weight" in mapped:
        mapped["pos.weight"] = _position_table(mapped["pos.weight"], ours["pos.weight"].shape)
    # num_batches_tracked is a counter, not a weight: files older than torchvision 0.4 have none
    missing = [k for k in ours if k.startswith(encoder_prefix) and k not in mapped
               and not k.endswith("num_batches_tracked")]  # fmt: skip
    first = next(k for k in ours if k.startswith(encoder_prefix))
    if first in mapped:
        mapped[first] = adapt_input_conv(mapped[first], ours[first].shape[1])
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(ours[k].shape)}" for k, v in mapped.items()
             if v.shape != ours[k].shape]  # fmt: skip
    problems = [(what, names) for what, names in (("missing", missing), ("unexpected", unexpected),
                ("of the wrong shape", wrong)) if names]  # fmt: skip
    if problems:
        detail = "; ".join(
            f"{len(n)} {what}: {', '.join(n[:6])}{' ...' if len(n) > 6 else ''}" for what, n in problems
        )
        raise PretrainedError(
            f"{key}: {path} does not fit {architecture} ({detail}). Expected the torchvision names and "
            f"sizes of the file this model takes (medfusion/models/pretrained.py; width 64, the same depth)"
        )
    model.load_state_dict(mapped, strict=False)
    return {"loaded": len(mapped), "ignored": ignored}


def _fold_conv_biases(mapped: dict[str, Tensor]) -> dict[str, Tensor]:
    """encoders.b.c.0.bias (VGG's conv bias, which our conv lacks) -> BN running mean - bias."""
    out = dict(mapped)
    for name in [k for k in mapped if k.endswith(".0.bias")]:
        bias = out.pop(name)
        mean = name[: -len("0.bias")] + "1.running_mean"
        if mean in out:
            out[mean] = out[mean] - bias
    return out
