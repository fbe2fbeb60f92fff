"""Selection and training over slides streamed lazily from disk (TiffSource)."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ips
from conftest import random_targets
from ips.data import collate_patches
from ips.sources import TiffSource, write_synthetic_slide


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: with several threads, thread hand-offs dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two small slides of different sizes and a larger one."""
    folder = tmp_path_factory.mktemp("slides")
    small = write_synthetic_slide(folder / "a.tif", width=256, height=192, tile_size=64, seed=1)
    wide = write_synthetic_slide(
        folder / "b.tif", width=320, height=192, tile_size=64, seed=2, lesions=1
    )
    large = write_synthetic_slide(folder / "c.tif", width=512, height=512, tile_size=64, seed=3)
    return {"small": small.path, "wide": wide.path, "large": large.path}


def _model(tiny, patch_size: int, **kw) -> ips.IPSModel:
    torch.manual_seed(0)
    overrides = {"in_channels": 3, "patch_size": patch_size, "memory_size": 6, "chunk_size": 5}
    return ips.create_model(**{**tiny, **overrides, **kw})


def _in_memory(sources: list[TiffSource]) -> tuple[torch.Tensor, torch.Tensor]:
    """All patches of each source read into one zero-padded (B, N_max, C, P, P) tensor + mask."""
    n = max(len(s) for s in sources)
    p = sources[0].patch_size
    patches = torch.zeros(len(sources), n, 3, p, p, dtype=torch.uint8)
    mask = torch.zeros(len(sources), n, dtype=torch.bool)
    for b, source in enumerate(sources):
        patches[b, : len(source)] = torch.from_numpy(source.read(np.arange(len(source))))
        mask[b, : len(source)] = True
    return patches, mask


@pytest.mark.parametrize("tissue", [None, "otsu"])
def test_lazy_selection_over_slides_equals_eager_selection_over_the_same_patches(
    slides, tiny, tissue
):
    sources = [TiffSource(slides[k], patch_size=16, tissue=tissue) for k in ("small", "wide")]
    assert len(sources[0]) != len(sources[1])
    model = _model(tiny, patch_size=16)
    lazy = model.select(sources, generator=torch.Generator().manual_seed(7))
    patches, mask = _in_memory(sources)
    eager = model.select(patches, mask, generator=torch.Generator().manual_seed(7))
    assert torch.equal(lazy.ids, eager.ids)
    assert torch.equal(lazy.mask, eager.mask)
    assert torch.allclose(lazy.scores, eager.scores, atol=1e-6)
    for b, source in enumerate(sources):
        assert int(lazy.ids[b].max()) < len(source)


class _CountingSource(TiffSource):
    """A TiffSource that counts the patches it has read that are still alive."""

    def __init__(self, *args, stats: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats
        self._count_lock = threading.Lock()  # reads come from the prefetch thread too

    def read(self, ids) -> np.ndarray:
        out = super().read(ids)
        with self._count_lock:
            self.stats["alive"] += len(out)
            self.stats["total"] += len(out)
            self.stats["max_alive"] = max(self.stats["max_alive"], self.stats["alive"])
            self.stats["max_read"] = max(self.stats["max_read"], len(out))
        weakref.finalize(out, self._forget, len(out))
        return out

    def _forget(self, k: int) -> None:
        with self._count_lock:
            self.stats["alive"] -= k


def _stats() -> dict:
    return {"alive": 0, "total": 0, "max_alive": 0, "max_read": 0}


@pytest.mark.parametrize(("m", "i"), [(8, 16), (16, 8)])
@pytest.mark.parametrize("patch_size", [32, 8])  # N = 256 or 4096 patches of the same slide
def test_at_most_m_plus_i_slide_patches_are_ever_resident(slides, tiny, m, i, patch_size):
    stats = _stats()
    source = _CountingSource(slides["large"], patch_size=patch_size, stats=stats)
    n = len(source)
    assert n == (512 // patch_size) ** 2
    model = _model(tiny, patch_size=patch_size, memory_size=m, chunk_size=i)

    model.select([source])
    assert stats["max_read"] <= max(m, i)
    assert stats["max_alive"] <= m + i
    assert stats["total"] == n  # every patch read exactly once
    assert stats["alive"] == 0

    stats.update(_stats())
    model.train()
    out = model([source])  # selection, then the M kept patches read again for the gradients
    out.logits["tumour"].sum().backward()
    assert stats["max_alive"] <= m + i
    assert stats["total"] == n + m
    assert stats["alive"] == 0


def test_a_training_step_over_two_slides_of_different_n_reaches_the_encoder(slides, tiny):
    sources = [TiffSource(slides[k], patch_size=16) for k in ("small", "wide")]
    model = _model(tiny, patch_size=16).train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(sources, generator=torch.Generator().manual_seed(0))
    loss, _ = ips.compute_loss(out.logits, random_targets(2), model.tasks)
    loss.backward()
    for name, param in model.encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    optimizer.step()
    after = model.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert out.selected.shape == (2, 6) and bool(out.mask.all())
    for b, source in enumerate(sources):
        assert int(out.selected[b].max()) < len(source)


class _SlideDataset(Dataset):
    """Items {"patches": a TiffSource opened in the worker, "targets": {...}, "index": i}."""

    def __init__(self, paths: list, patch_size: int) -> None:
        self.paths, self.patch_size = paths, patch_size

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        source = TiffSource(self.paths[i % len(self.paths)], patch_size=self.patch_size)
        targets = {
            "digit": i % 3,
            "tumour": float(i % 2),
            "labels": torch.tensor([1.0, 0.0, float(i % 2), 1.0]),
        }
        return {"patches": source, "targets": targets, "index": i}


def test_a_dataloader_with_workers_feeds_slide_sources_to_the_model(slides, tiny):
    dataset = _SlideDataset([slides["small"], slides["wide"]], patch_size=16)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_patches)
    model = _model(tiny, patch_size=16).train()
    seen = []
    for batch in loader:
        assert isinstance(batch["patches"], list) and batch["mask"] is None
        assert all(isinstance(p, TiffSource) for p in batch["patches"])
        out = model(batch["patches"])
        loss, _ = ips.compute_loss(out.logits, batch["targets"], model.tasks)
        loss.backward()
        assert torch.isfinite(loss)
        assert out.logits["digit"].shape == (2, 3)
        seen += batch["index"].tolist()
    assert sorted(seen) == [0, 1, 2, 3]
