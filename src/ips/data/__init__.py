"""Datasets and batching."""

from ips.data.collate import collate_patches
from ips.data.megapixel_mnist import TASKS as MEGAPIXEL_MNIST_TASKS
from ips.data.megapixel_mnist import MegapixelMNIST, generate_megapixel_mnist
from ips.data.mnist import MnistDigits, load_mnist
from ips.data.registry import build_dataset, list_datasets, register_dataset, split_indices

__all__ = [
    "MEGAPIXEL_MNIST_TASKS",
    "MegapixelMNIST",
    "MnistDigits",
    "build_dataset",
    "collate_patches",
    "generate_megapixel_mnist",
    "list_datasets",
    "load_mnist",
    "register_dataset",
    "split_indices",
]
