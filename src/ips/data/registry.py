"""Dataset builders by name: ``build_dataset(config, "train" | "val" | "test")``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ips.config import DEFAULT_TASKS, Config
from ips.errors import InputError, MissingFileError

DatasetBuilder = Callable[[Config, str, "np.ndarray | None"], "Dataset | None"]
Resolver = Callable[[Config], Config]
_DATASETS: dict[str, DatasetBuilder] = {}
_OWN_SPLITS: set[str] = set()  # builders that serve "val" themselves
_RESOLVERS: dict[str, Resolver] = {}
SPLITS = ("train", "val", "test")


def register_dataset(
    name: str, *, own_splits: bool = False, resolve: Resolver | None = None
) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register ``fn(config, split, indices) -> Dataset``.

    By default ``fn`` is asked for "train" and "test" and the validation set is carved from
    the training set (``indices``); with ``own_splits`` it is asked for "train", "val" and
    "test" itself (``indices`` None) and may return None for "val" (no validation set).
    ``resolve(config) -> config`` fills in what the data decides (e.g. class names) before
    a model is built (`resolve_config`).
    """

    def wrap(fn: DatasetBuilder) -> DatasetBuilder:
        if name in _DATASETS:
            raise InputError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = fn
        if own_splits:
            _OWN_SPLITS.add(name)
        if resolve is not None:
            _RESOLVERS[name] = resolve
        return fn

    return wrap


def resolve_config(config: Config) -> Config:
    """``config`` with what its dataset decides filled in (class names and counts of a table
    or image folder); other datasets return it as it is."""
    _known(config)
    resolver = _RESOLVERS.get(config.data.dataset)
    return config if resolver is None else resolver(config)


