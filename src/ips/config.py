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

Every bad config raises a one-line `ConfigError` naming the dotted key and what was expected
(``train.lr: expected a finite number, got nan``), whatever the YAML holds: the checks follow
the dataclasses' annotations (`_check_type`), then each section's ``__post_init__`` checks
ranges. This module imports nothing from the package but its errors and `ips.files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ips.errors import ConfigError, MissingFileError
from ips.files import write_atomically

TASK_KINDS = ("multiclass", "binary", "multilabel")
LOADING_MODES = ("eager", "eager_sequential", "lazy")
TISSUE_MODES = ("none", "otsu", "mask")  # data.grid.tissue
POS_ENCODINGS = ("none", "1d", "2d")
AMP_MODES = ("auto", "none", "bf16", "fp16")  # train.amp (see ips.precision.resolve_amp)
INT_LIMIT = 2**63  # integers are int64 downstream (torch sizes, numpy): |value| < INT_LIMIT
SEED_LIMIT = 2**32  # train.seed: numpy seeds are >= 0; torch's seeds derive seed * ~1e6
MAX_WORKERS = 1024  # data.num_workers: one process each
MAX_DEPTH = 32  # nesting of free-form values (data.options)
MAX_VALUES = 10_000  # values in one free-form option (YAML aliases can multiply them)


# ---------------------------------------------------------------------------------------------
# one-line messages, whatever the value

_REPR = reprlib.Repr()  # a few items of a container, a few digits of a long number
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def _show(value: Any) -> str:
    """``value`` as an error message shows it: its repr, at most 80 characters of one line."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits), or holds one
        if isinstance(value, int):
            text = f"an integer of {value.bit_length()} bits"
        else:
            text = f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 80 else text[:77] + "..."


def _text(name: str) -> str:
    """A name from a config (a key, an override's path) as a message shows it."""
    return name if name.isprintable() and len(name) <= 60 else _show(name)


def _key(section: str, name: Any) -> str:
    """The dotted key of ``name`` (a key of the mapping at ``section``), for a message."""
    return f"{section}.{_text(name) if isinstance(name, str) else _show(name)}"


def _check_name(name: Any, section: str, *, what: str = "name") -> str:
    """A key of a mapping in a config: a non-empty printable string."""
    if isinstance(name, str) and name.strip() and name.isprintable():
        return name
    raise ConfigError(f"{section}: key {_show(name)} is not a {what} (expected printable text)")


def _yaml_problem(err: Exception) -> str:
    """What the YAML reader found, on one line."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{err.problem}{where}"
    return " ".join(str(err).split())


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
        _check_name(self.name, "model.tasks", what="task name")
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
    """Architecture: patch encoder, cross-attention pooling, heads.

    Why each default is what it is: a setting the reference code has takes its value (its
    Megapixel MNIST configuration and training recipe), unless its comment says "Measured":
    then it is ours, from the runs in benchmarks/defaults.md, and `REFERENCE` holds the
    reference's value. Settings the reference code lacks are marked "(ours)"; their
    comments say what they are for.
    """

    encoder: str = "resnet18_2blocks"  # registered patch encoder (see ips.encoders)
    pretrained: bool | str = False  # True: torchvision weights; a path: a local state dict
    encoder_grid: int = 1  # (ours) g: the encoder's last feature map is average-pooled to g x g
    # cells, flattened and projected to D. 1 is the reference's global average; g > 1 keeps where
    # inside a patch features lie (our CNNs and the ResNet trunks)
    in_channels: int = 1  # C: channels of a pixel patch
    patch_size: int = 50  # P: side of a pixel patch
    feature_dim: int | None = None  # F: width of precomputed features (encoder "features")
    embed_dim: int = 128  # D: width of patch embeddings and query tokens
    num_heads: int = 8  # H: attention heads
    head_dim: int = 16  # D_k = D_v: width of one head
    mlp_dim: int = 512  # D_inner: hidden width of the MLP block
    num_queries: int | None = None  # T: learned query tokens; None means one per task
    dropout: float = 0.1  # dropout in the pooling transformer
    query_std: float = 0.02  # std of the learned queries at initialisation. Measured
    # (benchmarks/defaults.md): the reference's 1.0 makes the query residual dominate the
    # pooled token (|q| ~ 11 against ~ 0.7 attended), so the heads see a near-constant input
    pos_enc: str = "none"  # "none", "1d" (raster patch index) or "2d" (row, col)
    pos_scale: float = 1.0  # amplitude of the positional encoding (1.0: the reference's sinusoids)
    normalize_mean: tuple[float, ...] | None = None  # (ours) per-channel mean for uint8 / 255 input
    normalize_std: tuple[float, ...] | None = None  # (ours) per-channel std for uint8 / 255 input
    channels_last: bool = True  # (ours) channels-last memory format for convolutional encoders
    freeze_encoder: bool = False  # (ours) train only the encoder's projection, pooling, heads; the
    # trunk stays as loaded (eval mode, no gradients), selection still runs on pixels
    tasks: tuple[TaskSpec, ...] = DEFAULT_TASKS  # (ours) one head per task (an image folder gives
    # the default task its class folders)

    def __post_init__(self) -> None:
        _positive(self, "model", "in_channels", "patch_size", "embed_dim", "num_heads")
        _positive(self, "model", "encoder_grid")
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
        if not self.query_std >= 0.0:
            raise ConfigError(f"model.query_std must be >= 0, got {self.query_std}")
        if not self.pos_scale > 0.0:
            raise ConfigError(f"model.pos_scale must be > 0, got {self.pos_scale}")
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
        if self.normalize_std is not None and not all(s > 0 for s in self.normalize_std):
            raise ConfigError(
                f"model.normalize_std: every std must be > 0, got {list(self.normalize_std)}"
            )

    @property
    def queries(self) -> int:
        """T, the number of learned query tokens."""
        return len(self.tasks)


@dataclass(frozen=True)
class SelectionConfig:
    """Iterative patch selection.

    Defaults: the reference code's values unless a comment says "Measured" or "(ours)"
    (see `ModelConfig`).
    """

    memory_size: int = 100  # M: patches kept after each iteration
    chunk_size: int = 100  # I: patches encoded and scored per iteration
    encoder_batch_size: int | None = None  # (ours) patches per encoder call; None: 64 on CPUs
    # (1024 rows for the features projector), else I
    loading: str = "lazy"  # (ours) "eager", "eager_sequential" or "lazy" (see ips.model)
    dedup: bool = True  # (ours) encode identical patches (e.g. blank background) once per chunk
    distinct: bool = True  # keep one copy of identical patches in memory. Measured
    # (benchmarks/defaults.md): a scorer trained from scratch can fill the memory with copies
    # of blank background and lose the signal for good; no effect where no patch repeats.
    # The reference lets copies compete (false)
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
    shift: int = 0  # random translation of each patch's content by up to this many pixels
    # per axis, the border mirrored (torchvision RandomCrop(P, padding=shift, "reflect"))
    brightness: float = 0.0  # colour jitter per patch (torchvision ColorJitter ranges): factor
    contrast: float = 0.0  # in [1 - x, 1 + x] for brightness, contrast and saturation,
    saturation: float = 0.0  # hue shift in [-hue, hue] (hue <= 0.5)
    hue: float = 0.0
    hed: float = 0.0  # H&E stain jitter: haematoxylin, eosin and DAB amounts scaled by
    # [1 - x, 1 + x] and shifted by [-x, x] after colour deconvolution (RGB patches only)

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise ConfigError(f"data.augment.shift must be >= 0 pixels, got {self.shift}")
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
        if not 0 <= self.num_workers <= MAX_WORKERS:
            raise ConfigError(
                f"data.num_workers must be in [0, {MAX_WORKERS}] (one process each), "
                f"got {self.num_workers}"
            )
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"data.on_error must be 'fail' or 'skip', got {self.on_error!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (AdamW, linear warm-up then cosine decay).

    Defaults: the reference code's values unless a comment says "Measured" or "(ours)"
    (see `ModelConfig`).
    """

    epochs: int = 150  # passes over the training set
    batch_size: int = 16  # B: images per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 1e-3  # final learning rate as a fraction of the peak
    warmup_epochs: float = 10.0  # linear warm-up length, in epochs (counted in steps)
    weight_decay: float = 0.1  # AdamW weight decay
    no_decay: tuple[str, ...] = ("norm", "bias", "queries")  # (ours) parameter names without decay
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    amp: str = "auto"  # (ours) autocast: "auto" (bf16 where the device has bf16 units), "none",
    # "bf16", or "fp16" (CUDA only, with a gradient scaler)
    seed: int = 0  # seed for weights, data order and selection
    eval_every: int = 1  # (ours) evaluate every this many epochs
    log_every: int = 10  # (ours) write step metrics every this many steps
    deterministic: bool = False  # (ours) deterministic algorithms only (bit-identical CPU repeats)
    accumulate: int = 1  # (ours) micro-steps per optimizer step (B / accumulate images each)
    sync_batchnorm: bool = False  # (ours) BatchNorm statistics over all processes (CUDA, several)
    activation_checkpointing: bool = False  # (ours) recompute encoder activations in backward;
    # a no-op for a frozen encoder and for features
    init_from: str | None = None  # (ours) a checkpoint whose model weights start the run
    # (fine-tuning, a curriculum); its optimizer, schedule and epoch are not used

    def __post_init__(self) -> None:
        _positive(self, "train", "epochs", "batch_size", "eval_every", "log_every", "accumulate")
        if self.batch_size % self.accumulate:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.accumulate "
                f"({self.accumulate}): each micro-step takes batch_size / accumulate images"
            )
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 (or null), got {self.grad_clip}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if self.amp not in AMP_MODES:
            raise ConfigError(
                f"train.amp must be 'auto', 'none', 'bf16' or 'fp16', got {self.amp!r}"
            )
        if self.init_from is not None and (
            not isinstance(self.init_from, str) or not self.init_from.strip()
        ):
            raise ConfigError(
                "train.init_from must be the path of a checkpoint (or null), got "
                f"{self.init_from!r}"
            )
        if not 0 <= self.warmup_epochs < INT_LIMIT:  # counted in steps, an int64
            raise ConfigError(
                f"train.warmup_epochs must be in [0, 2**63), got {self.warmup_epochs}"
            )


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


# The reference code's values of the settings it fixes for every dataset: the training recipe,
# and the method's own settings where our default is another, measured value (see the default's
# comment and benchmarks/defaults.md). `ips train` logs where a run departs from them.
REFERENCE: dict[str, Any] = {
    "model.query_std": 1.0,  # learned queries drawn from a unit normal
    "model.pos_scale": 1.0,  # unit sinusoids added to the embeddings
    "selection.distinct": False,  # copies of a patch compete for the memory like any patch
    "train.batch_size": 16,
    "train.min_lr_ratio": 1e-3,
    "train.warmup_epochs": 10.0,
    "train.weight_decay": 0.1,
}


def reference_departures(config: Config) -> list[str]:
    """``key=value (reference: value)`` for each setting of `REFERENCE` that ``config`` sets
    otherwise, in the table's order."""
    departures = []
    for key, reference in REFERENCE.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value != reference:
            departures.append(f"{key}={_yaml_value(value)} (reference: {_yaml_value(reference)})")
    return departures


def _yaml_value(value: Any) -> str:
    """A setting as a YAML file (and ``--set``) writes it: true, 0.02, 1.0e-3."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:  # (written so that NaN fails too)
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value}")


# ---------------------------------------------------------------------------------------------
# plain data <-> dataclasses


def parse_tasks(value: Any, key: str = "model.tasks") -> tuple[TaskSpec, ...]:
    """Tasks from YAML: a mapping ``name -> {kind, num_classes}`` or a list of such mappings
    with a ``name`` field, or TaskSpec objects."""
    if isinstance(value, Mapping):
        entries = list(value.items())
    elif isinstance(value, (list, tuple)):
        entries = [_listed_task(item, f"{key}[{i}]") for i, item in enumerate(value)]
    else:
        raise ConfigError(
            f"{key}: expected a mapping name -> {{kind, num_classes}}, got {_show(value)}"
        )
    tasks = []
    for name, spec in entries:
        if isinstance(spec, TaskSpec):
            tasks.append(spec)
            continue
        where = _key(key, _check_name(name, key, what="task name"))
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping with kind and num_classes, got {_show(spec)}"
            )
        if spec.get("name", name) != name:
            raise ConfigError(f"{where}.name: the key names the task, got {_show(spec['name'])}")
        tasks.append(_build(TaskSpec, {**spec, "name": name}, where))
    return tuple(tasks)


def _listed_task(item: Any, where: str) -> tuple[Any, Any]:
    """(name, spec) of an entry ``{name, kind, num_classes}`` of a list of tasks."""
    if isinstance(item, TaskSpec):
        return item.name, item
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping with name, kind and num_classes, got {_show(item)}"
        )
    if "name" not in item:
        raise ConfigError(f"{where}.name: missing; each task of a list names itself")
    return item["name"], item


_EXPECTED = {
    bool: "a boolean",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    type(None): "null",
}


def _expected(annotation: Any) -> str:
    """What a field of type ``annotation`` takes, in words."""
    if annotation in _EXPECTED:
        return _EXPECTED[annotation]
    if typing.get_origin(annotation) is tuple:
        return "a list"
    return "a mapping of keys"  # a dataclass or a dict


def _check_type(value: Any, annotation: Any, key: str, *, or_null: bool = False) -> Any:
    """Validate (and lightly coerce) one value against a field annotation.

    Any other value raises a one-line ConfigError naming ``key`` and what it takes (``or_null``:
    the field takes null too). Numbers are what torch and numpy take: floats finite, integers
    int64; a string holds no NUL (paths); mappings have names as keys.
    """

    def wrong(expected: str | None = None) -> ConfigError:
        also = " or null" if or_null else ""
        return ConfigError(
            f"{key}: expected {expected or _expected(annotation)}{also}, got {_show(value)}"
        )

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(options) < len(typing.get_args(annotation))
        if value is None and nullable:
            return None
        if len(options) == 1:  # X | None: X's message, which may name an item (key[0])
            return _check_type(value, options[0], key, or_null=nullable)
        for option in options:
            with contextlib.suppress(ConfigError):
                return _check_type(value, option, key)
        raise wrong(" or ".join(_expected(a) for a in typing.get_args(annotation)))
    if annotation is Any:
        return _check_plain(value, key)
    if annotation == tuple[TaskSpec, ...]:  # a mapping name -> spec, or a list
        return parse_tasks(value, key)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return _build(annotation, value, key)
        raise wrong()
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong()
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise wrong("an integer in [-2**63, 2**63)")
        return value
    if annotation is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            try:
                number = float(number)
            except OverflowError:  # an int beyond the floats
                number = math.inf
            if math.isfinite(number):
                return number
        raise wrong()
    if annotation is str:
        if not isinstance(value, str):
            raise wrong()
        if "\x00" in value:
            raise wrong("a string without NUL characters")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        (item_type, _) = typing.get_args(annotation)
        return tuple(_check_type(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        (_, item_type) = typing.get_args(annotation)
        return {
            _check_name(name, key): _check_type(item, item_type, _key(key, name))
            for name, item in value.items()
        }
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # pragma: no cover


def _check_plain(value: Any, key: str) -> Any:
    """A free-form value (an entry of ``data.options``), passed on as it is: a tree of bounded
    depth and size, so that it can be stored and shown (a YAML alias can make a list hold
    itself, or a few lines hold a billion values)."""
    stack, seen = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_VALUES:
            raise ConfigError(
                f"{key}: expected plain data, nested at most {MAX_DEPTH} deep and at most "
                f"{MAX_VALUES} values (a YAML alias to itself?)"
            )
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in item)
    return value


def _build(cls: type, values: Mapping[Any, Any], section: str) -> Any:
    """The dataclass ``cls`` from a mapping of (some of) its fields, each one checked."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if _check_name(key, section) not in names:
            raise ConfigError(
                f"{_key(section, key)}: unknown key; expected one of {', '.join(sorted(names))}"
            )
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
        raise ConfigError(f"config: expected a mapping of sections, got {_show(values)}")
    sections = {}
    for name, section in values.items():
        if not isinstance(name, str):
            raise ConfigError(
                f"config: key {_show(name)} is not a section name; expected one of "
                f"{', '.join(SECTIONS)}"
            )
        if name not in SECTIONS:
            raise ConfigError(
                f"{_text(name)}: unknown section; expected one of {', '.join(SECTIONS)}"
            )
        if section is None:  # "model:" with nothing under it
            section = {}
        if name == "data" and isinstance(section, Mapping):
            section = _moved_stride(section)
        sections[name] = _check_type(section, SECTIONS[name], name)
    return Config(**sections)


def _moved_stride(data: Mapping[Any, Any]) -> Mapping[Any, Any]:
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
        raise ConfigError(f"data.grid: expected a mapping of keys, got {_show(grid)}")
    if grid.get("stride", stride) != stride:
        raise ConfigError(
            f"data.stride ({_show(stride)}) and data.grid.stride ({_show(grid['stride'])}) "
            "differ; data.stride is the older name of data.grid.stride: keep one"
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


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to nested plain data.

    ``values`` stays as it was: the mappings on an override's path are copied. A missing or
    null mapping on the path becomes an empty one; any other value there is an error.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {_show(values)}")
    out = dict(values)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(
                    f"override {_show(item)}: {_text('.'.join(path[: depth + 1]))} is "
                    f"{_show(child)}, not a mapping"
                )
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` as (["section", "key"], value read as YAML; nothing: null)."""
    dotted, sep, raw = item.partition("=") if isinstance(item, str) else ("", "", "")
    path = [part.strip() for part in dotted.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"override {_show(item)}: expected section.key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an int too long
        raise ConfigError(
            f"override {_show(item)}: the value is not valid YAML ({_yaml_problem(err)})"
        ) from None
    return path, value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (safe loader), apply ``section.key=value`` overrides, validate."""
    values: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an int too long
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(values).__name__}"
            )
    values = apply_overrides(values, overrides)
    try:
        return config_from_dict(values)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (`ips.files.atomic_write`).

    Raises:
        WriteError: the file could not be written; one line naming ``path``, which is kept.
    """
    write_atomically(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def replace_fields(config: Config, **overrides: Any) -> Config:
    """Return a copy with word-named fields replaced wherever they live (model or selection).

    ``replace_fields(cfg, memory_size=10, embed_dim=64, tasks={...})``.
    """
    model: dict[str, Any] = {}
    selection: dict[str, Any] = {}
    model_hints = typing.get_type_hints(ModelConfig)
    selection_hints = typing.get_type_hints(SelectionConfig)
    for key, value in overrides.items():
        if key in model_hints:
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
