from __future__ import annotations

import pytest
import torch

from ips.encoders import create_encoder, list_encoders, register_encoder


def _input(name: str, channels: int) -> torch.Tensor:
    if name == "features":
        return torch.randn(4, 10)
    return torch.rand(4, channels, 32, 32)


@pytest.mark.parametrize("name", list_encoders())
@pytest.mark.parametrize("channels", [1, 3])
def test_every_encoder_maps_patches_to_embed_dim(name, channels):
    encoder = create_encoder(name, in_channels=channels, embed_dim=24, feature_dim=10)
    assert encoder(_input(name, channels)).shape == (4, 24)


@pytest.mark.parametrize("name", list_encoders())
def test_gradients_reach_every_encoder_parameter(name):
    encoder = create_encoder(name, in_channels=3, embed_dim=24, feature_dim=10)
    encoder(_input(name, 3)).square().sum().backward()
    missing = [k for k, p in encoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_trunk_widths_follow_the_reference():
    for name, width in [
        ("resnet18_2blocks", 128),
        ("resnet18_4blocks", 512),
        ("resnet50_4blocks", 2048),
    ]:
        encoder = create_encoder(name, in_channels=3, embed_dim=width)
        assert isinstance(encoder.proj, torch.nn.Identity), name


def test_one_channel_trunk_has_a_one_channel_stem():
    encoder = create_encoder("resnet18_2blocks", in_channels=1, embed_dim=128)
    conv = encoder.stem[0]
    assert conv.in_channels == 1 and conv.kernel_size == (7, 7) and conv.bias is None


def test_pretrained_weights_load_from_a_local_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    encoder = create_encoder(
        "resnet18_4blocks", in_channels=3, embed_dim=512, pretrained=str(tmp_path / "r18.pth")
    )
    assert torch.equal(encoder.stem[0].weight, reference.conv1.weight)
    grey = create_encoder(
        "resnet18_2blocks", in_channels=1, embed_dim=128, pretrained=str(tmp_path / "r18.pth")
    )
    assert torch.allclose(grey.stem[0].weight[:, 0], reference.conv1.weight.mean(1))


def test_small_cnn_keeps_full_resolution_first_and_loads_its_own_weights(tmp_path):
    encoder = create_encoder("small_cnn", in_channels=1, embed_dim=128)
    first = encoder.body[0]
    assert first.in_channels == 1 and first.stride == (1, 1) and first.kernel_size == (3, 3)
    assert encoder.forward_features(torch.rand(2, 1, 48, 48)).shape == (2, 128, 6, 6)
    assert isinstance(encoder.proj, torch.nn.Identity)  # its width is 128 already
    for p in encoder.parameters():
        torch.nn.init.normal_(p)
    torch.save(encoder.state_dict(), tmp_path / "cnn.pth")
    loaded = create_encoder(
        "small_cnn", in_channels=1, embed_dim=128, pretrained=str(tmp_path / "cnn.pth")
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="cnn.pth does not fit small_cnn"):
        create_encoder(
            "small_cnn", in_channels=3, embed_dim=64, pretrained=str(tmp_path / "cnn.pth")
        )
    with pytest.raises(ValueError, match="small_cnn has no published weights"):
        create_encoder("small_cnn", in_channels=1, embed_dim=128, pretrained=True)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        create_encoder("resnet18_2blocks", pretrained=str(tmp_path / "nothing.pth"))


def test_unknown_encoder_and_duplicate_registration_raise():
    with pytest.raises(ValueError, match="unknown encoder 'resnet19'"):
        create_encoder("resnet19")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("features")(lambda **_: None)


def test_pretrained_trunks_carry_the_normalisation_their_weights_expect():
    from ips.config import ModelConfig
    from ips.encoders import IMAGENET_MEAN, IMAGENET_STD, with_weights_normalization

    rgb = with_weights_normalization(
        ModelConfig(encoder="resnet18_4blocks", in_channels=3, pretrained="w.pt")
    )
    assert (rgb.normalize_mean, rgb.normalize_std) == (IMAGENET_MEAN, IMAGENET_STD)
    grey = with_weights_normalization(ModelConfig(encoder="resnet18_2blocks", pretrained=True))
    assert grey.normalize_mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    untrained = ModelConfig(encoder="resnet18_2blocks")
    assert with_weights_normalization(untrained) == untrained
    chosen = ModelConfig(
        encoder="resnet18_2blocks", pretrained=True, normalize_mean=(0.5,), normalize_std=(0.2,)
    )
    assert with_weights_normalization(chosen) == chosen  # what the user set stays
    assert (
        with_weights_normalization(
            ModelConfig(encoder="small_cnn", pretrained="w.pt")
        ).normalize_mean
        is None
    )
