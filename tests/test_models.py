import math

import pytest
import torch
from conftest import tiny_kwargs

from medfusion.models import MODELS, build_model

# Each params section's TINY widths, so that every model runs in well under a second on CPU; CASNet's
# transformer fuses at both scales here. Defaults are the papers'.
TINY_KWARGS = tiny_kwargs()
TINY_KWARGS["casnet"] = {**TINY_KWARGS["casnet"], "transformer_scales": [16, 8]}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_papers_seven_models():
    assert set(MODELS) == {"casnet", "unet", "segnet", "deeplabv3", "attention_unet", "transunet", "medt"}
    assert set(TINY_KWARGS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 3), (3, 2), (2, 2)])
def test_model_contract(name, in_channels, num_classes):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, **TINY_KWARGS[name])
    x = torch.randn(2, in_channels, 64, 48)
    logits = model(x)  # (2, C_in, 64, 48) -> (2, K, 64, 48)
    assert logits.shape == (2, num_classes, 64, 48)
    assert torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []  # every parameter learns
    assert list(model.parameters())[-2].grad.abs().sum() > 0  # the classifier's weight


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_size_not_multiple_of_16_is_a_clear_error(name):
    model = build_model(name, 1, 2, **TINY_KWARGS[name])
    with pytest.raises(ValueError, match="40x64 is not a multiple of 16"):
        model(torch.randn(1, 1, 40, 64))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_output_is_deterministic_for_a_fixed_seed(name):
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build_model(name, 3, 2, **TINY_KWARGS[name]).eval()
        with torch.no_grad():
            outputs.append(model(torch.ones(1, 3, 32, 32)))
    assert torch.equal(outputs[0], outputs[1])


def test_unknown_model_lists_the_registry():
    with pytest.raises(
        KeyError, match=r"unknown model 'vnet'; choose from \['attention_unet', 'casnet', 'deeplabv3'"
    ):
        build_model("vnet", 1, 2)


def test_paper_sizes():
    """Default widths are the papers': U-Net ~31 M, SegNet (VGG16) 29.4 M, TransUNet R50-ViT-B/16 ~105 M."""
    assert 30e6 < n_params(build_model("unet", 1, 2)) < 32e6
    assert 29e6 < n_params(build_model("segnet", 3, 2)) < 30e6
    assert 104e6 < n_params(build_model("transunet", 3, 2)) < 107e6
    assert 38e6 < n_params(build_model("deeplabv3", 3, 2)) < 42e6  # ResNet-50 + ASPP


def test_unet_widths_follow_base_channels():
    small = n_params(build_model("unet", 3, 2, base_channels=8))
    large = n_params(build_model("unet", 3, 2, base_channels=16))
    assert 3.5 < large / small < 4.1  # conv weights scale with width squared


# --- CASNet ---------------------------------------------------------------------------------------


def casnet(**changes):
    """A CASNet of width 4 (the channel counts below are worked out for it)."""
    kwargs = {**TINY_KWARGS["casnet"], "base_channels": 4, "transformer_dim": 16, **changes}
    return build_model("casnet", kwargs.pop("in_channels", 3), 2, **kwargs)


@pytest.mark.parametrize(
    ("switch", "module"),
    [
        ("use_hfe", "skip_attention"),
        ("use_attention", "bottleneck_attention"),
        ("use_msf", "msf"),
        ("use_transformer", "fusion"),
    ],  # fmt: skip
)
def test_each_switch_removes_its_module(switch, module):
    full, ablated = casnet(), casnet(**{switch: False})
    assert n_params(ablated) < n_params(full)
    assert getattr(ablated, module) in (None, {}) or len(getattr(ablated, module)) == 0
    assert ablated(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)


def test_without_hfe_the_decoder_sees_no_skip():
    model = casnet(use_hfe=False)
    assert [d[0].in_channels for d in model.decoders] == [64, 32, 16, 8]  # 2w_i, no skip channels
    assert [d[0].in_channels for d in casnet().decoders] == [96, 48, 24, 12]  # 2w_i + w_i
    assert "8" not in model.fusion  # the 1/8-scale fusion lives on a skip


def test_contextual_attention_starts_at_half_and_blends():
    from medfusion.models.casnet import ContextualAttention

    ca = ContextualAttention(16)
    assert ca.alpha.item() == 0.5 and ca.theta.requires_grad
    f = torch.randn(2, 16, 8, 12)
    out = ca(f)
    assert out.shape == f.shape
    # alpha -> 0 gives back F; the gate is in (0, 1), so |out| <= |F| elementwise
    with torch.no_grad():
        ca.theta.fill_(-50.0)
    assert torch.allclose(ca(f), f, atol=1e-6)
    assert (out.abs() <= f.abs() + 1e-6).all()


