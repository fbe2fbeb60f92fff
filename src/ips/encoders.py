"""Patch encoders: one patch (or one precomputed feature vector) in, one D-vector out.

Builders are registered by name and take only architecture arguments::

    encoder = create_encoder("resnet18_2blocks", in_channels=1, embed_dim=128)
    encoder(torch.rand(8, 1, 50, 50)).shape  # (8, 128)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ips.config import ModelConfig
from ips.errors import InputError, MissingExtraError, MissingFileError
from ips.weights import load_strict, read_state_dict

log = logging.getLogger(__name__)

EncoderBuilder = Callable[..., nn.Module]
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)
_ENCODERS: dict[str, EncoderBuilder] = {}
_NORMALIZATION: dict[str, Normalization] = {}
_GRID_ENCODERS: set[str] = set()  # builders that take ``grid`` (model.encoder_grid > 1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"  # model.encoder "timm:<name>": any timm model
TIMM_HINT = "timm encoders need: pip install 'iterative-patch-selection[timm]'"


def register_encoder(
    name: str, *, normalization: Normalization | None = None, grid: bool = False
) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Register a builder ``fn(*, in_channels, embed_dim, pretrained, feature_dim) -> module``.

    The module maps (n, C, P, P) patches, or (n, F) features, to (n, embed_dim).
    ``normalization``: the RGB (mean, std) on [0, 1] pixels its pretrained weights expect.
    ``grid``: the builder also takes ``grid`` (g > 1: its last map average-pooled to g x g
    cells); builders without it get no ``grid`` argument and refuse g > 1.
    """

    def wrap(fn: EncoderBuilder) -> EncoderBuilder:
        if name in _ENCODERS:
            raise InputError(f"an encoder named {name!r} is already registered")
        _ENCODERS[name] = fn
        if normalization is not None:
            _NORMALIZATION[name] = normalization
        if grid:
            _GRID_ENCODERS.add(name)
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
    if mean is None or std is None:
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
    grid: int = 1,
) -> nn.Module:
    """Build a registered patch encoder.

    Args:
        name: one of ``list_encoders()``.
        in_channels: C of pixel patches.
        embed_dim: D, the output width (a linear projection is added if the trunk differs).
        pretrained: False, True (torchvision's ImageNet weights, downloaded once), or the path
            of a local state dict for the trunk.
        feature_dim: F, input width of the ``features`` encoder.
        grid: g, the side of the grid the last feature map is average-pooled to (flattened,
            then projected to D); 1 is global average pooling. Our CNNs and the ResNet trunks
            take any g; other encoders only 1.
    """
    if grid < 1:
        raise InputError(f"model.encoder_grid must be >= 1, got {grid}")
    from_timm = name.startswith(TIMM_PREFIX)
    if not from_timm and name not in _ENCODERS:
        raise InputError(
            f"model.encoder: unknown encoder {name!r}; expected one of {list_encoders()} "
            f"or '{TIMM_PREFIX}<any timm model>'"
        )
    if grid > 1 and name not in _GRID_ENCODERS:
        raise InputError(
            f"model.encoder_grid: {name} pools globally (grid 1); a grid of {grid} x {grid} "
            f"needs one of {sorted(_GRID_ENCODERS)}"
        )
    if from_timm:
        _rgb(name, in_channels)
        return build_timm(
            generic_timm_preset(name), name=name, pretrained=pretrained, out_dim=embed_dim
        )
    extra = {"grid": grid} if grid > 1 else {}  # builders registered without it never see it
    return _ENCODERS[name](
        in_channels=in_channels,
        embed_dim=embed_dim,
        pretrained=pretrained,
        feature_dim=feature_dim,
        **extra,
    )


def _rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise InputError(
            f"model.in_channels: {name} reads RGB patches (3 channels), got {in_channels}"
        )


def checkpoint_stages(stages: Sequence[nn.Module], x: Tensor) -> Tensor:
    """``x`` through each stage in turn, keeping for backward only each stage's input (while
    gradients are on): its inner activations are recomputed there, one stage at a time.

    The recomputation sees the forward's random state (dropout) and leaves every buffer as
    the forward left it: BatchNorm in train mode would otherwise update its running
    statistics and count a second time.
    """
    for stage in stages:
        if not torch.is_grad_enabled():  # selection, evaluation: nothing is kept anyway
            x = stage(x)
            continue
        x = checkpoint(
            stage,
            x,
            use_reentrant=False,
            preserve_rng_state=True,
            context_fn=functools.partial(_recompute_contexts, stage),
        )
    return x


