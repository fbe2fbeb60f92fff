"""Patch encoders: one patch (or one precomputed feature vector) in, one D-vector out.

Builders are registered by name and take only architecture arguments::

    encoder = create_encoder("resnet18_2blocks", in_channels=1, embed_dim=128)
    encoder(torch.rand(8, 1, 50, 50)).shape  # (8, 128)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ips.config import ModelConfig
from ips.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

EncoderBuilder = Callable[..., nn.Module]
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)
_ENCODERS: dict[str, EncoderBuilder] = {}
_NORMALIZATION: dict[str, Normalization] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"  # model.encoder "timm:<name>": any timm model
TIMM_HINT = "timm encoders need: pip install 'iterative-patch-selection[timm]'"


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
    if not pretrained:
        return None
    if name.startswith(TIMM_PREFIX):  # timm's own weights: their pretrained_cfg says
        config = generic_timm_config(name)
        found = (config.get("mean"), config.get("std"))
        if found[0] is None or found[1] is None:
            return None
        mean, std = found
    elif name in _NORMALIZATION:
        mean, std = _NORMALIZATION[name]
    else:
        return None
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
    if name.startswith(TIMM_PREFIX):
        _rgb(name, in_channels)
        return build_timm(
            generic_timm_preset(name), name=name, pretrained=pretrained, embed_dim=embed_dim
        )
    if name not in _ENCODERS:
        raise ValueError(
            f"model.encoder: unknown encoder {name!r}; expected one of {list_encoders()} "
            f"or '{TIMM_PREFIX}<any timm model>'"
        )
    return _ENCODERS[name](
        in_channels=in_channels, embed_dim=embed_dim, pretrained=pretrained, feature_dim=feature_dim
    )


def _rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ValueError(
            f"model.in_channels: {name} reads RGB patches (3 channels), got {in_channels}"
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
        if pretrained:  # strictly, but the classifier (fc.*) the trunk drops may be absent
            state = read_state_dict(pretrained, option="model.pretrained")
            load_strict(
                resnet,
                state,
                source=str(pretrained),
                model=f"torchvision {arch}",
                ignore=("fc.",),
                option="model.pretrained",
            )
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
        state = read_state_dict(pretrained, option="model.pretrained")
        load_strict(
            encoder, state, source=str(pretrained), model="small_cnn", option="model.pretrained"
        )
    return encoder


@register_encoder("features")
def _features(*, embed_dim: int, feature_dim: int | None = None, **_) -> nn.Module:
    """Precomputed features (n, F) through the feature projector."""
    if feature_dim is None:
        raise ValueError("model.feature_dim: the features encoder needs the feature width F")
    return FeatureProjector(feature_dim=feature_dim, embed_dim=embed_dim)


# ---- timm backbones and pathology foundation models --------------------------------------------

EMBEDDINGS = ("pooled", "cls_mean")


@dataclass(frozen=True)
class TimmPreset:
    """How one tile encoder is built, fed and read out; everything its weights need.

    ``kwargs`` go to ``timm.create_model``; a value ``"layer:SwiGLUPacked"`` names
    ``timm.layers.SwiGLUPacked``, ``"torch:SiLU"`` names ``torch.nn.SiLU``.
    """

    arch: str  # timm architecture
    kwargs: tuple[tuple[str, Any], ...] = ()  # timm.create_model keyword arguments
    width: int = 0  # F: width of the embedding
    input_size: int | None = 224  # side the model reads, other patch sizes resized (None: as is)
    resize_to: int | None = None  # resize to this side first, then centre-crop to input_size
    interpolation: str = "bilinear"  # "bilinear" or "bicubic" (antialiased when shrinking)
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation of [0, 1] pixels the weights expect
    std: tuple[float, ...] = IMAGENET_STD
    embedding: str = "pooled"  # "pooled": the model's head-less output (the class token for
    # these ViTs); "cls_mean": class token and the mean of the patch tokens, concatenated
    hub_id: str | None = None  # Hugging Face hub id of the published weights
    gated: bool = False  # the hub asks to accept terms first (then HF_TOKEN)
    convert: str | None = None  # key conversion of published weights ("dinov2_hf": HF Dinov2)
    note: str = ""  # what a user should know (licence, what cannot be built and why)

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")

    def timm_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of ``timm.create_model`` with layer names resolved."""
        return {k: _resolve(v) for k, v in {**dict(self.kwargs), **overrides}.items()}


