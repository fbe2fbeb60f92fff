"""Patch encoders: one patch (or one precomputed feature vector) in, one D-vector out.

Builders are registered by name and take only architecture arguments::

    encoder = create_encoder("resnet18_2blocks", in_channels=1, embed_dim=128)
    encoder(torch.rand(8, 1, 50, 50)).shape  # (8, 128)
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ips.config import ModelConfig

log = logging.getLogger(__name__)

EncoderBuilder = Callable[..., nn.Module]
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)
_ENCODERS: dict[str, EncoderBuilder] = {}
_NORMALIZATION: dict[str, Normalization] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_encoder(
    name: str, *, normalization: Normalization | None = None
) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Register a builder ``fn(*, in_channels, embed_dim, pretrained, feature_dim) -> module``.

    The module maps (n, C, P, P) patches, or (n, F) features, to (n, embed_dim).
    ``normalization``: the RGB (mean, std) on [0, 1] pixels its pretrained weights expect.
    """

    def wrap(fn: EncoderBuilder) -> EncoderBuilder:
        if name in _ENCODERS:
            raise ValueError(f"an encoder named {name!r} is already registered")
        _ENCODERS[name] = fn
        if normalization is not None:
            _NORMALIZATION[name] = normalization
        return fn

    return wrap


def weights_normalization(
    name: str, *, pretrained: bool | str, in_channels: int
) -> Normalization | None:
    """The per-channel (mean, std) that an encoder's pretrained weights expect, or None (no
    weights, none registered, or a channel count the RGB statistics do not fit). One channel
    gets the mean of the RGB statistics (the grey stem averages the RGB filters)."""
    if not pretrained or name not in _NORMALIZATION:
        return None
    mean, std = _NORMALIZATION[name]
    if in_channels == len(mean):
        return tuple(mean), tuple(std)
    if in_channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return None


def with_weights_normalization(model: ModelConfig) -> ModelConfig:
    """``model`` with the normalisation its pretrained weights expect filled in, where
    ``normalize_mean`` and ``normalize_std`` are not set; so the checkpoint carries it."""
    if model.normalize_mean is not None or model.normalize_std is not None:
        return model
    found = weights_normalization(
        model.encoder, pretrained=model.pretrained, in_channels=model.in_channels
    )
    if found is None:
        return model
    log.info(
        "model.normalize_mean / normalize_std: %s / %s, as the %s weights expect",
        found[0],
        found[1],
        model.encoder,
    )
    return dataclasses.replace(model, normalize_mean=found[0], normalize_std=found[1])


def list_encoders() -> list[str]:
    """Names of the registered encoders."""
    return sorted(_ENCODERS)


def create_encoder(
    name: str,
    *,
    in_channels: int = 3,
    embed_dim: int = 512,
    pretrained: bool | str = False,
    feature_dim: int | None = None,
) -> nn.Module:
    """Build a registered patch encoder.

    Args:
        name: one of ``list_encoders()``.
        in_channels: C of pixel patches.
        embed_dim: D, the output width (a linear projection is added if the trunk differs).
        pretrained: False, True (torchvision's ImageNet weights, downloaded once), or the path
            of a local state dict for the trunk.
        feature_dim: F, input width of the ``features`` encoder.
    """
    if name not in _ENCODERS:
        raise ValueError(
            f"model.encoder: unknown encoder {name!r}; expected one of {list_encoders()}"
        )
    return _ENCODERS[name](
        in_channels=in_channels, embed_dim=embed_dim, pretrained=pretrained, feature_dim=feature_dim
    )


