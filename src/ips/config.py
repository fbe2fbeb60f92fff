"""Configuration: one frozen dataclass per concern, loaded from YAML with dotted overrides.

A YAML file holds only overrides of the defaults below, grouped by section::

    model:
      encoder: resnet18_2blocks
      embed_dim: 128
      tasks:
        majority: {kind: multiclass, num_classes: 10}
    selection:
      memory_size: 100
    train:
      lr: 1.0e-3

Unknown keys and values of the wrong type raise a ``ValueError`` naming the dotted key.
This module imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ips.errors import ConfigError, MissingFileError

TASK_KINDS = ("multiclass", "binary", "multilabel")
LOADING_MODES = ("eager", "eager_sequential", "lazy")
TISSUE_MODES = ("none", "otsu", "mask")  # data.grid.tissue
POS_ENCODINGS = ("none", "1d", "2d")
AMP_MODES = ("auto", "none", "bf16", "fp16")  # train.amp (see ips.precision.resolve_amp)


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: a head on its own query token."""

    name: str  # key of the task in targets and logits
    kind: str = "multiclass"  # "multiclass" (softmax CE), "binary" or "multilabel" (sigmoid BCE)
    num_classes: int | None = None  # classes (multiclass) or labels (multilabel); 1 for
    # binary; None: taken from the data (a table's or an image folder's classes)
    classes: tuple[str, ...] | None = None  # class (or label) names in index order; binary:
    # (negative, positive)

    def __post_init__(self) -> None:
        key = f"model.tasks.{self.name}"
        if self.kind not in TASK_KINDS:
            raise ConfigError(f"{key}.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.classes is not None:
            names = tuple(str(c) for c in self.classes)
            if len(set(names)) != len(names) or any(not c.strip() for c in names):
                raise ConfigError(f"{key}.classes must be distinct non-empty names, got {names}")
            wanted = 2 if self.kind == "binary" else self.num_classes
            if wanted is not None and len(names) != wanted:
                what = (
                    "a binary task names 2 classes"
                    if self.kind == "binary"
                    else (f"num_classes is {wanted}")
                )
                raise ConfigError(f"{key}.classes: {what}, got {len(names)} names {list(names)}")
            object.__setattr__(self, "classes", names)
        if self.kind == "binary":
            object.__setattr__(self, "num_classes", 1)
        elif self.num_classes is None:
            if self.classes is not None:
                object.__setattr__(self, "num_classes", len(self.classes))
        elif self.num_classes < 2 and self.kind == "multiclass":
            raise ConfigError(
                f"{key}.num_classes must be >= 2 for a multiclass task, got {self.num_classes}"
            )
        elif self.num_classes < 1:
            raise ConfigError(f"{key}.num_classes must be >= 1, got {self.num_classes}")

    @property
    def resolved(self) -> bool:
        """Whether the width of the task's logits is known (see ``num_classes``)."""
        return self.num_classes is not None

    @property
    def num_outputs(self) -> int:
        """Width of the task's logits."""
        if self.num_classes is None:
            raise ConfigError(
                f"model.tasks.{self.name}.num_classes: not given; set it, or train from a "
                "table or image folder, whose classes give it"
            )
        return 1 if self.kind == "binary" else self.num_classes

    def class_name(self, index: int) -> str:
        """The name of class (or label) ``index``; the index itself when the task has none."""
        return self.classes[index] if self.classes is not None else str(index)


DEFAULT_TASKS = (TaskSpec("label", "multiclass", 2),)  # model.tasks when a config names none


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: patch encoder, cross-attention pooling, heads."""

    encoder: str = "resnet18_2blocks"  # registered patch encoder (see ips.encoders)
    pretrained: bool | str = False  # True: torchvision weights; a path: a local state dict
    in_channels: int = 1  # C: channels of a pixel patch
    patch_size: int = 50  # P: side of a pixel patch
    feature_dim: int | None = None  # F: width of precomputed features (encoder "features")
    embed_dim: int = 128  # D: width of patch embeddings and query tokens
    num_heads: int = 8  # H: attention heads
    head_dim: int = 16  # D_k = D_v: width of one head
    mlp_dim: int = 512  # D_inner: hidden width of the MLP block
    num_queries: int | None = None  # T: learned query tokens; None means one per task
    dropout: float = 0.1  # dropout in the pooling transformer
    query_std: float = 1.0  # std of the learned queries at initialisation (1.0: reference)
    pos_enc: str = "none"  # "none", "1d" (raster patch index) or "2d" (row, col)
    normalize_mean: tuple[float, ...] | None = None  # per-channel mean for uint8 / 255 input
    normalize_std: tuple[float, ...] | None = None  # per-channel std for uint8 / 255 input
    channels_last: bool = True  # channels-last memory format for convolutional encoders
    freeze_encoder: bool = False  # train only the encoder's projection, pooling and heads; the
    # trunk stays as loaded (eval mode, no gradients), selection still runs on pixels
    tasks: tuple[TaskSpec, ...] = DEFAULT_TASKS  # one head per task (an image folder gives
    # the default task its class folders)

    def __post_init__(self) -> None:
        _positive(self, "model", "in_channels", "patch_size", "embed_dim", "num_heads")
        _positive(self, "model", "head_dim", "mlp_dim")
        if self.num_queries is not None and self.num_queries != len(self.tasks):
            raise ConfigError(
                f"model.num_queries must equal the number of tasks ({len(self.tasks)}): "
                f"one query token per task, got {self.num_queries}"
            )
        if self.pos_enc not in POS_ENCODINGS:
            raise ConfigError(f"model.pos_enc must be one of {POS_ENCODINGS}, got {self.pos_enc!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.tasks:
            raise ConfigError("model.tasks must name at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"model.tasks has duplicate names: {names}")
        for key in ("normalize_mean", "normalize_std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.in_channels:
                raise ConfigError(
                    f"model.{key} needs {self.in_channels} values (one per channel), "
                    f"got {len(value)}"
                )

    @property
    def queries(self) -> int:
        """T, the number of learned query tokens."""
        return len(self.tasks)


@dataclass(frozen=True)
class SelectionConfig:
    """Iterative patch selection."""

    memory_size: int = 100  # M: patches kept after each iteration
    chunk_size: int = 100  # I: patches encoded and scored per iteration
    encoder_batch_size: int | None = None  # patches per encoder call; None: 64 on CPUs, else I
    loading: str = "lazy"  # "eager", "eager_sequential" or "lazy" (see ips.model)
    dedup: bool = True  # encode identical patches (e.g. blank background) once per chunk
    distinct: bool = False  # keep one copy of identical patches in memory (collapse guard)
    shuffle: bool = True  # random patch order so that ties do not favour the first patches

    def __post_init__(self) -> None:
        _positive(self, "selection", "memory_size", "chunk_size")
        if self.encoder_batch_size is not None:
            _positive(self, "selection", "encoder_batch_size")
        if self.loading not in LOADING_MODES:
            raise ConfigError(
                f"selection.loading must be one of {LOADING_MODES}, got {self.loading!r}"
            )


@dataclass(frozen=True)
class GridConfig:
    """How an image or slide is cut into patches of side P (``model.patch_size``).

    Used whole by datasets of files (``table``, ``image_folder``), ``ips predict`` and
    ``ips extract-features``, and stored in checkpoints, so new files are read as training
    read its files.
    """

    stride: int | None = None  # grid step in read pixels; None: P (patches do not overlap)
    level: int | None = None  # pyramid level to read; at most one of level, downsample,
    downsample: float | None = None  # level-0 pixels per read pixel (resized where no level
    target_mpp: float | None = None  # fits), target_mpp (microns per read pixel); none: level 0
    mpp: float | None = None  # microns per level-0 pixel, where files do not record it
    tissue: str = "none"  # "none" (every patch), "otsu" (Otsu threshold on a thumbnail), "mask"
    # (every image needs a mask, e.g. a table's mask column); a given mask always wins
    min_tissue: float = 0.01  # least tissue fraction of a kept patch

    def __post_init__(self) -> None:
        if self.stride is not None:
            _positive(self, "data.grid", "stride")
        given = [k for k in ("level", "downsample", "target_mpp") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(
                f"data.grid: give at most one of level, downsample and target_mpp, "
                f"got {' and '.join(given)}"
            )
        if self.level is not None and self.level < 0:
            raise ConfigError(f"data.grid.level must be >= 0, got {self.level}")
        for key in ("downsample", "target_mpp", "mpp"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"data.grid.{key} must be a positive number, got {value}")
        if self.tissue not in TISSUE_MODES:
            raise ConfigError(
                f"data.grid.tissue must be one of {TISSUE_MODES}, got {self.tissue!r}"
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"data.grid.min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes to the kept patches of the gradient pass (training only; selection and
    evaluation see the patches as they are). All off by default."""

    flips: bool = False  # a random one of the 8 flips and 90-degree rotations per patch
    brightness: float = 0.0  # colour jitter per patch (torchvision ColorJitter ranges): factor
    contrast: float = 0.0  # in [1 - x, 1 + x] for brightness, contrast and saturation,
    saturation: float = 0.0  # hue shift in [-hue, hue] (hue <= 0.5)
    hue: float = 0.0
    hed: float = 0.0  # H&E stain jitter: haematoxylin, eosin and DAB amounts scaled by
    # [1 - x, 1 + x] and shifted by [-x, x] after colour deconvolution (RGB patches only)

    def __post_init__(self) -> None:
        for key in ("brightness", "contrast", "saturation", "hue", "hed"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"data.augment.{key} must be a number >= 0, got {value}")
        for key in ("brightness", "contrast", "saturation", "hed"):
            if getattr(self, key) > 1:
                raise ConfigError(f"data.augment.{key} must be <= 1, got {getattr(self, key)}")
        if self.hue > 0.5:
            raise ConfigError(f"data.augment.hue must be <= 0.5, got {self.hue}")

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return self != AugmentConfig()


@dataclass(frozen=True)
class DataConfig:
    """Dataset and loader."""

    dataset: str = "megapixel_mnist"  # registered dataset name
    path: str | None = None  # dataset file or folder (a table: its .csv / .tsv file)
    grid: GridConfig = field(default_factory=GridConfig)  # patch grid over image files
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # kept patches, training
    balance: str | None = None  # a task: draw training images by its inverse class frequency
    val_fraction: float = 0.1  # share of the training set held out for validation
    num_workers: int = 0  # DataLoader worker processes
    on_error: str = "fail"  # a sample that fails to read: "fail" the run or "skip" it (logged)
    cache_dir: str | None = None  # grid cache (tissue detection, once per file and grid);
    # None: $IPS_CACHE_DIR/grids, else ~/.cache/ips/grids; "none": no cache on disk
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific keyword arguments

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"data.on_error must be 'fail' or 'skip', got {self.on_error!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (AdamW, linear warm-up then cosine decay)."""

    epochs: int = 150  # passes over the training set
    batch_size: int = 16  # B: images per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 1e-3  # final learning rate as a fraction of the peak
    warmup_epochs: float = 10.0  # linear warm-up length, in epochs (counted in steps)
    weight_decay: float = 0.1  # AdamW weight decay
    no_decay: tuple[str, ...] = ("norm", "bias", "queries")  # parameter names without decay
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    amp: str = "auto"  # autocast: "auto" (bf16 where the device has bf16 units), "none",
    # "bf16", or "fp16" (CUDA only, with a gradient scaler)
    seed: int = 0  # seed for weights, data order and selection
    eval_every: int = 1  # evaluate every this many epochs
    log_every: int = 10  # write step metrics every this many steps
    deterministic: bool = False  # deterministic algorithms only (bit-identical CPU repeats)
    accumulate: int = 1  # micro-steps per optimizer step (B / accumulate images each)
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes (CUDA, several)

    def __post_init__(self) -> None:
        _positive(self, "train", "epochs", "batch_size", "eval_every", "log_every", "accumulate")
        if self.batch_size % self.accumulate:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.accumulate "
                f"({self.accumulate}): each micro-step takes batch_size / accumulate images"
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.amp not in AMP_MODES:
            raise ConfigError(
                f"train.amp must be 'auto', 'none', 'bf16' or 'fp16', got {self.amp!r}"
            )
        if self.warmup_epochs < 0:
            raise ConfigError(f"train.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved in checkpoints as plain data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        names = [t.name for t in self.model.tasks]
        balance = self.data.balance
        if balance is not None:
            if balance not in names:
                raise ConfigError(
                    f"data.balance: {balance!r} is not a task; expected one of {', '.join(names)}"
                )
            kind = self.model.tasks[names.index(balance)].kind
            if kind == "multilabel":
                raise ConfigError(
                    f"data.balance: task {balance!r} is multilabel; balancing needs one class "
                    "per image (a binary or multiclass task)"
                )


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value}")


# ---------------------------------------------------------------------------------------------
# plain data <-> dataclasses


def parse_tasks(value: Any, key: str = "model.tasks") -> tuple[TaskSpec, ...]:
    """Tasks from YAML: a mapping ``name -> {kind, num_classes}`` or a list of such mappings
    with a ``name`` field, or TaskSpec objects."""
    items: list[Any]
    if isinstance(value, Mapping):
        items = []
        for name, spec in value.items():
            if isinstance(spec, TaskSpec):
                items.append(spec)
                continue
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{key}.{name} must be a mapping with kind and num_classes")
            items.append({"name": name, **spec})
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
    else:
        raise ConfigError(f"{key} must be a mapping name -> {{kind, num_classes}}, got {value!r}")
    tasks = []
    for item in items:
        if isinstance(item, TaskSpec):
            tasks.append(item)
        elif isinstance(item, Mapping):
            tasks.append(_build(TaskSpec, item, f"{key}.{item.get('name', '?')}"))
        else:
            raise ConfigError(f"{key} entries must be mappings, got {item!r}")
    return tuple(tasks)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Validate (and lightly coerce) one value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected None, got {value!r}")
    if annotation is Any:
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return _build(annotation, value, key)
        raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            (item_type, _) = typing.get_args(annotation)
            return tuple(_check_type(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # pragma: no cover


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"{section}.{key}: unknown key; expected one of {', '.join(sorted(names))}"
            )
        if cls is ModelConfig and key == "tasks":
            kwargs[key] = parse_tasks(value, f"{section}.tasks")
        else:
            kwargs[key] = _check_type(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


SECTIONS = {
    "model": ModelConfig,
    "selection": SelectionConfig,
    "data": DataConfig,
    "train": TrainConfig,
}


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a validated Config from nested plain data (as in YAML or a checkpoint)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got {type(values).__name__}")
    sections = {}
    for name, section in values.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; expected one of {', '.join(SECTIONS)}")
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{name}: expected a mapping of keys, got {section!r}")
        if name == "data":
            section = _moved_stride(section)
        sections[name] = _build(SECTIONS[name], section, name)
    return Config(**sections)


def _moved_stride(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Older configs and checkpoints hold the grid step as ``data.stride``: read it as
    ``data.grid.stride``."""
    if "stride" not in data:
        return data
    data = dict(data)
    stride = data.pop("stride")
    grid = data.get("grid")
    if stride is None:
        return data
    if grid is None:
        grid = {}
    if not isinstance(grid, Mapping):
        raise ConfigError(f"data.grid: expected a mapping of keys, got {grid!r}")
    if grid.get("stride", stride) != stride:
        raise ConfigError(
            f"data.stride ({stride}) and data.grid.stride ({grid['stride']}) differ; "
            "data.stride is the older name of data.grid.stride: keep one"
        )
    data["grid"] = {**grid, "stride": stride}
    return data


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data (lists, dicts, numbers, strings): safe to store anywhere."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    out = plain(config)
    # tasks read best as a mapping name -> spec
    out["model"]["tasks"] = {
        t["name"]: {
            "kind": t["kind"],
            "num_classes": t["num_classes"],
            **({"classes": t["classes"]} if t["classes"] is not None else {}),
        }
        for t in out["model"]["tasks"]
    }
    return out


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to nested plain data."""
    values = {k: dict(v or {}) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=3e-4")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = values.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
        node[parts[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (safe loader), apply ``section.key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        values = loaded
    values = apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ValueError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def replace_fields(config: Config, **overrides: Any) -> Config:
    """Return a copy with word-named fields replaced wherever they live (model or selection).

    ``replace_fields(cfg, memory_size=10, embed_dim=64, tasks={...})``.
    """
    model: dict[str, Any] = {}
    selection: dict[str, Any] = {}
    model_hints = typing.get_type_hints(ModelConfig)
    selection_hints = typing.get_type_hints(SelectionConfig)
    for key, value in overrides.items():
        if key == "tasks":
            model[key] = parse_tasks(value)
        elif key in model_hints:
            model[key] = _check_type(value, model_hints[key], f"model.{key}")
        elif key in selection_hints:
            selection[key] = _check_type(value, selection_hints[key], f"selection.{key}")
        else:
            model_names, selection_names = set(model_hints), set(selection_hints)
            raise ConfigError(
                f"{key}: unknown model or selection option; expected one of "
                f"{', '.join(sorted(model_names | selection_names))}"
            )
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model),
        selection=dataclasses.replace(config.selection, **selection),
    )


def shipped_configs() -> dict[str, Path]:
    """The YAML configs that ship with the package, by name."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a shipped config (``megapixel_mnist_cpu``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    raise MissingFileError(
        f"{name}: no such config file, and no shipped config of that name "
        f"(shipped: {', '.join(shipped)})"
    )