def _resolve(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("layer:"):
        import timm.layers

        return getattr(timm.layers, value[len("layer:") :])
    if isinstance(value, str) and value.startswith("torch:"):
        return getattr(nn, value[len("torch:") :])
    return value


def import_timm() -> Any:
    """Import timm, or raise an ImportError naming the extra that installs it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(TIMM_HINT) from err
    return timm


class TimmEncoder(nn.Module):
    """A timm model as a patch encoder: resize to its input, run it, read out the embedding,
    project to D.

    Input (n, 3, P, P) normalised pixels, output (n, D); ``proj`` is the identity when
    D equals the embedding width F (feature extraction) and the part that trains when the
    encoder is frozen.
    """

    def __init__(self, trunk: nn.Module, preset: TimmPreset, *, embed_dim: int | None = None):
        super().__init__()
        self.trunk = trunk
        self.preset = preset
        self.width = int(trunk.num_features) * (2 if preset.embedding == "cls_mean" else 1)
        dim = embed_dim or self.width
        self.proj = nn.Linear(self.width, dim) if dim != self.width else nn.Identity()
        self.out_dim = dim

    def prepare(self, x: Tensor) -> Tensor:
        """(n, 3, P, P) -> (n, 3, S, S) at the model's input side S (the preset's rule)."""
        p = self.preset
        if p.input_size is None or x.shape[-1] == p.input_size == x.shape[-2]:
            return x
        if p.resize_to is not None:
            if x.shape[-1] != p.resize_to:
                x = _resize(x, p.resize_to, p.interpolation)
            top = (x.shape[-2] - p.input_size) // 2
            left = (x.shape[-1] - p.input_size) // 2
            if top >= 0 and left >= 0:
                return x[..., top : top + p.input_size, left : left + p.input_size]
        return _resize(x, p.input_size, p.interpolation)

    def forward_embedding(self, x: Tensor) -> Tensor:
        """(n, 3, P, P) -> (n, F), the embedding as the model's authors read it out."""
        x = self.prepare(x)
        if self.preset.embedding == "pooled":
            return self.trunk(x)  # timm's head-less output (num_classes=0)
        tokens = self.trunk.forward_features(x)  # (n, prefix + patches, width)
        patches = tokens[:, self.trunk.num_prefix_tokens :]  # class and register tokens out
        return torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.forward_embedding(x))


def _resize(x: Tensor, side: int, mode: str) -> Tensor:
    return nn.functional.interpolate(
        x, size=(side, side), mode=mode, antialias=side < x.shape[-1], align_corners=False
    )


def build_timm(
    preset: TimmPreset,
    *,
    name: str,
    pretrained: bool | str = False,
    embed_dim: int | None = None,
    **overrides: Any,
) -> TimmEncoder:
    """A `TimmEncoder` of ``preset``, with weights from a file (loaded strictly), from the hub
    (``pretrained=True``), or random (seeded by the caller).

    Args:
        preset: architecture and read-out.
        name: the encoder's name, for errors.
        pretrained: False, True (the hub id), or a weight file.
        embed_dim: D; None: the embedding width (no projection).
        **overrides: architecture keyword arguments replacing the preset's (small test
            versions: ``depth=1, embed_dim=...``).
    """
    timm = import_timm()
    kwargs = {"num_classes": 0, **preset.timm_kwargs(**overrides)}
    if pretrained is True:
        trunk = _from_hub(timm, preset, name, kwargs)
    else:
        try:
            trunk = timm.create_model(preset.arch, pretrained=False, **kwargs)
        except RuntimeError as err:  # unknown model name
            raise ValueError(f"model.encoder: timm cannot build {preset.arch!r} ({err})") from None
        if pretrained:
            state = read_state_dict(pretrained, option="model.pretrained")
            if preset.convert is not None:
                state = CONVERSIONS[preset.convert](state)
            load_strict(trunk, state, source=str(pretrained), model=name, option="model.pretrained")
    encoder = TimmEncoder(trunk, preset, embed_dim=embed_dim)
    if preset.width and not overrides and encoder.width != preset.width:
        raise RuntimeError(
            f"{name}: the registry says F = {preset.width}, it gives {encoder.width}"
        )
    return encoder