def test_contextual_attention_matches_the_formula():
    from medfusion.models.casnet import ContextualAttention

    torch.manual_seed(0)
    ca = ContextualAttention(16).eval()
    with torch.no_grad():
        ca.theta.fill_(0.3)
    f = torch.randn(2, 16, 8, 12)
    with torch.no_grad():
        a_c = torch.sigmoid(ca.channel(f.mean((2, 3), keepdim=True)))
        z_h = ca.axis_shared(f.mean(3, keepdim=True))
        z_w = ca.axis_shared(f.mean(2, keepdim=True))  # the shared 1x1 conv-BN(eval)-ReLU is pointwise
        a_h, a_w = torch.sigmoid(ca.axis_h(z_h)), torch.sigmoid(ca.axis_w(z_w))
        s = torch.sigmoid(ca.local(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)))
        alpha = torch.sigmoid(torch.tensor(0.3))
        expected = alpha * f * a_c * a_h * a_w * s + (1 - alpha) * f
        assert torch.allclose(ca(f), expected, atol=1e-5)


def test_msf_branch_weights_are_a_softmax():
    model = casnet(atrous_rates=[1, 2, 4, 6])
    weights = model.msf.branch_weights()
    assert weights.shape == (4,) and torch.allclose(weights.sum(), torch.tensor(1.0))
    assert torch.allclose(weights, torch.full((4,), 0.25))  # phi starts at 0
    assert [b[0].dilation for b in model.msf.branches] == [(1, 1), (2, 2), (4, 4), (6, 6)]


def test_two_modalities_share_the_encoder_and_attend_to_each_other():
    torch.manual_seed(0)
    model = casnet(in_channels=2, modalities=2).eval()
    single = casnet(in_channels=1, modalities=1)
    assert model.encoder.stages[0][0].in_channels == 1  # one modality at a time
    assert model.fusion["16"].modality.shape == (2, 16) and single.fusion["16"].modality is None
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        base = model(x)
        changed = x.clone()
        changed[:, 1] = torch.randn(32, 32)  # change only the second modality
        assert not torch.allclose(model(changed), base)
    model.train()(torch.randn(2, 2, 32, 32)).square().mean().backward()
    assert model.fusion["16"].modality.grad.abs().sum() > 0  # the modality embeddings learn
    with pytest.raises(ValueError, match="cannot be split into 2 equal modalities"):
        casnet(in_channels=3, modalities=2)


def test_position_embedding_follows_the_input_size():
    model = casnet().eval()
    with torch.no_grad():
        for size in (16, 48, 80):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 2, size, size)


# --- baselines ------------------------------------------------------------------------------------


def test_segnet_upsamples_only_with_pooling_indices():
    model = build_model("segnet", 3, 2, base_channels=4)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d | torch.nn.Upsample) for m in model.modules())
    assert [len(e) for e in model.encoders] == [2, 2, 3, 3, 3]  # VGG16's 13 convolutions
    # unpooling puts each value back where the max was: a single bright pixel comes back in place
    pooled, indices = model.pool(torch.zeros(1, 1, 4, 4).index_put_((torch.tensor([0]), torch.tensor([0]),
                                                                      torch.tensor([3]), torch.tensor([2])),
                                                                     torch.tensor(5.0)))  # fmt: skip
    restored = model.unpool(pooled, indices, output_size=(4, 4))
    assert restored[0, 0, 3, 2] == 5.0 and restored.sum() == 5.0


@pytest.mark.parametrize(("output_stride", "size"), [(16, 4), (8, 8)])
def test_deeplabv3_output_stride(output_stride, size):
    model = build_model(
        "deeplabv3", 3, 2, base_channels=4, depth=50, output_stride=output_stride, aspp_channels=8
    )
    assert model.backbone(torch.randn(1, 3, 64, 64))[-1].shape[-1] == size
    assert model.backbone.out_channels[-1] == 4 * 8 * 4  # ResNet-50: bottleneck expansion 4
    assert len(model.aspp.branches) == 4  # 1x1 + three atrous rates, plus image pooling


def test_transunet_encodes_the_1_16_map_with_a_vit():
    model = build_model("transunet", 3, 2, **TINY_KWARGS["transunet"])
    assert [len(s) for s in model.cnn.stages] == [3, 4, 9]  # R50 hybrid stages
    assert model.pos.weight.shape[-1] == 16  # 256 / 16 tokens per side at the reference size
    assert len(model.vit.layers.layers) == TINY_KWARGS["transunet"]["num_layers"]


def test_transunet_r50_has_group_norm_and_weight_standardisation():
    from medfusion.models.resnet import StdConv2d

    model = build_model("transunet", 3, 2, **TINY_KWARGS["transunet"])  # norm: group, the default
    cnn = list(model.cnn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn)
    assert all(type(m) is StdConv2d for m in cnn if isinstance(m, torch.nn.Conv2d))
    norms = [m for m in cnn if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == math.gcd(32, m.num_channels) and m.eps == 1e-6 for m in norms)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())  # BN in the decoder
    batch = build_model("transunet", 3, 2, **{**TINY_KWARGS["transunet"], "norm": "batch"})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch.cnn.modules())
    # weight standardisation: the same output as a plain convolution with standardised filters
    layer = StdConv2d(3, 4, 3, padding=1, bias=False)
    w = layer.weight
    standard = (w - w.mean((1, 2, 3), keepdim=True)) / (
        w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5
    ).sqrt()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(layer(x), torch.nn.functional.conv2d(x, standard, padding=1), atol=1e-5)


