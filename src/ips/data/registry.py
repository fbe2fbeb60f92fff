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


@register_dataset("megapixel_mnist")
def _megapixel_mnist(config: Config, split: str, indices: np.ndarray | None) -> Dataset:
    """A file written by ``ips make-mnist`` (rendered on the fly)."""
    from ips.data.megapixel_mnist import MegapixelMNIST

    return MegapixelMNIST(
        _require_path(config),
        split,
        patch_size=config.model.patch_size,
        stride=config.data.stride,
        indices=None if indices is None else indices.tolist(),
        **config.data.options,
    )
