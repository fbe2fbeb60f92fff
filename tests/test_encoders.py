from __future__ import annotations

import re

import pytest
import torch

from ips.encoders import PRESETS, create_encoder, list_encoders, register_encoder

BUILT_HERE = [n for n in list_encoders() if n not in PRESETS]  # presets: small versions below


def _input(name: str, channels: int) -> torch.Tensor:
    if name == "features":
        return torch.randn(4, 10)
    return torch.rand(4, channels, 32, 32)


@pytest.mark.parametrize("name", BUILT_HERE)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_encoder_maps_patches_to_embed_dim(name, channels):
    encoder = create_encoder(name, in_channels=channels, embed_dim=24, feature_dim=10)
    assert encoder(_input(name, channels)).shape == (4, 24)


@pytest.mark.parametrize("name", BUILT_HERE)
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
    _loads_its_own_weights(encoder, "small_cnn", tmp_path, in_channels=1, embed_dim=128)


def _loads_its_own_weights(encoder, name, tmp_path, *, in_channels, embed_dim):
    """`name` loads a state dict saved from `encoder` exactly, names a misfit one, and has no
    published weights to download."""
    for p in encoder.parameters():
        torch.nn.init.normal_(p)
    path = str(tmp_path / "cnn.pth")
    torch.save(encoder.state_dict(), path)
    loaded = create_encoder(name, in_channels=in_channels, embed_dim=embed_dim, pretrained=path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match=f"cnn.pth does not fit {name}"):
        create_encoder(name, in_channels=in_channels + 2, embed_dim=embed_dim * 2, pretrained=path)
    with pytest.raises(ValueError, match=f"{name} has no published weights"):
        create_encoder(name, in_channels=in_channels, embed_dim=embed_dim, pretrained=True)


def test_strided_cnn_quarters_resolution_in_its_stem_and_loads_its_own_weights(tmp_path):
    encoder = create_encoder("strided_cnn", in_channels=1, embed_dim=64)
    stem = encoder.body[0]
    assert stem.stride == (2, 2) and stem.kernel_size == (5, 5)
    assert encoder.forward_features(torch.rand(2, 1, 50, 50)).shape == (2, 128, 6, 6)
    assert encoder(torch.rand(3, 1, 50, 50)).shape == (3, 64)  # projected to D
    encoder.set_grad_checkpointing(True)
    x = torch.rand(2, 1, 50, 50, requires_grad=True)
    encoder(x).sum().backward()  # the checkpointed stages cover the whole body
    assert x.grad is not None and x.grad.abs().sum() > 0
    _loads_its_own_weights(encoder, "strided_cnn", tmp_path, in_channels=1, embed_dim=64)


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


# ---- timm backbones and pathology foundation models --------------------------------------------

TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)  # each preset's architecture, made small


