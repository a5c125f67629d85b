"""Pretrained encoders from local files in torchvision's names: state dicts the tests write themselves
(torchvision's key names and shapes, spelled out here from its architecture), loaded by name."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, fp32, raw_params

from medfusion.config import load_params, params_from_dict
from medfusion.entries import resolve_entry
from medfusion.models import build_model
from medfusion.models.pretrained import PretrainedError, adapt_input_conv, load_pretrained


def _bn(prefix: str, c: int) -> dict[str, torch.Size]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}  # fmt: skip


def torchvision_resnet18_shapes() -> dict[str, tuple]:
    """torchvision's resnet18 state dict: names and shapes."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    c_in = 64
    for layer, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            first = c_in if block == 0 else width
            shapes[f"{p}.conv1.weight"] = (width, first, 3, 3)
            shapes.update(_bn(f"{p}.bn1", width))
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes.update(_bn(f"{p}.bn2", width))
            if block == 0 and layer > 1:
                shapes[f"{p}.downsample.0.weight"] = (width, c_in, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", width))
        c_in = width
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
    return shapes


def torchvision_resnet50_shapes(base: int = 64) -> dict[str, tuple]:
    """torchvision's resnet50 names and shapes (bottlenecks 3, 4, 6, 3; stride on the 3x3), at width `base`."""
    shapes = {"conv1.weight": (base, 3, 7, 7), **_bn("bn1", base)}
    c_in = base
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        width = base * 2 ** (layer - 1)
        for block in range(blocks):
            p = f"layer{layer}.{block}"
            shapes[f"{p}.conv1.weight"] = (width, c_in if block == 0 else 4 * width, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            for i, c in ((1, width), (2, width), (3, 4 * width)):
                shapes.update(_bn(f"{p}.bn{i}", c))
            if block == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, c_in, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", 4 * width))
        c_in = 4 * width
    shapes["fc.weight"], shapes["fc.bias"] = (1000, c_in), (1000,)
    return shapes


def torchvision_vgg16_bn_shapes() -> dict[str, tuple]:
    """torchvision's vgg16_bn: features = per conv (Conv, BN, ReLU), a max-pool after each block."""
    shapes, index, c_in = {}, 0, 3
    for n, width in zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512), strict=True):
        for _ in range(n):
            shapes[f"features.{index}.weight"], shapes[f"features.{index}.bias"] = (
                (width, c_in, 3, 3),
                (width,),
            )
            shapes.update(_bn(f"features.{index + 1}", width))
            index, c_in = index + 3, width
        index += 1
    for i, (o, c) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096)), strict=True):
        shapes[f"classifier.{i}.weight"], shapes[f"classifier.{i}.bias"] = (o, c), (o,)
    return shapes