def _recompute_contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """checkpoint's (forward, recomputation) contexts: the recomputation restores the buffers."""
    return contextlib.nullcontext(), _buffers_kept(module)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers on exit, also when checkpoint stops recomputing early."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class ResNetTrunk(nn.Module):
    """The first stages of a torchvision ResNet, average pooling, optional projection.

    ``grid`` g: the last feature map is average-pooled to g x g cells and flattened (1: global
    average pooling). Input (n, C, P, P), output (n, D).
    """

    def __init__(self, resnet: Any, *, blocks: int, out_width: int, embed_dim: int, grid: int = 1):
        super().__init__()
        layers = ["layer1", "layer2", "layer3", "layer4"][:blocks]
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.Sequential(*(getattr(resnet, name) for name in layers))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        out_width *= grid * grid
        self.proj = nn.Linear(out_width, embed_dim) if out_width != embed_dim else nn.Identity()
        self.out_dim = embed_dim
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the stem's and each stage's activations in backward (`checkpoint_stages`)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """(n, C, P, P) -> (n, width, h, w) feature maps."""
        if self.grad_checkpointing:
            return checkpoint_stages([self.stem, *self.stages], x)
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.forward_features(x)).flatten(1))


def conv_bn_relu(width_in: int, width: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """``Conv2d (no bias, same padding) -> BatchNorm2d -> ReLU``."""
    conv = nn.Conv2d(width_in, width, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


class SmallConvNet(nn.Module):
    """A small convolutional encoder for small single-object patches (digits, glyphs, cells).

    Four stages of ``Conv2d 3 x 3 -> BatchNorm -> ReLU``, the first three followed by 2 x 2
    max pooling, then average pooling to ``grid`` x ``grid`` cells (1: global average pooling;
    more keeps where inside the patch features lie), flattened, and an optional projection.
    Widths 16, 32, 64 and 128. On 50 x 50 patches it costs ~8.5 M multiply-adds per patch,
    about a sixth of the ResNet-18 two-stage trunk (~53 M), and its first convolution keeps
    full resolution (the ResNet stem halves it twice), which suits strokes a few pixels wide.

    Input (n, C, P, P) with P >= 8, output (n, D).
    """

    widths = (16, 32, 64, 128)

    def __init__(self, *, in_channels: int, embed_dim: int, grid: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        ends = []  # where each stage ends in `body` (one flat Sequential: stable weight names)
        for block in self.stages(in_channels):
            layers += block
            ends.append(len(layers))
        self.body = nn.Sequential(*layers)
        self.stage_ends = tuple(ends)
        self.grad_checkpointing = False
        self.pool = nn.AdaptiveAvgPool2d(grid)
        out_width = self.widths[-1] * grid * grid
        self.proj = nn.Linear(out_width, embed_dim) if out_width != embed_dim else nn.Identity()
        self.out_dim = embed_dim

    def stages(self, in_channels: int) -> list[list[nn.Module]]:
        """The layers of each stage: 3 x 3 convolutions, max pooling after all but the last."""
        w = (in_channels, *self.widths)
        last = len(self.widths) - 1
        return [
            [*conv_bn_relu(w[i], w[i + 1], 3), *([nn.MaxPool2d(2)] if i < last else [])]
            for i in range(len(self.widths))
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward (`checkpoint_stages`)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """(n, C, P, P) -> (n, 128, P / 8, P / 8) feature maps."""
        if self.grad_checkpointing:
            starts = (0, *self.stage_ends[:-1])
            stages = [self.body[a:b] for a, b in zip(starts, self.stage_ends, strict=True)]
            return checkpoint_stages(stages, x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.forward_features(x)).flatten(1))


class StridedConvNet(SmallConvNet):
    """A cheaper small encoder for large grey-scale canvases: a 5 x 5 stride-2 stem.

    ``Conv2d 5 x 5 / 2 -> BatchNorm -> ReLU -> MaxPool 2``, then 3 x 3 stages of 32, 64 and
    128 channels (the first followed by 2 x 2 max pooling), global average pooling and an
    optional projection. On 50 x 50 patches the stem leaves 12 x 12 maps, the last stages run
    at 6 x 6 and the receptive field is 51 pixels. Its training pass (forward and backward) is
    about 3.6 x faster than `SmallConvNet`'s on 2 AVX2 cores, because no stage runs at full
    resolution; strokes a few pixels wide still fall inside one 5 x 5 stem window.

    Input (n, C, P, P) with P >= 8, output (n, D).
    """

    def stages(self, in_channels: int) -> list[list[nn.Module]]:
        """A 5 x 5 stride-2 stem and pooling, then 3 x 3 stages (pooling after the second)."""
        w = (in_channels, *self.widths)
        return [
            [*conv_bn_relu(w[0], w[1], 5, stride=2), nn.MaxPool2d(2)],
            [*conv_bn_relu(w[1], w[2], 3), nn.MaxPool2d(2)],
            conv_bn_relu(w[2], w[3], 3),
            conv_bn_relu(w[3], w[4], 3),
        ]


class FeatureProjector(nn.Module):
    """Projects precomputed patch features: LayerNorm (no affine) -> Linear -> BatchNorm -> ReLU.

    Input (n, F), output (n, D).
    """

    def __init__(self, *, feature_dim: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.proj = nn.Linear(feature_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.act = nn.ReLU(inplace=True)  # on the BatchNorm's output, which nothing else holds
        self.out_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise InputError(f"features must be (n, F), got {tuple(x.shape)}")
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


def _resnet(
    arch: str,
    *,
    blocks: int,
    in_channels: int,
    embed_dim: int,
    pretrained: bool | str,
    grid: int = 1,
):
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
            raise MissingFileError(
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
    return ResNetTrunk(resnet, blocks=blocks, out_width=out_width, embed_dim=embed_dim, grid=grid)


def _register_resnet(arch: str, blocks: int) -> None:
    @register_encoder(
        f"{arch}_{blocks}blocks", normalization=(IMAGENET_MEAN, IMAGENET_STD), grid=True
    )
    def build(
        *, in_channels: int, embed_dim: int, pretrained: bool | str = False, grid: int = 1, **_
    ) -> nn.Module:
        return _resnet(
            arch,
            blocks=blocks,
            in_channels=in_channels,
            embed_dim=embed_dim,
            pretrained=pretrained,
            grid=grid,
        )

    build.__doc__ = f"torchvision {arch}, first {blocks} stages, average pooled."


for _arch in ("resnet18", "resnet50"):
    for _blocks in (2, 4):
        _register_resnet(_arch, _blocks)


def _own_cnn(
    cls: type[SmallConvNet], name: str, in_channels: int, embed_dim: int, pretrained, grid: int
):
    """One of our small CNNs, from scratch or from a local state dict (no published weights)."""
    encoder = cls(in_channels=in_channels, embed_dim=embed_dim, grid=grid)
    if pretrained is True:
        raise InputError(
            f"model.pretrained: {name} has no published weights; give the path of a state "
            "dict saved from it, or false"
        )
    if pretrained:
        state = read_state_dict(pretrained, option="model.pretrained")
        load_strict(encoder, state, source=str(pretrained), model=name, option="model.pretrained")
    return encoder


@register_encoder("small_cnn", grid=True)
def _small_cnn(
    *, in_channels: int, embed_dim: int, pretrained: bool | str = False, grid: int = 1, **_
) -> nn.Module:
    """SmallConvNet, from scratch or from a local state dict (no published weights)."""
    return _own_cnn(SmallConvNet, "small_cnn", in_channels, embed_dim, pretrained, grid)


@register_encoder("strided_cnn", grid=True)
def _strided_cnn(
    *, in_channels: int, embed_dim: int, pretrained: bool | str = False, grid: int = 1, **_
) -> nn.Module:
    """StridedConvNet, from scratch or from a local state dict (no published weights)."""
    return _own_cnn(StridedConvNet, "strided_cnn", in_channels, embed_dim, pretrained, grid)


@register_encoder("features")
def _features(*, embed_dim: int, feature_dim: int | None = None, **_) -> nn.Module:
    """Precomputed features (n, F) through the feature projector."""
    if feature_dim is None:
        raise InputError("model.feature_dim: the features encoder needs the feature width F")
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
    hub_file: str = "pytorch_model.bin"  # their file on the hub
    url: str | None = None  # or their address elsewhere
    gated: bool = False  # the hub asks to accept terms first (then HF_TOKEN)
    cpu_batch_size: int = 8  # tiles per call on a CPU: the fastest measured (benchmarks/encoders)
    convert: str | None = None  # how published weights become the model's keys (CONVERSIONS)
    tower: str | None = None  # a read-out around the timm trunk (TOWERS), e.g. CONCH's pooler

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDINGS:
            raise InputError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")

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
        raise MissingExtraError(TIMM_HINT) from err
    return timm


class TimmEncoder(nn.Module):
    """A timm model as a patch encoder: resize to its input, run it, read out the embedding,
    project to D.

    Input (n, 3, P, P) normalised pixels, output (n, D); ``proj`` is the identity when
    D equals the embedding width F (feature extraction) and the part that trains when the
    encoder is frozen.
    """

    trunk: Any  # a timm model (its attributes are timm's: num_features, forward_features, ...)

    def __init__(self, trunk: nn.Module, preset: TimmPreset, *, embed_dim: int | None = None):
        super().__init__()
        self.trunk = trunk
        self.preset = preset
        self.width = int(self.trunk.num_features) * (2 if preset.embedding == "cls_mean" else 1)
        dim = embed_dim or self.width
        self.proj = nn.Linear(self.width, dim) if dim != self.width else nn.Identity()
        self.out_dim = dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own checkpointing of the trunk's blocks (non-reentrant, dropout replayed).

        Raises:
            InputError: the trunk has BatchNorm with running statistics (timm's recomputation
                would update them twice) or timm cannot checkpoint it.
        """
        batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        if enable and any(
            isinstance(m, batch_norms) and m.track_running_stats for m in self.trunk.modules()
        ):
            raise InputError(
                f"train.activation_checkpointing: the timm model {self.preset.arch} has "
                "BatchNorm, whose running statistics timm's recomputation would update twice; "
                "set it to false"
            )
        setter = getattr(self.trunk, "set_grad_checkpointing", None)
        try:
            if setter is None:
                raise NotImplementedError("no set_grad_checkpointing")
            setter(enable)
        except (AssertionError, NotImplementedError) as err:  # timm: assert not enable, ...
            raise InputError(
                f"train.activation_checkpointing: timm cannot checkpoint {self.preset.arch} "
                f"({' '.join(str(err).split())[:120] or type(err).__name__}); set it to false"
            ) from None

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
    out_dim: int | None = None,
    **overrides: Any,
) -> TimmEncoder:
    """A `TimmEncoder` of ``preset``, with weights from a file (loaded strictly), its published
    file (``pretrained=True``: from the hub or its URL, then loaded the same way), or random
    (seeded by the caller).

    Args:
        preset: architecture and read-out.
        name: the encoder's name, for errors.
        pretrained: False, True (the published weights), or a weight file.
        out_dim: D; None: the embedding width (no projection).
        **overrides: architecture keyword arguments replacing the preset's (small test
            versions: ``depth=1, embed_dim=...``).
    """
    timm = import_timm()
    kwargs = {"num_classes": 0, **preset.timm_kwargs(**overrides)}
    try:
        trunk = timm.create_model(preset.arch, pretrained=False, **kwargs)
    except RuntimeError as err:  # unknown model name
        raise InputError(f"model.encoder: timm cannot build {preset.arch!r} ({err})") from None
    if preset.tower is not None:
        trunk = TOWERS[preset.tower](trunk)
    if pretrained:
        path = fetch_weights(preset, name) if pretrained is True else str(pretrained)
        state = read_state_dict(path, option="model.pretrained")
        if preset.convert is not None:
            state = CONVERSIONS[preset.convert](state, trunk)
        load_strict(trunk, state, source=path, model=name, option="model.pretrained")
    encoder = TimmEncoder(trunk, preset, embed_dim=out_dim)
    if preset.width and not overrides and encoder.width != preset.width:
        raise RuntimeError(
            f"{name}: the registry says F = {preset.width}, it gives {encoder.width}"
        )
    return encoder


def fetch_weights(preset: TimmPreset, name: str) -> str:
    """The local path of a preset's published weight file, downloaded once: from the Hugging
    Face hub (``HF_TOKEN`` for gated models; ``HF_HUB_OFFLINE=1`` uses the cache only) or
    from its URL (torch's hub cache)."""
    try:
        if preset.hub_id is not None:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(preset.hub_id, preset.hub_file)
        if preset.url is not None:
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            target = folder / f"{name}_{Path(preset.url).name}"
            if not target.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(preset.url, str(target), progress=False)
            return str(target)
    except ImportError as err:
        raise MissingExtraError(TIMM_HINT) from err
    except Exception as err:  # offline, gated, refused: huggingface_hub's and urllib's errors
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        where = preset.hub_id or preset.url
        gate = (
            f"its weights are gated: accept the terms on https://huggingface.co/{preset.hub_id} "
            "and set HF_TOKEN; "
            if preset.gated
            else ""
        )
        raise MissingFileError(
            f"model.pretrained: cannot fetch the {name} weights ({where}: {reason}); {gate}"
            "or download the file once and give its path"
        ) from None
    raise InputError(f"model.pretrained: {name} has no published weights; give a file's path")


def dinov2_from_hf(state: dict[str, Tensor], trunk: Any) -> dict[str, Tensor]:
    """A Hugging Face ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) state dict in the keys
    of timm's VisionTransformer (query, key and value concatenated into ``qkv``); Meta's
    DINOv2 keys go through `dinov2_to_timm`; timm's keys pass unchanged (and are checked as
    they are)."""
    if "mask_token" in state:  # Meta's layout (e.g. the hibou .pth files)
        return dinov2_to_timm(state, trunk)
    if not any(k.startswith("embeddings.") for k in state):
        return state
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
        "attention.o_proj": "attn.proj",  # transformers 5 names
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # SwiGLU: [gate; up] packed, as timm's SwiGLUPacked
        "mlp.weights_out": "mlp.fc2",
        "mlp.down_proj": "mlp.fc2",
    }
    qkv_names = {"query": "query", "key": "key", "value": "value"}
    qkv_names |= {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
    swiglu: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "embeddings.mask_token":
            continue  # masked-image-modelling only
        elif key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer.") :].split(".", 1)
            block = f"blocks.{index}."
            module, _, leaf = rest.rpartition(".")
            projection = module.rpartition(".")[2]
            if module.startswith("attention.") and projection in qkv_names:
                layers.setdefault(int(index), {})[f"{qkv_names[projection]}.{leaf}"] = value
            elif module in ("mlp.gate_proj", "mlp.up_proj"):  # transformers 5: SwiGLU split
                swiglu.setdefault(block + leaf, {})[module] = value
            elif rest.startswith("layer_scale1.lambda1"):
                out[block + "ls1.gamma"] = value
            elif rest.startswith("layer_scale2.lambda1"):
                out[block + "ls2.gamma"] = value
            else:
                out[block + parts.get(module, module) + "." + leaf] = value
        else:
            out[key] = value
    for number, qkv in layers.items():
        for leaf in ("weight", "bias"):
            if f"query.{leaf}" in qkv:
                out[f"blocks.{number}.attn.qkv.{leaf}"] = torch.cat(
                    [qkv[f"{name}.{leaf}"] for name in ("query", "key", "value")]
                )
    for prefix, halves in swiglu.items():  # "blocks.3.weight" -> "blocks.3.mlp.fc1.weight"
        block, _, leaf = prefix.rpartition(".")
        out[f"{block}.mlp.fc1.{leaf}"] = torch.cat([halves["mlp.gate_proj"], halves["mlp.up_proj"]])
    pos = out.get("pos_embed")
    if getattr(trunk, "no_embed_class", False) and pos is not None and "cls_token" in out:
        # HF keeps a position for the class token; timm's register models add none to it
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def dinov2_to_timm(state: dict[str, Tensor], trunk: Any) -> dict[str, Tensor]:
    """timm's own conversion of DINOv2 checkpoints (Meta's keys: ``register_tokens``,
    ``mlp.w12``, the class position folded into ``cls_token`` where the model has none, the
    position grid and patch kernel resampled to the model's), as timm applies it when it
    loads these models' published weights (Kaiko's release files)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state), trunk)


def conch_v1_5_positions(state: dict[str, Tensor], tower: Any) -> dict[str, Tensor]:
    """CONCH v1.5's position embedding as its own code uses it at 448 pixels: a grid other than
    the trunk's 28 x 28 is resampled to the 14 x 14 grid of 224 pixels (bilinear, as its loader
    does), then to 28 x 28 DINO's way (bicubic, scale (28 + 0.1) / 14, as its forward does),
    and baked into the 448-pixel trunk; a 28 x 28 grid (a file saved from this model) stays."""
    from timm.layers import resample_abs_pos_embed

    key = "trunk.pos_embed"
    if key not in state or state[key].shape == tower.trunk.pos_embed.shape:
        return state
    pos = state[key]  # (1, 1 + g * g, D)
    pos = resample_abs_pos_embed(pos, new_size=(14, 14), num_prefix_tokens=1, verbose=False)
    cls, grid = pos[:, :1], pos[:, 1:]  # (1, 1, D), (1, 196, D)
    dim, side = grid.shape[-1], tower.trunk.patch_embed.grid_size[0]
    grid = nn.functional.interpolate(
        grid.reshape(1, 14, 14, dim).permute(0, 3, 1, 2).float(),
        scale_factor=((side + 0.1) / 14, (side + 0.1) / 14),
        mode="bicubic",
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, dim).to(pos.dtype)
    return {**state, key: torch.cat([cls, grid], dim=1)}


CONVERSIONS = {
    "dinov2_hf": dinov2_from_hf,
    "dinov2": dinov2_to_timm,
    "conch_v1_5": conch_v1_5_positions,
}


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooling: learned queries attend to the tokens (CONCH's read-out).

    Input (n, T, context_dim), output (n, queries, d_model).
    """

    def __init__(self, *, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, h = x.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)  # (n, Q, d)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (n, T, d) each

        def split(t: Tensor) -> Tensor:  # (n, L, d) -> (n, h, L, d / h)
            return t.unflatten(-1, (h, -1)).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))  # (n, Q, d)


class ConchTower(nn.Module):
    """CONCH v1.5's vision tower: a ViT-L/16 trunk, attentional pooling to 768, LayerNorm.

    Input (n, 3, 448, 448), output (n, 768); its state dict is the published file's
    (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).
    """

    trunk: Any  # timm's VisionTransformer

    def __init__(self, trunk: Any, d_model: int = 768):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(
            d_model=d_model, context_dim=int(trunk.num_features), n_head=8, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(d_model)
        self.num_features = d_model
        self.num_prefix_tokens = trunk.num_prefix_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.trunk.forward_features(x)  # (n, 1 + patches, 1024)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


TOWERS = {"conch_v1_5": ConchTower}


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
        raise InputError(f"model.encoder: {name!r} names no timm model (timm:<model name>)")
    config = generic_timm_config(name)
    mean = tuple(config.get("mean") or IMAGENET_MEAN)
    std = tuple(config.get("std") or IMAGENET_STD)
    return TimmPreset(arch=arch, input_size=None, mean=mean, std=std)


# the pathology foundation models, one entry per family (sources: each model's card and code)
_SWIGLU = (("mlp_layer", "layer:SwiGLUPacked"), ("act_layer", "torch:SiLU"))
KAIKO_RELEASES = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1"
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.7220), (0.1950, 0.2316, 0.1816)
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_VIRCHOW = TimmPreset(
    cpu_batch_size=4,
    arch="vit_huge_patch14_224",
    kwargs=(
        ("img_size", 224),
        ("init_values", 1e-5),
        ("mlp_ratio", 5.3375),
        ("global_pool", ""),
        ("dynamic_img_size", True),
        *_SWIGLU,
    ),
    width=2560,
    interpolation="bicubic",
    embedding="cls_mean",
    hub_id="paige-ai/Virchow",
    gated=True,
)
_H_OPTIMUS_0 = TimmPreset(
    cpu_batch_size=4,
    arch="vit_giant_patch14_reg4_dinov2",
    kwargs=(("img_size", 224), ("init_values", 1e-5), ("dynamic_img_size", False)),
    width=1536,
    mean=H_OPTIMUS_MEAN,
    std=H_OPTIMUS_STD,
    hub_id="bioptimus/H-optimus-0",
)
PRESETS: dict[str, TimmPreset] = {
    "uni": TimmPreset(
        arch="vit_large_patch16_224",
        kwargs=(("init_values", 1e-5), ("dynamic_img_size", True)),
        width=1024,
        hub_id="MahmoodLab/UNI",
        gated=True,
    ),
    "uni2_h": TimmPreset(
        cpu_batch_size=4,
        arch="vit_giant_patch14_224",
        kwargs=(
            ("img_size", 224),
            ("patch_size", 14),
            ("depth", 24),
            ("num_heads", 24),
            ("init_values", 1e-5),
            ("embed_dim", 1536),
            ("mlp_ratio", 2.66667 * 2),
            ("no_embed_class", True),
            *_SWIGLU,
            ("reg_tokens", 8),
            ("dynamic_img_size", True),
        ),
        width=1536,
        hub_id="MahmoodLab/UNI2-h",
        gated=True,
    ),
    "virchow": _VIRCHOW,
    "virchow2": dataclasses.replace(
        _VIRCHOW, kwargs=(*_VIRCHOW.kwargs, ("reg_tokens", 4)), hub_id="paige-ai/Virchow2"
    ),
    "h_optimus_0": _H_OPTIMUS_0,
    "h_optimus_1": dataclasses.replace(_H_OPTIMUS_0, hub_id="bioptimus/H-optimus-1", gated=True),
    "prov_gigapath": TimmPreset(
        cpu_batch_size=4,
        arch="vit_giant_patch14_dinov2",
        kwargs=(
            ("img_size", 224),
            ("in_chans", 3),
            ("patch_size", 16),
            ("embed_dim", 1536),
            ("depth", 40),
            ("num_heads", 24),
            ("init_values", 1e-5),
            ("mlp_ratio", 5.33334),
        ),
        width=1536,
        resize_to=256,
        interpolation="bicubic",
        hub_id="prov-gigapath/prov-gigapath",
        gated=True,
    ),
    "conch_v1_5": TimmPreset(
        cpu_batch_size=4,
        arch="vit_large_patch16_224",
        kwargs=(("img_size", 448), ("init_values", 1.0)),
        tower="conch_v1_5",
        convert="conch_v1_5",
        width=768,
        input_size=448,
        hub_id="MahmoodLab/conchv1_5",
        hub_file="pytorch_model_vision.bin",
        gated=True,
    ),
    "phikon_v2": TimmPreset(
        arch="vit_large_patch16_224",
        kwargs=(("img_size", 224), ("init_values", 1e-5)),
        convert="dinov2_hf",
        width=1024,
        hub_id="owkin/phikon-v2",
        hub_file="model.safetensors",
    ),
    **{
        f"kaiko_{size}": TimmPreset(
            arch=arch,
            kwargs=(("img_size", 224), ("dynamic_img_size", True)),
            convert="dinov2",
            width=width,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            url=f"{KAIKO_RELEASES}/{size}.pth",
            cpu_batch_size=batch,
        )
        for size, arch, width, batch in (
            ("vits16", "vit_small_patch16_224", 384, 32),
            ("vits8", "vit_small_patch8_224", 384, 8),
            ("vitb16", "vit_base_patch16_224", 768, 8),
            ("vitb8", "vit_base_patch8_224", 768, 8),
            ("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 8),
        )
    },
    "hibou_b": TimmPreset(
        arch="vit_base_patch14_reg4_dinov2",
        kwargs=(("img_size", 224), ("mlp_ratio", 2.66667 * 2), *_SWIGLU),
        convert="dinov2_hf",
        width=768,
        interpolation="bicubic",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        hub_id="histai/hibou-b",
        hub_file="model.safetensors",
    ),
    "hibou_l": TimmPreset(
        arch="vit_large_patch14_reg4_dinov2",
        kwargs=(("img_size", 224), ("mlp_ratio", 5472 / 1024), *_SWIGLU),
        convert="dinov2_hf",
        width=1024,
        interpolation="bicubic",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        hub_id="histai/hibou-L",
        hub_file="model.safetensors",
    ),
}
NOT_BUILT = {  # families a user may look for, and why they are not presets
    "conch": "CONCH v1 is a CoCa model defined in the git-only `conch` package (its tower's "
    "projection and pooling are CoCa's); use conch_v1_5, or extract with the conch package",
}


def preset(name: str) -> TimmPreset:
    """The registry entry of a foundation model or ``timm:<model>``."""
    if name.startswith(TIMM_PREFIX):
        return generic_timm_preset(name)
    if name in NOT_BUILT:
        raise InputError(f"{name!r} is not built here: {NOT_BUILT[name]}")
    if name not in PRESETS:
        raise InputError(f"{name!r} is not a timm encoder; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _register_preset(name: str, entry: TimmPreset) -> None:
    @register_encoder(name, normalization=(entry.mean, entry.std))
    def build(
        *, in_channels: int, embed_dim: int, pretrained: bool | str = False, **_
    ) -> nn.Module:
        _rgb(name, in_channels)
        return build_timm(entry, name=name, pretrained=pretrained, out_dim=embed_dim)

    build.__doc__ = f"timm {entry.arch} ({entry.hub_id or 'no published weights'})."


for _name, _entry in PRESETS.items():
    _register_preset(_name, _entry)