def _tiny(name: str, **extra):
    from ips.encoders import build_timm

    torch.manual_seed(0)
    swiglu = dict(PRESETS[name].kwargs).get("mlp_layer") or "dinov2" in PRESETS[name].arch
    small = {**TINY_VIT, **({"mlp_ratio": 4.0} if swiglu else {})}  # an even SwiGLU width
    return build_timm(PRESETS[name], name=name, **small, **extra).eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_at_full_size_with_the_registered_width(name):
    from ips.encoders import build_timm

    with torch.device("meta"):  # no memory: shapes only
        encoder = build_timm(PRESETS[name], name=name)
    assert encoder.width == PRESETS[name].width and isinstance(encoder.proj, torch.nn.Identity)
    keys = encoder.trunk.state_dict()
    if ("init_values", 1e-5) in PRESETS[name].kwargs:  # LayerScale: the weights a lax load drops
        assert "blocks.0.ls1.gamma" in keys


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gradients_reach_every_parameter_of_a_small_preset(name):
    encoder = _tiny(name)
    encoder.train()
    encoder(torch.rand(2, 3, 224, 224)).square().sum().backward()
    missing = [k for k, p in encoder.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_saved_state_dict_loads_strictly_and_gives_identical_embeddings(name, tmp_path):
    encoder = _tiny(name)
    path = tmp_path / "weights.pth"
    torch.save(encoder.trunk.state_dict(), path)
    torch.manual_seed(1)  # other random weights, then the file's
    loaded = _tiny(name, pretrained=str(path))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), encoder(x))
    state = encoder.trunk.state_dict()
    at = "trunk." if name == "conch_v1_5" else ""  # CONCH's file holds its tower: trunk.*
    broken = {
        "extra": {**state, f"{at}blocks.0.ls3.gamma": torch.ones(32)},
        "missing": {k: v for k, v in state.items() if k != f"{at}norm.weight"},
        "shape": {**state, f"{at}norm.weight": torch.ones(33)},
    }
    named = {
        "extra": f"{at}blocks.0.ls3.gamma is unexpected",
        "missing": f"{at}norm.weight is missing",
        "shape": f"{at}norm.weight has shape (33,)",
    }
    for kind, bad in broken.items():
        torch.save(bad, tmp_path / f"{kind}.pth")
        with pytest.raises(
            ValueError, match=re.escape(f"{kind}.pth does not fit {name}: {named[kind]}")
        ):
            _tiny(name, pretrained=str(tmp_path / f"{kind}.pth"))


def test_another_models_weights_are_refused_with_the_key_named(tmp_path):
    torch.save(_tiny("uni").trunk.state_dict(), tmp_path / "uni.pth")
    with pytest.raises(ValueError, match=r"uni\.pth does not fit virchow2: reg_token is missing"):
        _tiny("virchow2", pretrained=str(tmp_path / "uni.pth"))


def test_the_virchow_embedding_is_the_class_token_and_the_mean_of_the_patch_tokens():
    encoder = _tiny("virchow2")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = encoder.trunk.forward_features(x)  # (2, 1 + 4 registers + 16 x 16, 32)
        assert tokens.shape == (2, 1 + 4 + 256, 32)
        by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
        assert torch.allclose(encoder(x), by_hand) and encoder.width == 64


def test_presets_resize_or_crop_patches_to_their_input_as_their_weights_expect():
    uni, gigapath = _tiny("uni"), _tiny("prov_gigapath")
    x = torch.rand(1, 3, 256, 256)
    assert uni.prepare(x).shape[-2:] == (224, 224)  # resized
    crop = gigapath.prepare(x)  # at 256: the centre 224 (Resize 256, CenterCrop 224)
    assert torch.equal(crop, x[..., 16:240, 16:240])
    assert gigapath.prepare(torch.rand(1, 3, 512, 512)).shape[-2:] == (224, 224)


def test_the_normalisation_applied_is_the_registrys_for_training_and_extraction():
    from ips.config import ModelConfig
    from ips.encoders import H_OPTIMUS_MEAN, H_OPTIMUS_STD, with_weights_normalization
    from ips.features import build_extractor

    model = with_weights_normalization(
        ModelConfig(encoder="h_optimus_0", in_channels=3, patch_size=224, pretrained="w.bin")
    )
    assert (model.normalize_mean, model.normalize_std) == (H_OPTIMUS_MEAN, H_OPTIMUS_STD)
    extractor = build_extractor("timm:resnet18", patch_size=32)
    assert extractor.mean == (0.485, 0.456, 0.406)  # timm's own pretrained config


def test_the_hub_refusal_names_the_model_and_its_gate(monkeypatch):
    import huggingface_hub.constants

    from ips.encoders import build_timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no internet
    with pytest.raises(FileNotFoundError) as err:
        build_timm(PRESETS["uni"], name="uni", pretrained=True, **TINY_VIT)
    message = str(err.value)
    assert "MahmoodLab/UNI" in message and "HF_TOKEN" in message and "give its path" in message