def _state_dict(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Distinct values per tensor (so a wrong mapping shows); positive running variances."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


def test_torchvision_resnet_fills_deeplabv3s_backbone(tmp_path):
    source = _state_dict(torchvision_resnet18_shapes())
    path = tmp_path / "resnet18.pth"
    torch.save(source, path)
    model = build_model("deeplabv3", 3, 2, base_channels=64, depth=18, output_stride=16, aspp_channels=32)
    head_before = model.head[1].weight.clone()
    counts = load_pretrained(model, "deeplabv3", path)
    ours = model.state_dict()
    assert counts == {"loaded": len(source) - 2, "ignored": 2}  # fc.weight, fc.bias left out
    assert torch.equal(ours["backbone.stem.0.weight"], source["conv1.weight"])
    assert torch.equal(ours["backbone.stem.1.running_var"], source["bn1.running_var"])
    assert torch.equal(ours["backbone.stages.2.1.body.1.weight"], source["layer3.1.conv2.weight"])
    assert torch.equal(ours["backbone.stages.3.0.shortcut.1.bias"], source["layer4.0.downsample.1.bias"])
    assert torch.equal(model.head[1].weight, head_before)  # the decoder is not touched
    # a grey dataset: the RGB filters summed; two channels: repeated and scaled by 3/2
    grey = build_model("deeplabv3", 1, 2, base_channels=64, depth=18, output_stride=16, aspp_channels=32)
    load_pretrained(grey, "deeplabv3", path)
    assert torch.allclose(grey.backbone.stem[0].weight, source["conv1.weight"].sum(1, keepdim=True))
    w = source["conv1.weight"]
    assert torch.allclose(adapt_input_conv(w, 2), torch.cat([w[:, :1], w[:, 1:2]], 1) * 1.5)


def test_resnet50_bottlenecks_map_conv_by_conv(tmp_path):
    """ResNet-50's names (at width 8 to stay small: the names and shape rules are the same)."""
    source = _state_dict(torchvision_resnet50_shapes(8))
    torch.save(source, tmp_path / "r50.pth")
    model = build_model("deeplabv3", 3, 2, base_channels=8, depth=50, output_stride=8, aspp_channels=16)
    load_pretrained(model, "deeplabv3", tmp_path / "r50.pth")
    ours = model.state_dict()
    assert torch.equal(ours["backbone.stages.2.5.body.2.weight"], source["layer3.5.conv3.weight"])
    assert torch.equal(ours["backbone.stages.2.5.body.3.running_mean"], source["layer3.5.bn3.running_mean"])
    assert torch.equal(ours["backbone.stages.0.0.shortcut.0.weight"], source["layer1.0.downsample.0.weight"])


def test_files_that_do_not_fit_are_refused_by_key(tmp_path):
    shapes = torchvision_resnet18_shapes()
    model = build_model("deeplabv3", 3, 2, base_channels=64, depth=18, output_stride=16, aspp_channels=32)
    source = _state_dict(shapes)
    del source["layer2.1.bn2.weight"]
    source["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(source, tmp_path / "broken.pth")
    with pytest.raises(PretrainedError) as e:
        load_pretrained(model, "deeplabv3", tmp_path / "broken.pth")
    message = str(e.value)
    assert "deeplabv3.pretrained" in message and "broken.pth" in message
    assert "1 missing: backbone.stages.1.1.body.2.weight" in message
    assert "1 unexpected: layer5.0.conv1.weight" in message
    narrow = build_model("deeplabv3", 3, 2, base_channels=16, depth=18, output_stride=16, aspp_channels=32)
    torch.save(_state_dict(shapes), tmp_path / "r18.pth")
    with pytest.raises(
        PretrainedError,
        match=r"of the wrong shape: backbone.stem.0.weight: file \(64, 3, 7, 7\), model \(16, 3, 7, 7\)",
    ):
        load_pretrained(narrow, "deeplabv3", tmp_path / "r18.pth")
    before = narrow.state_dict()["backbone.stem.0.weight"].clone()
    assert torch.equal(narrow.state_dict()["backbone.stem.0.weight"], before)  # nothing was changed
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(narrow, "deeplabv3", tmp_path / "nothing.pth")
    with pytest.raises(PretrainedError, match="no standard pretrained encoder is known for unet"):
        load_pretrained(build_model("unet", 3, 2, base_channels=4), "unet", tmp_path / "r18.pth")


def test_torchvision_vgg16_bn_fills_segnets_encoder_with_the_conv_bias_folded(tmp_path):
    source = _state_dict(torchvision_vgg16_bn_shapes())
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "vgg.pth")  # wrapped
    model = build_model("segnet", 3, 2, base_channels=64)
    counts = load_pretrained(model, "segnet", tmp_path / "vgg.pth")
    assert counts["ignored"] == 6  # the classifier
    ours = model.state_dict()
    assert torch.equal(ours["encoders.4.2.0.weight"], source["features.40.weight"])  # the 13th conv
    assert torch.equal(ours["encoders.1.0.1.weight"], source["features.8.weight"])  # block 2's first BN
    # Conv(+bias) -> BN in evaluation is what our bias-free conv -> BN computes with the folded mean
    x = torch.randn(2, 3, 16, 16)
    bn = {k: source[f"features.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    expected = F.batch_norm(
        F.conv2d(x, source["features.0.weight"], source["features.0.bias"], padding=1),
        bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False,
    )  # fmt: skip
    block = model.encoders[0][0].eval()
    assert torch.allclose(block[1](block[0](x)), expected, atol=1e-4)


def test_the_pretrained_key_reaches_training_and_the_run_hash(tmp_path, synthetic_processed):
    torch.save(_state_dict(torchvision_resnet18_shapes()), tmp_path / "r18.pth")
    raw = raw_params()
    raw["deeplabv3"].update(
        base_channels=64, depth=18, aspp_channels=32, pretrained=str(tmp_path / "r18.pth")
    )
    params = params_from_dict(raw)
    entry = resolve_entry(params, "kvasir_seg", "deeplabv3")
    assert "pretrained" not in entry.model.kwargs  # not a constructor argument
    scratch = dataclasses.replace(entry, pretrained=None)
    assert entry.run_hash("d", {}, 0, 0) != scratch.run_hash("d", {}, 0, 0)
    same = entry.run_hash("d", {}, 0, 0)
    source = torch.load(tmp_path / "r18.pth")
    source["fc.bias"] += 1  # another file at the same path: another run
    torch.save(source, tmp_path / "r18.pth")
    assert entry.run_hash("d", {}, 0, 0) != same
    assert entry.checkpoint_record()["pretrained"]["file"] == str(tmp_path / "r18.pth")
    assert load_params(REPO / "params.yaml").deeplabv3.pretrained is None  # from scratch by default
    # training starts from it: build_trainer loads the file into the model it trains
    from medfusion.entries import Resources
    from medfusion.training.fold import build_trainer

    processed, split = synthetic_processed
    synthetic = dataclasses.replace(resolve_entry(params, "synthetic", "deeplabv3"), augment=None)
    trainer = build_trainer(synthetic, processed, split["folds"][0], 0, Resources(), fp32())
    weights = trainer.model.state_dict()
    assert torch.equal(weights["backbone.stages.0.1.body.0.0.weight"], source["layer1.1.conv1.weight"])
    missing = dataclasses.replace(entry, pretrained=str(tmp_path / "gone.pth"))
    with pytest.raises(PretrainedError, match=r"deeplabv3.pretrained: .*gone.pth does not exist"):
        missing.run_hash("d", {}, 0, 0)


def timm_vit_r50_shapes(base: int, hidden: int, layers: int, mlp: int, grid: int = 14) -> dict[str, tuple]:
    """timm's vit_base_r50_s16 hybrid names and shapes (ResNetV2 stages of 3, 4, 9 with GN, then ViT),
    at widths `base` (64 in timm) and `hidden` (768)."""
    b = "patch_embed.backbone."
    shapes = {
        f"{b}stem.conv.weight": (base, 3, 7, 7),
        f"{b}stem.norm.weight": (base,),
        f"{b}stem.norm.bias": (base,),
    }
    c_in = base
    for stage, blocks in enumerate((3, 4, 9)):
        width = base * 2**stage
        for block in range(blocks):
            p = f"{b}stages.{stage}.blocks.{block}."
            if block == 0:
                shapes[p + "downsample.conv.weight"] = (4 * width, c_in, 1, 1)
                shapes[p + "downsample.norm.weight"] = shapes[p + "downsample.norm.bias"] = (4 * width,)
            shapes[p + "conv1.weight"] = (width, c_in if block == 0 else 4 * width, 1, 1)
            shapes[p + "conv2.weight"] = (width, width, 3, 3)
            shapes[p + "conv3.weight"] = (4 * width, width, 1, 1)
            for i, c in ((1, width), (2, width), (3, 4 * width)):
                shapes[f"{p}norm{i}.weight"] = shapes[f"{p}norm{i}.bias"] = (c,)
        c_in = 4 * width
    shapes["patch_embed.proj.weight"], shapes["patch_embed.proj.bias"] = (hidden, c_in, 1, 1), (hidden,)
    shapes["cls_token"], shapes["pos_embed"] = (1, 1, hidden), (1, 1 + grid * grid, hidden)
    for k in range(layers):
        p = f"blocks.{k}."
        shapes.update({p + "norm1.weight": (hidden,), p + "norm1.bias": (hidden,), p + "norm2.weight": (hidden,),
                       p + "norm2.bias": (hidden,), p + "attn.qkv.weight": (3 * hidden, hidden),
                       p + "attn.qkv.bias": (3 * hidden,), p + "attn.proj.weight": (hidden, hidden),
                       p + "attn.proj.bias": (hidden,), p + "mlp.fc1.weight": (mlp, hidden), p + "mlp.fc1.bias": (mlp,),
                       p + "mlp.fc2.weight": (hidden, mlp), p + "mlp.fc2.bias": (hidden,)})  # fmt: skip
    shapes.update(
        {
            "norm.weight": (hidden,),
            "norm.bias": (hidden,),
            "head.weight": (1000, hidden),
            "head.bias": (1000,),
        }
    )
    return shapes


def _timm_block(x, s, p, heads):
    """timm's ViT block, written out: x + proj(attention(norm1 x)), then x + fc2(gelu(fc1(norm2 x)))."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
    q, k, v = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).chunk(3, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5).softmax(-1)
    out = (attn @ split(v)).transpose(1, 2).reshape(x.shape)
    x = x + F.linear(out, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
    h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
    h = F.linear(
        F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
        s[p + "mlp.fc2.weight"],
        s[p + "mlp.fc2.bias"],
    )
    return x + h


def test_timm_r50_vit_hybrid_fills_transunets_encoder(tmp_path):
    kwargs = dict(
        base_channels=16,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        decoder_scale=0.25,
        image_size=64,
    )
    source = _state_dict(timm_vit_r50_shapes(16, 32, 2, 64))
    torch.save(source, tmp_path / "hybrid.pth")
    model = build_model("transunet", 3, 2, **kwargs).eval()
    counts = load_pretrained(model, "transunet", tmp_path / "hybrid.pth")
    assert counts["ignored"] == 3  # cls_token, head.weight, head.bias
    ours = model.state_dict()
    assert torch.equal(
        ours["cnn.stages.2.8.body.3.weight"], source["patch_embed.backbone.stages.2.blocks.8.norm3.weight"]
    )
    assert torch.equal(
        ours["cnn.stages.1.0.shortcut.0.weight"],
        source["patch_embed.backbone.stages.1.blocks.0.downsample.conv.weight"],
    )
    assert torch.equal(ours["patch_embed.weight"], source["patch_embed.proj.weight"])
    grid = source["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)  # the class entry dropped
    assert torch.allclose(
        ours["pos.weight"], F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    )
    # the ViT computes what timm's blocks compute with these weights
    x = torch.randn(2, 16, 32)
    expected = x
    for k in range(2):
        expected = _timm_block(expected, source, f"blocks.{k}.", heads=4)
    expected = F.layer_norm(expected, (32,), source["norm.weight"], source["norm.bias"], eps=1e-5)
    with torch.no_grad():
        assert torch.allclose(model.vit(x), expected, atol=1e-4)
    batch = build_model("transunet", 3, 2, **{**kwargs, "norm": "batch"})
    with pytest.raises(PretrainedError, match="set transunet.norm: group"):
        load_pretrained(batch, "transunet", tmp_path / "hybrid.pth")