def _from_hub(timm: Any, preset: TimmPreset, name: str, kwargs: dict[str, Any]) -> nn.Module:
    if preset.hub_id is None:
        raise ValueError(
            f"model.pretrained: {name} has no published weights to fetch; give a file's path"
        )
    try:
        return timm.create_model(f"hf-hub:{preset.hub_id}", pretrained=True, **kwargs)
    except Exception as err:  # offline, gated, refused: huggingface_hub's many errors
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        gate = (
            f"its weights are gated: accept the terms on https://huggingface.co/{preset.hub_id} "
            "and set HF_TOKEN; "
            if preset.gated
            else ""
        )
        raise FileNotFoundError(
            f"model.pretrained: cannot fetch the {name} weights from the hub ({preset.hub_id}: "
            f"{reason}); {gate}or download the file once and give its path"
        ) from None


def dinov2_from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a Hugging Face ``Dinov2Model`` state dict renamed to timm's VisionTransformer
    (query, key and value weights concatenated into ``qkv``)."""
    if not any(k.startswith("embeddings.") for k in state):
        return state  # already timm's keys
    out: dict[str, Tensor] = {}
    layers: dict[int, dict[str, Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "reg_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    parts = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # SwiGLU variants
        "mlp.weights_out": "mlp.fc2",
    }
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "embeddings.mask_token":
            continue  # masked-image-modelling only
        elif key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer.") :].split(".", 1)
            block = f"blocks.{index}."
            if rest.startswith("attention.attention."):
                layers.setdefault(int(index), {})[rest[len("attention.attention.") :]] = value
            elif rest.startswith("layer_scale1.lambda1"):
                out[block + "ls1.gamma"] = value
            elif rest.startswith("layer_scale2.lambda1"):
                out[block + "ls2.gamma"] = value
            else:
                module, _, leaf = rest.rpartition(".")
                out[block + parts.get(module, module) + "." + leaf] = value
        else:
            out[key] = value
    for index, qkv in layers.items():
        for leaf in ("weight", "bias"):
            if f"query.{leaf}" in qkv:
                out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat(
                    [qkv[f"{name}.{leaf}"] for name in ("query", "key", "value")]
                )
    return out


CONVERSIONS = {"dinov2_hf": dinov2_from_hf}


def generic_timm_config(name: str) -> dict[str, Any]:
    """timm's pretrained config (input size, mean, std, ...) of ``timm:<model>``; {} if none."""
    timm = import_timm()
    arch = name[len(TIMM_PREFIX) :]
    try:
        config = timm.models.get_pretrained_cfg(arch, allow_unregistered=False)
    except Exception:  # unknown name or tag: timm.create_model says so
        return {}
    return config.to_dict() if config is not None else {}


def generic_timm_preset(name: str) -> TimmPreset:
    """Any timm model, ``timm:<model>``: fed at the patch size, read out as timm's head-less
    output, normalised as its pretrained config says."""
    arch = name[len(TIMM_PREFIX) :]
    if not arch:
        raise ValueError(f"model.encoder: {name!r} names no timm model (timm:<model name>)")
    config = generic_timm_config(name)
    mean = tuple(config.get("mean") or IMAGENET_MEAN)
    std = tuple(config.get("std") or IMAGENET_STD)
    return TimmPreset(arch=arch, input_size=None, mean=mean, std=std)
