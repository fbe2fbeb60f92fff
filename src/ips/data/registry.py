"""Dataset builders by name: ``build_dataset(config, "train" | "val" | "test")``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ips.config import Config

DatasetBuilder = Callable[[Config, str, "np.ndarray | None"], Dataset]
_DATASETS: dict[str, DatasetBuilder] = {}
SPLITS = ("train", "val", "test")


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register ``fn(config, split, indices) -> Dataset`` (split "train" or "test")."""

    def wrap(fn: DatasetBuilder) -> DatasetBuilder:
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return wrap


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
    data = config.data
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data.dataset not in _DATASETS:
        raise ValueError(
            f"data.dataset: unknown dataset {data.dataset!r}; expected one of {list_datasets()}"
        )
    builder = _DATASETS[data.dataset]
    if split == "test":
        return builder(config, "test", None)
    full = builder(config, "train", None)
    train_ids, val_ids = split_indices(len(full), data.val_fraction, config.train.seed)
    return builder(config, "train", train_ids if split == "train" else val_ids)


def _require_path(config: Config) -> Path:
    if config.data.path is None:
        raise ValueError(f"data.path: the {config.data.dataset} dataset needs a path")
    path = Path(config.data.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path: {path} does not exist")
    return path


def _check_pixel_model(config: Config, channels: int, tasks: dict[str, tuple[str, int]]) -> None:
    """Fail before any work when the model cannot read or learn a pixel dataset of
    ``channels``-channel images labelled for ``tasks`` (name -> (kind, classes))."""
    model, name = config.model, config.data.dataset
    if model.encoder == "features":
        raise ValueError(
            f"model.encoder: the {name} dataset gives pixel patches, but the encoder "
            "'features' reads precomputed features"
        )
    if model.in_channels != channels:
        raise ValueError(
            f"model.in_channels: the {name} dataset has {channels}-channel images, "
            f"got {model.in_channels}"
        )
    for task in model.tasks:
        if task.name not in tasks:
            raise ValueError(
                f"model.tasks.{task.name}: the {name} dataset has no such task; "
                f"expected one of {', '.join(tasks)}"
            )
        kind, classes = tasks[task.name]
        if (task.kind, task.num_classes) != (kind, classes):
            raise ValueError(
                f"model.tasks.{task.name}: the {name} dataset labels it {kind} with {classes} "
                f"classes, got {task.kind} with {task.num_classes}"
            )


@register_dataset("megapixel_mnist")
def _megapixel_mnist(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """A file written by ``ips make-mnist`` (rendered on the fly)."""
    from ips.data.megapixel_mnist import MegapixelMNIST

    _check_pixel_model(config, MegapixelMNIST.channels, MegapixelMNIST.tasks)
    return MegapixelMNIST(
        _require_path(config),
        split,
        patch_size=config.model.patch_size,
        stride=config.data.stride,
        indices=None if indices is None else indices.tolist(),
        **config.data.options,
    )


def _options(config: Config, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(config.data.options) - set(allowed))
    if unknown:
        raise ValueError(
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
    if config.data.path is None:
        raise ValueError("data.path: the traffic_signs dataset needs a path")
    root = Path(config.data.path).expanduser()
    if not options.get("download") and not root.exists():
        raise FileNotFoundError(f"data.path: {root} does not exist")
    return TrafficSigns(
        root,
        split,
        patch_size=config.model.patch_size,
        indices=None if indices is None else indices.tolist(),
        **options,
    )
