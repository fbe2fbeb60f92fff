"""Tiny CPU fixtures shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TEST_DATA = Path(__file__).resolve().parent / "data"  # real data shipped with the tests
MNIST_TINY = TEST_DATA / "mnist_tiny.npz"  # 30 train + 10 test MNIST digits per class
CMU_SVS = TEST_DATA / "cmu_small_region.svs"  # a real Aperio slide crop, 2220 x 2967 px

TINY = dict(
    embed_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    in_channels=1,
    patch_size=8,
    dropout=0.0,
    tasks={
        "digit": {"kind": "multiclass", "num_classes": 3},
        "tumour": {"kind": "binary"},
        "labels": {"kind": "multilabel", "num_classes": 4},
    },
)

TINY_MNIST_SETS = [  # `--set` overrides that shrink a shipped Megapixel MNIST config to seconds
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.head_dim=8",
    "model.mlp_dim=32",
    "model.patch_size=30",
    "selection.memory_size=4",
    "selection.chunk_size=8",
]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is (CI has none: they are skipped there)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def grid_cache_dir(tmp_path_factory):
    """Grid caches go to a folder of the test session, not to ~/.cache."""
    previous = os.environ.get("IPS_CACHE_DIR")
    os.environ["IPS_CACHE_DIR"] = str(tmp_path_factory.mktemp("ips_cache"))
    yield Path(os.environ["IPS_CACHE_DIR"])
    if previous is None:
        os.environ.pop("IPS_CACHE_DIR", None)
    else:
        os.environ["IPS_CACHE_DIR"] = previous


@pytest.fixture
def tiny() -> dict:
    """Word-named create_model overrides for a tiny three-task pixel model."""
    return dict(TINY)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def random_patches(b: int, n: int, c: int = 1, p: int = 8, seed: int = 0) -> torch.Tensor:
    """(B, N, C, P, P) uint8 patches with no two alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n, c, p, p), generator=g, dtype=torch.uint8)


def random_targets(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "digit": torch.randint(0, 3, (b,), generator=g),
        "tumour": torch.randint(0, 2, (b,), generator=g).float(),
        "labels": torch.randint(0, 2, (b, 4), generator=g).float(),
    }


def random_digits(seed: int = 0):
    """Noise in place of MNIST digits (40 train, 20 test, every class): enough to write a tiny
    Megapixel MNIST file without reading MNIST."""
    import numpy as np

    from ips.data.mnist import MnistDigits

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels = np.arange(60, dtype=np.int64) % 10
    return MnistDigits(images[:40], labels[:40], images[40:], labels[40:], source="noise")


def megapixel_mnist_test_metrics(checkpoint: Path, data: Path) -> dict[str, float]:
    """Majority accuracy, multi exact match and multi label accuracy of a checkpoint on the test
    split of a Megapixel MNIST file, computed here from the model's logits and the targets the
    file stores: the values `ips eval` must report. The test split goes in as one batch, with
    the checkpoint's precision; the checkpoint must have been trained with
    ``selection.shuffle=false`` so that the selection does not depend on a generator."""
    import numpy as np

    from ips.data.megapixel_mnist import MegapixelMNIST
    from ips.model import load_model_and_config
    from ips.precision import autocast

    model, config = load_model_and_config(checkpoint)
    assert not config.selection.shuffle, "train with selection.shuffle=false"
    dataset = MegapixelMNIST(data, "test", patch_size=config.model.patch_size)
    patches = torch.stack([dataset[i]["patches"] for i in range(len(dataset))])  # (B, N, 1, P, P)
    mask = torch.ones(patches.shape[:2], dtype=torch.bool)  # (B, N)
    with torch.no_grad(), autocast(torch.device("cpu"), config.train.amp):
        logits = model.eval()(patches, mask, grid_shape=dataset.grid_shape).logits
    with np.load(data) as npz:
        majority = torch.from_numpy(npz["test_target_majority"].astype(np.int64))  # (B,)
        multi = torch.from_numpy(npz["test_target_multi"].astype(bool))  # (B, 10)
    hits = (logits["multi"].float() > 0) == multi  # a label is present when its logit is > 0
    return {
        "majority_accuracy": (logits["majority"].argmax(-1) == majority).float().mean().item(),
        "multi_exact_match": hits.all(-1).float().mean().item(),
        "multi_label_accuracy": hits.float().mean().item(),
    }
