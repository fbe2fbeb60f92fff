"""Datasets and batching."""

from ips.data.camelyon16 import Camelyon16Bags, camelyon16_slides, read_asap_xml, write_asap_xml
from ips.data.collate import collate_patches
from ips.data.feature_bags import FeatureBag, FeatureBagDataset, open_feature_bag
from ips.data.megapixel_mnist import TASKS as MEGAPIXEL_MNIST_TASKS
from ips.data.megapixel_mnist import MegapixelMNIST, generate_megapixel_mnist
from ips.data.mnist import MnistDigits, load_mnist
from ips.data.registry import build_dataset, list_datasets, register_dataset, split_indices
from ips.data.traffic_signs import TrafficSigns, download_traffic_signs

__all__ = [
    "MEGAPIXEL_MNIST_TASKS",
    "Camelyon16Bags",
    "FeatureBag",
    "FeatureBagDataset",
    "MegapixelMNIST",
    "MnistDigits",
    "TrafficSigns",
    "build_dataset",
    "camelyon16_slides",
    "collate_patches",
    "download_traffic_signs",
    "generate_megapixel_mnist",
    "list_datasets",
    "load_mnist",
    "open_feature_bag",
    "read_asap_xml",
    "register_dataset",
    "split_indices",
    "write_asap_xml",
]
