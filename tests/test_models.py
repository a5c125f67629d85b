import pytest
import torch

from medfusion.models import MODELS, build_model

TINY_KWARGS = {"unet": {"base_channels": 4}, "attention_unet": {"base_channels": 4}}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 3), (3, 2)])
def test_model_contract(name, in_channels, num_classes):
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, **TINY_KWARGS[name])
    x = torch.randn(2, in_channels, 64, 48)
    logits = model(x)  # (2, C_in, 64, 48) -> (2, K, 64, 48)
    assert logits.shape == (2, num_classes, 64, 48)
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_input_size_not_multiple_of_16_is_a_clear_error(name):
    model = build_model(name, 1, 2, **TINY_KWARGS[name])
    with pytest.raises(ValueError, match="40x64 is not a multiple of 16"):
        model(torch.randn(1, 1, 40, 64))


def test_unknown_model_lists_the_registry():
    with pytest.raises(KeyError, match=r"unknown model 'vnet'; choose from \['attention_unet', 'unet'\]"):
        build_model("vnet", 1, 2)


def test_unet_widths_follow_base_channels():
    small = sum(p.numel() for p in build_model("unet", 3, 2, base_channels=8).parameters())
    large = sum(p.numel() for p in build_model("unet", 3, 2, base_channels=16).parameters())
    assert 3.5 < large / small < 4.1  # conv weights scale with width squared
    assert (
        sum(p.numel() for p in build_model("unet", 1, 2, base_channels=64).parameters()) > 30e6
    )  # paper size


def test_attention_gate_coefficients_are_in_unit_range_and_shaped_like_the_skip():
    from medfusion.models.attention_unet import AttentionGate

    gate = AttentionGate(skip_channels=8, gate_channels=16, inter_channels=4)
    x, g = torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16)
    assert gate(x, g).shape == x.shape
    alpha = gate.coefficients(x, g)
    assert alpha.shape == (2, 1, 32, 32) and (alpha >= 0).all() and (alpha <= 1).all()


def test_attention_unet_adds_only_the_gates_to_unet():
    unet = sum(p.numel() for p in build_model("unet", 3, 2, base_channels=8).parameters())
    att = build_model("attention_unet", 3, 2, base_channels=8)
    gates = sum(p.numel() for p in att.gates.parameters())
    assert sum(p.numel() for p in att.parameters()) == unet + gates