def _known(config: Config) -> None:
    if config.data.dataset not in _DATASETS:
        raise InputError(
            f"data.dataset: unknown dataset {config.data.dataset!r}; "
            f"expected one of {list_datasets()}"
        )


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def split_indices(num_items: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train / validation split of range(num_items)."""
    order = np.random.default_rng(seed).permutation(num_items)
    n_val = int(round(num_items * val_fraction))
    if val_fraction > 0 and num_items > 1:
        n_val = min(max(n_val, 1), num_items - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def build_dataset(config: Config, split: str) -> Dataset:
    """The dataset of ``config.data`` for ``split``; "val" is carved from the training set
    (``data.val_fraction``, seeded by ``train.seed``)."""
    dataset = _build(config, split)
    if dataset is None:
        raise InputError(
            f"data.val_fraction is 0 and the {config.data.dataset} dataset has no validation split"
        )
    return dataset


def build_validation(config: Config) -> Dataset | None:
    """The validation set, or None when there is none (``data.val_fraction`` 0 and no
    validation split of the dataset's own)."""
    return _build(config, "val")


def _build(config: Config, split: str) -> Dataset | None:
    data = config.data
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    _known(config)
    builder = _DATASETS[data.dataset]
    if split == "test" or data.dataset in _OWN_SPLITS:
        return builder(config, split, None)
    if split == "val" and data.val_fraction == 0:
        return None
    full = builder(config, "train", None)
    train_ids, val_ids = split_indices(len(full), data.val_fraction, config.train.seed)
    return builder(config, "train", train_ids if split == "train" else val_ids)


def _require_path(config: Config) -> Path:
    if config.data.path is None:
        raise InputError(f"data.path: the {config.data.dataset} dataset needs a path")
    path = Path(config.data.path).expanduser()
    if not path.exists():
        raise MissingFileError(f"data.path: {path} does not exist")
    return path


def _check_pixel_model(config: Config, channels: int, tasks: dict[str, tuple[str, int]]) -> None:
    """Fail before any work when the model cannot read or learn a pixel dataset of
    ``channels``-channel images labelled for ``tasks`` (name -> (kind, classes))."""
    model, name = config.model, config.data.dataset
    if model.encoder == "features":
        raise InputError(
            f"model.encoder: the {name} dataset gives pixel patches, but the encoder "
            "'features' reads precomputed features"
        )
    if model.in_channels != channels:
        raise InputError(
            f"model.in_channels: the {name} dataset has {channels}-channel images, "
            f"got {model.in_channels}"
        )
    for task in model.tasks:
        if task.name not in tasks:
            raise InputError(
                f"model.tasks.{task.name}: the {name} dataset has no such task; "
                f"expected one of {', '.join(tasks)}"
            )
        kind, classes = tasks[task.name]
        if (task.kind, task.num_classes) != (kind, classes):
            raise InputError(
                f"model.tasks.{task.name}: the {name} dataset labels it {kind} with {classes} "
                f"classes, got {task.kind} with {task.num_classes}"
            )


@register_dataset("megapixel_mnist")
def _megapixel_mnist(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """A file written by ``ips make-mnist`` (rendered on the fly)."""
    from ips.data.megapixel_mnist import MegapixelMNIST

    _check_pixel_model(config, MegapixelMNIST.channels, MegapixelMNIST.tasks)
    _fixed_grid(config, allowed=("stride",))
    return MegapixelMNIST(
        _require_path(config),
        split,
        patch_size=config.model.patch_size,
        stride=config.data.grid.stride,
        indices=None if indices is None else indices.tolist(),
        **config.data.options,
    )


def _fixed_grid(config: Config, allowed: tuple[str, ...] = ()) -> None:
    """Fail when ``data.grid`` sets what the dataset's own fixed grid does not read."""
    from ips.config import GridConfig

    default = GridConfig()
    for field in dataclasses.fields(GridConfig):
        name = field.name
        if name not in allowed and getattr(config.data.grid, name) != getattr(default, name):
            raise InputError(
                f"data.grid.{name}: the {config.data.dataset} dataset has a fixed patch grid "
                f"and does not read it (data.grid applies to the table and image_folder "
                "datasets)"
            )


def _options(config: Config, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(config.data.options) - set(allowed))
    if unknown:
        raise InputError(
            f"data.options: unknown key(s) {', '.join(unknown)} for the {config.data.dataset} "
            f"dataset; expected some of {', '.join(allowed)}"
        )
    return dict(config.data.options)


@register_dataset("camelyon16")
def _camelyon16(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """A CAMELYON16 folder (labels from its layout) and a folder of feature bags
    (``data.options.features``, default ``<data.path>/features``)."""
    from ips.data.camelyon16 import Camelyon16Bags

    options = _options(config, ("features", "missing", "in_memory"))
    _fixed_grid(config)
    return Camelyon16Bags(
        _require_path(config),
        split,
        tasks=config.model.tasks,
        feature_dim=config.model.feature_dim,
        indices=None if indices is None else indices.tolist(),
        **options,
    )


@register_dataset("feature_bags")
def _feature_bags(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """A folder of feature bags with a labels CSV (``data.options.labels``, default
    ``<data.path>/labels.csv``: ``slide``, one column per task, optional ``split``)."""
    from ips.data.feature_bags import FeatureBagDataset, labelled_bags, read_labels_csv

    options = _options(config, ("labels", "missing", "in_memory"))
    _fixed_grid(config)
    folder = _require_path(config)
    labels = Path(options.get("labels") or folder / "labels.csv")
    bags, targets, names = labelled_bags(
        folder,
        read_labels_csv(labels),
        config.model.tasks,
        split,
        source=str(labels),
        missing=options.get("missing", "fail"),
    )
    if indices is not None:
        bags, targets, names = ([seq[i] for i in indices] for seq in (bags, targets, names))
    return FeatureBagDataset(
        bags,
        targets,
        config.model.tasks,
        feature_dim=config.model.feature_dim,
        names=names,
        in_memory=bool(options.get("in_memory", False)),
    )


@register_dataset("traffic_signs")
def _traffic_signs(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """Sets 1 and 2 of the Swedish traffic signs (summer); see ips.data.traffic_signs."""
    from ips.data.traffic_signs import TrafficSigns

    options = _options(config, ("train_set", "image_size", "augment", "download", "sha256"))
    _fixed_grid(config)
    if config.data.path is None:
        raise InputError("data.path: the traffic_signs dataset needs a path")
    root = Path(config.data.path).expanduser()
    if not options.get("download") and not root.exists():
        raise MissingFileError(f"data.path: {root} does not exist")
    return TrafficSigns(
        root,
        split,
        patch_size=config.model.patch_size,
        indices=None if indices is None else indices.tolist(),
        **options,
    )


# ---- your own images and slides ---------------------------------------------------------------


def grid_cache(config: Config):
    """The `GridCache` of ``data.cache_dir`` (None: the default folder, "none": memory only)."""
    from ips.sources.grid_cache import GridCache, default_cache_dir

    folder = config.data.cache_dir
    if folder is None:
        return GridCache(default_cache_dir())
    return GridCache(None if folder.lower() == "none" else Path(folder).expanduser())


def _rows(config: Config):
    """(rows of every split, where they come from) of a table or an image folder."""
    from ips.data.table import read_image_folder, read_table

    path = _require_path(config)
    names = [t.name for t in config.model.tasks]
    if config.data.dataset == "table":
        return read_table(path, names), str(path)
    if len(config.model.tasks) != 1 or config.model.tasks[0].kind != "multiclass":
        raise InputError(
            "model.tasks: an image folder has one multiclass task (its classes are the folder "
            f"names), got {', '.join(f'{t.name} ({t.kind})' for t in config.model.tasks)}"
        )
    rows, classes = read_image_folder(path, names[0])
    task = config.model.tasks[0]
    if task.classes is not None and set(task.classes) != set(classes):
        raise InputError(
            f"model.tasks.{task.name}.classes: {path} has the class folders "
            f"{', '.join(classes)}, the config lists {', '.join(task.classes)}"
        )
    return rows, str(path)


def _resolve_images(config: Config) -> Config:
    """Class names and counts from a table's task columns or an image folder's folders."""
    return _resolved_images(config)[0]


def _resolved_images(config: Config):
    """(resolved config, rows of every split, their source)."""
    from ips.data.table import resolve_tasks

    if config.model.encoder == "features":
        raise InputError(
            f"model.encoder: the {config.data.dataset} dataset gives pixel patches, but the "
            "encoder 'features' reads precomputed features (use data.dataset: feature_bags)"
        )
    _options(config, ())
    rows, source = _rows(config)
    tasks = config.model.tasks
    if config.data.dataset == "image_folder" and tasks == DEFAULT_TASKS:  # no task named:
        tasks = (dataclasses.replace(tasks[0], num_classes=None),)  # the folders decide
    model = dataclasses.replace(config.model, tasks=resolve_tasks(rows, tasks, source))
    return dataclasses.replace(config, model=model), rows, source


def _image_dataset(config: Config, split: str, indices: np.ndarray | None) -> Dataset | None:
    """The images of one split of a table or an image folder; "val": the rows marked so, else
    a seeded ``data.val_fraction`` of the training rows (None when that is 0)."""
    from ips.data.table import ImageDataset, check_files, split_rows

    config, rows, source = _resolved_images(config)
    fail = config.data.on_error == "fail"
    if fail:  # every missing file of the table at once, before any training
        check_files(rows, source, fail=True)
    if split == "test":
        chosen = split_rows(rows, "test")
        if not chosen:
            raise InputError(
                f"{source}: there is no test split (no row has split 'test'); "
                "mark test rows in a split column"
            )
    elif split_rows(rows, "val"):
        chosen = split_rows(rows, split)
    else:
        train = split_rows(rows, "train")
        if split == "val" and config.data.val_fraction == 0:
            return None
        keep, held = split_indices(len(train), config.data.val_fraction, config.train.seed)
        chosen = [train[i] for i in (keep if split == "train" else held)]
    if not fail:
        chosen = check_files(chosen, f"{source} ({split} split)", fail=False)
    if not chosen:
        raise InputError(f"{source}: the {split} split has no images")
    return ImageDataset(
        chosen,
        config.model.tasks,
        patch_size=config.model.patch_size,
        grid=config.data.grid,
        channels=config.model.in_channels,
        grid_cache=grid_cache(config),
    )


register_dataset("table", own_splits=True, resolve=_resolve_images)(_image_dataset)
register_dataset("image_folder", own_splits=True, resolve=_resolve_images)(_image_dataset)