def test_medt_gated_axial_attention():
    from medfusion.models.medt import GatedAxialAttention

    layer = GatedAxialAttention(8, heads=2, span=6, axis="width").eval()  # BN statistics fixed
    gates = [layer.gate_q, layer.gate_k, layer.gate_v1, layer.gate_v2]
    assert [round(g.item(), 3) for g in gates] == [0.1, 0.1, 1.0, 0.1] and all(g.requires_grad for g in gates)
    rel = layer.relative_embeddings(6)
    assert rel.shape == (8, 6, 6) and torch.equal(
        rel[:, 2, 1], layer.relative[:, 6]
    )  # offset +1 -> 6 + 1 - 1
    x = torch.randn(2, 8, 5, 6)
    out = layer(x)
    assert out.shape == x.shape
    # attention along width mixes only within a row
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert torch.allclose(layer(x2)[:, :, 1:], out[:, :, 1:], atol=1e-6)
    assert layer.relative_embeddings(10).shape == (8, 10, 10)  # other lengths: the table is resized


def test_medt_local_branch_sees_patches():
    model = build_model("medt", 1, 2, **TINY_KWARGS["medt"]).eval()
    with torch.no_grad():
        x = torch.randn(1, 1, 64, 64)
        out = model(x)
        # the local branch sees each 16 x 16 patch alone: changing one patch changes no other patch's output
        changed = x.clone()
        changed[..., :16, :16] += 5.0
        patches = model.local_branch(
            changed.reshape(1, 1, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(16, 1, 16, 16)
        )
        before = model.local_branch(
            x.reshape(1, 1, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(16, 1, 16, 16)
        )
        assert patches.shape == (16, 8, 16, 16) and out.shape == (1, 2, 64, 64)
        assert not torch.allclose(patches[0], before[0]) and torch.allclose(patches[1:], before[1:])


def test_medt_at_the_authors_size():
    """The authors' medt_net (s = 0.125, blocks [1, 2, 4, 1], 8 heads) at 3 channels and 128x128:
    about 1.4 M parameters; the local branch has four stages (the last at 1/16 of a patch) and no
    positional terms, the global branch two, gated."""
    model = build_model(
        "medt", 3, 2, base_channels=32, heads=8, local_grid=4, blocks=[1, 2, 4, 1], image_size=128
    )
    assert 1.3e6 < sum(p.numel() for p in model.parameters()) < 1.45e6
    assert [len(s) for s in model.local_branch.stages] == [1, 2, 4, 1]
    assert [len(s) for s in model.global_branch.stages] == [1, 2]
    local_attention = model.local_branch.stages[0][0].attention[0]
    assert not local_attention.positional and not hasattr(local_attention, "relative")
    assert model.global_branch.stages[0][0].attention[0].positional
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 2, 128, 128)
    with pytest.raises(ValueError, match=r"input side 96 is not a multiple of .* = 64"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"reference size .* 48 is not a multiple"):
        build_model("medt", 3, 2, image_size=48)


def test_compile_regions_are_the_attention_blocks_only():
    from medfusion.models import compile_regions
    from medfusion.models.attention_unet import AttentionGate
    from medfusion.models.casnet import ContextualAttention

    casnet = build_model("casnet", 3, 2, base_channels=4, transformer_dim=16, transformer_layers=1)
    assert len(compile_regions(casnet)) == 5 and all(
        isinstance(m, ContextualAttention) for m in compile_regions(casnet)
    )
    gates = compile_regions(build_model("attention_unet", 3, 2, base_channels=4))
    assert len(gates) == 4 and all(isinstance(m, AttentionGate) for m in gates)
    assert compile_regions(build_model("unet", 3, 2, base_channels=4)) == []
    assert compile_regions(build_model("casnet", 3, 2, base_channels=4, use_attention=False)) == []


def test_compiled_regions_match_eager_and_keep_parameter_names():
    """One attention block (no skips) so that a single graph compiles: forward and gradients agree."""
    from medfusion.models import compile_model

    torch.manual_seed(0)
    kwargs = dict(base_channels=4, transformer_dim=16, transformer_layers=1, use_hfe=False)
    eager = build_model("casnet", 1, 2, **kwargs)
    compiled = build_model("casnet", 1, 2, **kwargs)
    compiled.load_state_dict(eager.state_dict())
    assert compile_model(compiled, "regions") == 1
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 1, 32, 32)
    outs = []
    for model in (eager, compiled):
        model.train()
        out = model(x)
        out.square().mean().backward()
        outs.append((out.detach(), model.bottleneck_attention.theta.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-3, atol=1e-6)


def test_compile_choice_is_checked():
    from medfusion.models import compile_model

    with pytest.raises(ValueError, match="train.compile = 'fast'"):
        compile_model(build_model("unet", 3, 2, base_channels=4), "fast")