class ResNetTrunk(nn.Module):
    """The first stages of a torchvision ResNet, global average pooling, optional projection.

    Input (n, C, P, P), output (n, D).
    """

    def __init__(self, resnet: nn.Module, *, blocks: int, out_width: int, embed_dim: int):
        super().__init__()
        layers = ["layer1", "layer2", "layer3", "layer4"][:blocks]
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.Sequential(*(getattr(resnet, name) for name in layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(out_width, embed_dim) if out_width != embed_dim else nn.Identity()
        self.out_dim = embed_dim

    def forward_features(self, x: Tensor) -> Tensor:
        """(n, C, P, P) -> (n, width, h, w) feature maps."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.forward_features(x)).flatten(1))


class SmallConvNet(nn.Module):
    """A small convolutional encoder for small single-object patches (digits, glyphs, cells).

    Four stages of ``Conv2d 3 x 3 -> BatchNorm -> ReLU``, the first three followed by 2 x 2
    max pooling, then global average pooling and an optional projection. Widths 16, 32, 64
    and 128. On 50 x 50 patches it costs ~8.5 M multiply-adds per patch, about a sixth of the
    ResNet-18 two-stage trunk (~53 M), and its first convolution keeps full resolution (the
    ResNet stem halves it twice), which suits strokes a few pixels wide.

    Input (n, C, P, P) with P >= 8, output (n, D).
    """

    widths = (16, 32, 64, 128)

    def __init__(self, *, in_channels: int, embed_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_channels
        for stage, width in enumerate(self.widths):
            layers += [
                nn.Conv2d(width_in, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if stage < len(self.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            width_in = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        out_width = self.widths[-1]
        self.proj = nn.Linear(out_width, embed_dim) if out_width != embed_dim else nn.Identity()
        self.out_dim = embed_dim

    def forward_features(self, x: Tensor) -> Tensor:
        """(n, C, P, P) -> (n, 128, P / 8, P / 8) feature maps."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.forward_features(x)).flatten(1))


class FeatureProjector(nn.Module):
    """Projects precomputed patch features: LayerNorm (no affine) -> Linear -> BatchNorm -> ReLU.

    Input (n, F), output (n, D).
    """

    def __init__(self, *, feature_dim: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.act = nn.ReLU()
        self.out_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"features must be (n, F), got {tuple(x.shape)}")
        return self.act(self.bn(self.proj(self.norm(x))))


def weights_mismatch(expected: dict[str, Tensor], found: Any) -> str | None:
    """The first difference between the state dict a config builds (``expected``) and a
    stored one (``found``); None when they fit."""
    if not isinstance(found, dict):
        return f"expected a state dict, got {type(found).__name__}"
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [f"{k} is not part of the configured model" for k in found if k not in expected]
    problems += [
        f"{k} has shape {tuple(found[k].shape)}, the config builds {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and isinstance(found[k], Tensor) and found[k].shape != v.shape
    ]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def _load_state_dict(path: str) -> dict[str, Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file {file} not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # data only, never code
    except pickle.UnpicklingError:
        raise ValueError(
            f"model.pretrained: {file} holds more than tensors and plain data; refused, "
            "since unpickling it could run code"
        ) from None
    except Exception as err:
        reason = str(err).strip().split("\n")[0][:200] or type(err).__name__
        raise ValueError(f"model.pretrained: cannot read {file} as weights ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {file} does not hold a state dict")
    return state


def _resnet(arch: str, *, blocks: int, in_channels: int, embed_dim: int, pretrained: bool | str):
    import torchvision

    builder = getattr(torchvision.models, arch)
    if pretrained is True:
        weights = torchvision.models.get_model_weights(builder).DEFAULT
        resnet = builder(weights=None)
        # fetched here rather than by builder(weights=...), which unpickles the download with
        # weights_only=False; torch.hub downloads once into its cache over HTTPS (certificates
        # checked) and check_hash verifies the SHA-256 prefix in the file name
        try:
            state = torch.hub.load_state_dict_from_url(
                weights.url, progress=False, check_hash=True, weights_only=True
            )
        except OSError as err:  # offline, a proxy, a refused connection
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise FileNotFoundError(
                f"model.pretrained: cannot download the {arch} ImageNet weights "
                f"({' '.join(str(err).split())[:120]}); put {weights.url} at {cache}, "
                "or give the path of a local copy"
            ) from None
        resnet.load_state_dict(state)
    else:
        resnet = builder(weights=None)
        if pretrained:
            state = _load_state_dict(str(pretrained))
            missing, unexpected = resnet.load_state_dict(state, strict=False)
            wanted = [k for k in missing if not k.startswith("fc.")]
            if wanted:
                raise ValueError(
                    f"model.pretrained: {pretrained} lacks {len(wanted)} {arch} weights "
                    f"(e.g. {wanted[0]!r})"
                )
            if unexpected:
                log.warning("ignored %d unexpected weights in %s", len(unexpected), pretrained)
    if in_channels != 3:
        old = resnet.conv1
        conv = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # keep the learned filters: average over RGB, repeat per channel
            with torch.no_grad():
                conv.weight.copy_(old.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1))
        resnet.conv1 = conv
    width = {("resnet18", 2): 128, ("resnet18", 4): 512, ("resnet50", 2): 512}
    out_width = width.get((arch, blocks), 2048)
    return ResNetTrunk(resnet, blocks=blocks, out_width=out_width, embed_dim=embed_dim)


def _register_resnet(arch: str, blocks: int) -> None:
    @register_encoder(f"{arch}_{blocks}blocks", normalization=(IMAGENET_MEAN, IMAGENET_STD))
    def build(
        *, in_channels: int, embed_dim: int, pretrained: bool | str = False, **_
    ) -> nn.Module:
        return _resnet(
            arch, blocks=blocks, in_channels=in_channels, embed_dim=embed_dim, pretrained=pretrained
        )

    build.__doc__ = f"torchvision {arch}, first {blocks} stages, average pooled."


for _arch in ("resnet18", "resnet50"):
    for _blocks in (2, 4):
        _register_resnet(_arch, _blocks)


@register_encoder("small_cnn")
def _small_cnn(
    *, in_channels: int, embed_dim: int, pretrained: bool | str = False, **_
) -> nn.Module:
    """SmallConvNet, from scratch or from a local state dict (no published weights)."""
    encoder = SmallConvNet(in_channels=in_channels, embed_dim=embed_dim)
    if pretrained is True:
        raise ValueError(
            "model.pretrained: small_cnn has no published weights; give the path of a state "
            "dict saved from it, or false"
        )
    if pretrained:
        state = _load_state_dict(str(pretrained))
        problem = weights_mismatch(encoder.state_dict(), state)
        if problem is not None:
            raise ValueError(f"model.pretrained: {pretrained} does not fit small_cnn: {problem}")
        encoder.load_state_dict(state)
    return encoder


@register_encoder("features")
def _features(*, embed_dim: int, feature_dim: int | None = None, **_) -> nn.Module:
    """Precomputed features (n, F) through the feature projector."""
    if feature_dim is None:
        raise ValueError("model.feature_dim: the features encoder needs the feature width F")
    return FeatureProjector(feature_dim=feature_dim, embed_dim=embed_dim)