def test_a_frozen_preset_trains_its_projection_in_an_ips_model():
    import ips

    model = ips.create_model(
        encoder="timm:vit_small_patch16_224",
        in_channels=3,
        patch_size=32,
        embed_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        memory_size=2,
        chunk_size=2,
        freeze_encoder=True,
        tasks={"t": {"kind": "binary"}},
    )
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not k.startswith("encoder.trunk.") for k in trainable)
    assert "encoder.proj.weight" in trainable


def _hf_layout(state: dict, blocks: int) -> dict:
    """A timm ViT state dict written in Hugging Face Dinov2Model's keys (transformers 4)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros_like(state["cls_token"][0]),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(blocks):
        b, hf = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            parts = state[b + f"attn.qkv.{leaf}"].chunk(3)
            for n, t in zip(("query", "key", "value"), parts, strict=True):
                out[hf + f"attention.attention.{n}.{leaf}"] = t
            for ours, theirs in (
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("attn.proj", "attention.output.dense"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[hf + f"{theirs}.{leaf}"] = state[b + f"{ours}.{leaf}"]
        out[hf + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
        out[hf + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
    return out


def test_phikon_weights_in_hugging_face_keys_convert_exactly(tmp_path):
    encoder = _tiny("phikon_v2")
    hf = _hf_layout(encoder.trunk.state_dict(), blocks=1)
    assert "blocks.0.attn.qkv.weight" not in hf and len(hf) > 10
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(2)
    loaded = _tiny("phikon_v2", pretrained=str(tmp_path / "model.safetensors"))
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded(x), encoder(x))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_normalises_as_its_registry_entry_says(name):
    from ips.config import ModelConfig
    from ips.encoders import with_weights_normalization

    config = with_weights_normalization(
        ModelConfig(encoder=name, in_channels=3, patch_size=224, pretrained="weights.bin")
    )
    assert config.normalize_mean == PRESETS[name].mean
    assert config.normalize_std == PRESETS[name].std


@pytest.mark.parametrize("name", ["small_cnn", "strided_cnn", "resnet18_2blocks"])
def test_a_pooling_grid_keeps_each_cell_of_the_feature_map(name):
    """encoder_grid 2: the (n, width, 6, 6) map becomes its four 3 x 3 cell means, flattened
    channel-major and projected; swapping the top and bottom halves changes the embedding."""
    torch.manual_seed(0)
    encoder = create_encoder(name, in_channels=1, embed_dim=24, grid=2).eval()
    x = torch.rand(3, 1, 48, 48)
    maps = encoder.forward_features(x)
    n, width, h, w = maps.shape
    cells = maps.reshape(n, width, 2, h // 2, 2, w // 2).mean(dim=(3, 5)).reshape(n, -1)
    assert encoder.proj.in_features == 4 * width
    assert torch.allclose(encoder(x), encoder.proj(cells), atol=1e-5)
    swapped = cells.view(n, width, 2, 2).flip(2).reshape(n, -1)
    assert not torch.allclose(encoder.proj(swapped), encoder(x), atol=1e-3)


def test_a_pooling_grid_is_refused_where_the_encoder_pools_globally():
    with pytest.raises(ValueError, match=r"model\.encoder_grid: features pools globally"):
        create_encoder("features", embed_dim=24, feature_dim=10, grid=2)
    with pytest.raises(ValueError, match=r"model\.encoder_grid: timm:resnet18 pools globally"):
        create_encoder("timm:resnet18", in_channels=3, embed_dim=24, grid=3)
    with pytest.raises(ValueError, match=r"model\.encoder_grid must be >= 1, got 0"):
        create_encoder("small_cnn", in_channels=1, embed_dim=24, grid=0)
    with pytest.raises(ValueError, match=r"model\.encoder: unknown encoder 'resnet19'"):
        create_encoder("resnet19", grid=2)  # the name is checked before the grid
