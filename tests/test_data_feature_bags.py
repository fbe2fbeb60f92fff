"""Feature bags: lazy HDF5 rows, per-process handles, NaN checks, masks, labelled datasets."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import ips
from ips.config import TaskSpec, config_from_dict
from ips.data.collate import collate_patches
from ips.data.feature_bags import (
    FeatureBag,
    FeatureBagDataset,
    FeatureFile,
    H5FeatureBag,
    NpyFeatureBag,
    open_feature_bag,
)
from ips.data.registry import build_dataset
from ips.errors import InputError

h5py = pytest.importorskip("h5py")

F = 6
BINARY = (TaskSpec("metastases", "binary"),)


def write_bag(path, num_patches: int, seed: int = 0, *, shift: float = 0.0) -> np.ndarray:
    """An .h5 bag of N rows on a grid of 16-pixel tiles; returns the features."""
    rng = np.random.default_rng(seed)
    features = (rng.normal(size=(num_patches, F)) + shift).astype(np.float32)
    cols = 5
    coords = np.stack([np.arange(num_patches) % cols, np.arange(num_patches) // cols], 1) * 16
    with h5py.File(path, "w") as f:
        f["features"] = features
        f["coords"] = coords
        f.attrs["patch_size"] = 16
    return features


def bag_model(**overrides) -> ips.IPSModel:
    settings = dict(
        encoder="features",
        feature_dim=F,
        embed_dim=16,
        num_heads=1,
        head_dim=8,
        mlp_dim=16,
        dropout=0.0,
        memory_size=4,
        chunk_size=5,
        tasks={"metastases": {"kind": "binary"}},
    )
    return ips.create_model(**{**settings, **overrides}).eval()


def test_an_h5_bag_reads_the_asked_rows_in_order_and_pickles_without_its_handle(tmp_path):
    features = write_bag(tmp_path / "a.h5", 23)
    bag = open_feature_bag(tmp_path / "a.h5")
    assert isinstance(bag, H5FeatureBag) and bag._handle is None  # nothing opened yet
    ids = np.array([7, 3, 7, 22, 0])
    np.testing.assert_array_equal(bag.read(ids), features[ids])
    assert len(bag) == 23 and bag.feature_dim == F
    copy = pickle.loads(pickle.dumps(bag))
    assert copy._handle is None
    np.testing.assert_array_equal(copy.read(ids[:2]), features[ids[:2]])
    assert bag.patch_size_level0 == 16 and bag.level0_size == (80, 80)
    np.testing.assert_array_equal(bag.positions([6]), [[1, 1]])
    with pytest.raises(IndexError, match="23"):
        bag.read([23])
    bag.close()
    copy.close()


@pytest.mark.parametrize(
    ("layout", "mapped"),
    [
        ({}, True),  # one contiguous block: read through a memory map
        ({"dtype": "float16"}, True),
        ({"chunks": (4, F)}, False),  # chunked, compressed: h5py's own reads
        ({"chunks": (4, F), "compression": "gzip"}, False),
        ({"chunks": (1, F), "maxshape": (None, F)}, False),  # CLAM's resizable layout
    ],
)
def test_every_hdf5_layout_reads_the_same_rows(tmp_path, layout, mapped):
    features = np.random.default_rng(0).normal(size=(37, F)).astype(layout.get("dtype", "f4"))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("features", data=features, **layout)
        f["coords"] = np.zeros((37, 2), dtype=np.int64)
    bag = open_feature_bag(tmp_path / "a.h5")
    assert (bag._offset is not None) == mapped
    ids = np.array([36, 0, 5, 5, 17, 18, 19, 2])
    rows = bag.read(ids)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, features[ids].astype(np.float32))
    for run in (np.arange(3, 30), np.arange(37), np.arange(36, 37)):  # consecutive rows
        np.testing.assert_array_equal(bag.read(run), features[run].astype(np.float32))
    assert bag._handle is None or not mapped  # the map needs no HDF5 handle
    bag.close()


def test_consecutive_rows_of_a_contiguous_bag_are_read_without_a_memory_map(tmp_path, monkeypatch):
    features = write_bag(tmp_path / "a.h5", 40)
    bag = open_feature_bag(tmp_path / "a.h5")

    def no_map(*args, **kwargs):
        raise AssertionError("mapped")

    monkeypatch.setattr(np, "memmap", no_map)
    np.testing.assert_array_equal(bag.read(np.arange(8, 33)), features[8:33])
    with pytest.raises(AssertionError, match="mapped"):  # scattered rows go through the map
        bag.read(np.array([3, 1]))


def test_a_mapped_bag_whose_file_shrank_is_a_read_error_naming_it(tmp_path):
    write_bag(tmp_path / "a.h5", 40)
    bag = open_feature_bag(tmp_path / "a.h5")
    assert bag._offset is not None
    with open(tmp_path / "a.h5", "r+b") as f:  # only the first 10 rows are left
        f.truncate(bag._offset + 10 * F * 4)
    with pytest.raises(OSError, match=r"a\.h5: cannot read rows of 'features'"):
        bag.read([39])
    with pytest.raises(OSError, match=r"a\.h5: cannot read rows of 'features' \(the file ends"):
        bag.read(np.arange(5, 40))  # consecutive rows: one positioned read


def test_bags_made_in_dataloader_workers_are_read_in_the_main_process(tmp_path):
    paths = [tmp_path / f"s{i}.h5" for i in range(3)]
    rows = [write_bag(p, n, seed=i) for i, (p, n) in enumerate(zip(paths, (9, 4, 13), strict=True))]
    dataset = FeatureBagDataset(paths, [{"metastases": i % 2} for i in range(3)], BINARY)
    assert dataset.num_patches == [9, 4, 13] and dataset.feature_dim == F
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_patches)
    (batch,) = list(loader)
    assert batch["mask"] is None and [len(b) for b in batch["patches"]] == [9, 4, 13]
    for bag, expected in zip(batch["patches"], rows, strict=True):
        np.testing.assert_array_equal(bag.read(np.arange(len(bag))), expected)
    assert batch["targets"]["metastases"].dtype == torch.float32
    assert batch["targets"]["metastases"].tolist() == [0.0, 1.0, 0.0]


def test_non_finite_features_are_an_error_naming_the_file(tmp_path):
    write_bag(tmp_path / "bad.h5", 10)
    with h5py.File(tmp_path / "bad.h5", "r+") as f:
        f["features"][4, 2] = np.nan
        f["features"][8, 0] = np.inf
    bag = open_feature_bag(tmp_path / "bad.h5")
    np.testing.assert_array_equal(bag.read([0, 1]).shape, (2, F))  # clean rows read fine
    with pytest.raises(ValueError, match=r"bad.h5: features hold NaN or inf \(patch 4"):
        bag.read(np.arange(10))
    dataset = FeatureBagDataset([tmp_path / "bad.h5"], [{"metastases": 1}], BINARY)
    model = bag_model()
    with pytest.raises(ValueError, match="bad.h5"):
        model([dataset[0]["patches"]])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_bags_on_disk_ask_the_system_to_read_the_next_rows_ahead(tmp_path, monkeypatch):
    advice: list = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, n, how: advice.append((start, n)))
    write_bag(tmp_path / "a.h5", 40)
    np.save(tmp_path / "b.npy", np.zeros((40, F), dtype=np.float32))
    h5, npy = open_feature_bag(tmp_path / "a.h5"), open_feature_bag(tmp_path / "b.npy")
    for bag, offset in ((h5, h5._offset), (npy, npy._map.offset)):
        advice.clear()
        bag.will_read(np.arange(8, 20))
        assert advice == [(offset + 8 * F * 4, 12 * F * 4)]  # the rows' bytes in the file
        bag.will_read(np.array([3, 1]))  # scattered rows: no hint
        assert len(advice) == 1
    FeatureBag(np.zeros((5, F), dtype=np.float32)).will_read(np.arange(5))  # in memory
    assert len(advice) == 1


def test_huge_finite_features_read_and_opposite_infinities_do_not(tmp_path):
    big = np.full((6, F), 3e38, dtype=np.float32)  # finite, but their float32 sum overflows
    np.testing.assert_array_equal(FeatureBag(big).read(np.arange(6)), big)
    big[3, 1], big[5, 0] = np.inf, -np.inf  # +inf and -inf would sum to NaN
    with pytest.raises(InputError, match=r"bag: features hold NaN or inf \(patch 3, and 1 more"):
        FeatureBag(big).read(np.arange(6))


def test_broken_bags_are_named_at_construction(tmp_path):
    write_bag(tmp_path / "ok.h5", 5)
    with h5py.File(tmp_path / "nocoords.h5", "w") as f:
        f["features"] = np.zeros((3, F), np.float32)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="nocoords.h5: a feature bag needs .* missing coords"):
        open_feature_bag(tmp_path / "nocoords.h5")
    with pytest.raises(ValueError, match="junk.h5: cannot read as HDF5"):
        open_feature_bag(tmp_path / "junk.h5")
    with pytest.raises(ValueError, match="ok.h5: features have width F=6, expected F=8"):
        FeatureBagDataset([tmp_path / "ok.h5"], [{"metastases": 0}], BINARY, feature_dim=8)
    with pytest.raises(ValueError, match="label 2 of task 'metastases'"):
        FeatureBagDataset([tmp_path / "ok.h5"], [{"metastases": 2}], BINARY)


def test_bags_with_fewer_patches_than_m_are_masked_the_same_lazily_and_padded(tmp_path):
    paths = [tmp_path / "small.h5", tmp_path / "tiny.h5"]
    for i, (path, n) in enumerate(zip(paths, (3, 2), strict=True)):
        write_bag(path, n, seed=i)
    labels = [{"metastases": 0}, {"metastases": 1}]
    lazy = FeatureBagDataset(paths, labels, BINARY)
    padded = FeatureBagDataset(paths, labels, BINARY, in_memory=True)
    model = bag_model(memory_size=8, loading="eager_sequential")
    batch = collate_patches([padded[0], padded[1]])
    assert batch["patches"].shape == (2, 3, F)
    assert batch["mask"].tolist() == [[True, True, True], [True, True, False]]
    with torch.no_grad():
        out_padded = model(batch["patches"], batch["mask"])
        out_lazy = model([lazy[0]["patches"], lazy[1]["patches"]])
    assert out_lazy.mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(out_lazy.logits["metastases"], out_padded.logits["metastases"])
    # a phantom patch would change the logit of the 2-patch slide: compare with it alone
    with torch.no_grad():
        alone = model([lazy[1]["patches"]]).logits["metastases"]
    torch.testing.assert_close(out_lazy.logits["metastases"][1:], alone)


@pytest.mark.parametrize("pos_enc", ["none", "2d"])
def test_eager_sequential_selects_each_bag_as_lazy_loading_does(tmp_path, pos_enc):
    bags = []
    for i, n in enumerate((20, 33)):
        write_bag(tmp_path / f"{i}.h5", n, seed=i)
        bags.append(open_feature_bag(tmp_path / f"{i}.h5"))
    lazy = bag_model(shuffle=False, loading="lazy", pos_enc=pos_enc)
    sequential = bag_model(shuffle=False, loading="eager_sequential", pos_enc=pos_enc)
    sequential.load_state_dict(lazy.state_dict())
    with torch.no_grad():
        a, b = lazy(bags), sequential(bags)
    assert torch.equal(a.selected, b.selected) and bool(a.mask.all())
    torch.testing.assert_close(a.logits["metastases"], b.logits["metastases"])
    assert (a.selected[0] < 20).all()


def test_a_model_trained_on_bags_predicts_them(tmp_path):
    write_bag(tmp_path / "slide.h5", 12)
    (prediction,) = ips.predict(bag_model(), [tmp_path / "slide.h5"])
    assert prediction.ok and prediction.selected_coords.shape == (4, 2)
    assert prediction.patch_size == 16


def labelled_folder(tmp_path, rows: str):
    folder = tmp_path / "bags"
    folder.mkdir()
    for i in range(6):
        write_bag(folder / f"slide_{i}.h5", 5 + i, seed=i)
    (folder / "labels.csv").write_text(rows)
    return folder


def bag_config(folder, **options):
    return config_from_dict(
        {
            "model": {
                "encoder": "features",
                "feature_dim": F,
                "tasks": {"metastases": {"kind": "binary"}, "grade": {"num_classes": 3}},
            },
            "data": {"dataset": "feature_bags", "path": str(folder), "options": options},
            "train": {"seed": 0},
        }
    )


def test_the_feature_bags_dataset_reads_labels_and_splits_from_a_csv(tmp_path):
    rows = "slide,metastases,grade,split\n" + "".join(
        f"slide_{i},{i % 2},{i % 3},{'test' if i >= 4 else 'train'}\n" for i in range(6)
    )
    folder = labelled_folder(tmp_path, rows)
    config = bag_config(folder)
    train, val = build_dataset(config, "train"), build_dataset(config, "val")
    test = build_dataset(config, "test")
    assert len(train) + len(val) == 4 and len(val) == 1
    assert sorted(train.names + val.names) == [f"slide_{i}" for i in range(4)]
    assert test.names == ["slide_4", "slide_5"] and test.num_patches == [9, 10]
    item = test[1]
    assert item["targets"]["metastases"].item() == 1.0
    assert item["targets"]["grade"].dtype == torch.long and item["targets"]["grade"].item() == 2


def test_the_feature_bags_dataset_names_missing_bags_and_bad_labels(tmp_path):
    folder = labelled_folder(tmp_path, "slide,metastases,grade\nslide_0,1,0\nslide_9,0,1\n")
    with pytest.raises(FileNotFoundError, match=r"no feature bag for 1 slide\(s\).*slide_9"):
        build_dataset(bag_config(folder), "train")
    skipping = build_dataset(bag_config(folder, missing="skip"), "train")
    assert len(skipping) == 1
    (folder / "labels.csv").write_text("slide,metastases,grade\nslide_0,yes,0\n")
    with pytest.raises(ValueError, match="slide_0: label of task 'metastases' must be an integer"):
        build_dataset(bag_config(folder), "train")
    with pytest.raises(ValueError, match="unknown key.*colour"):
        build_dataset(bag_config(folder, colour=1), "train")


def test_in_memory_bags_are_plain_feature_bags(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    bag = FeatureBag(features, np.array([[0, 0], [10, 0], [0, 10], [10, 10]]), name="mem")
    np.testing.assert_array_equal(bag.read([3, 0]), features[[3, 0]])
    assert bag.patch_size_level0 == 10 and bag.level0_size == (20, 20)


def test_a_npy_bag_is_memory_mapped_and_reads_the_rows_of_the_file(tmp_path):
    features = np.random.default_rng(0).normal(size=(11, F)).astype(np.float32)
    np.save(tmp_path / "plain.npy", features)
    bag = open_feature_bag(tmp_path / "plain.npy")
    assert isinstance(bag, NpyFeatureBag) and isinstance(bag._map, np.memmap)
    assert (len(bag), bag.feature_dim, bag.coords) == (11, F, None)
    ids = np.array([7, 3, 7, 10, 0])
    np.testing.assert_array_equal(bag.read(ids), features[ids])
    copy = pickle.loads(pickle.dumps(bag))  # the map stays behind; the copy maps the file
    assert copy._map is None
    np.testing.assert_array_equal(copy.read(ids), features[ids])
    assert isinstance(copy._map, np.memmap)
    bag.close()  # a read after closing maps the file again
    np.testing.assert_array_equal(bag.read([1]), features[[1]])
    in_memory = FeatureBagDataset(
        [tmp_path / "plain.npy"], [{"metastases": 1}], BINARY, in_memory=True
    )
    np.testing.assert_array_equal(in_memory[0]["patches"].numpy(), features)


def test_npy_bags_of_objects_and_of_nan_are_refused_as_before(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="objects.npy: cannot read.*pickle"):
        open_feature_bag(tmp_path / "objects.npy")
    np.save(tmp_path / "text.npy", np.full((3, F), "x"))
    with pytest.raises(InputError, match="text.npy: features must be real numbers"):
        open_feature_bag(tmp_path / "text.npy")
    rows = np.ones((4, F), dtype=np.float32)
    rows[2, 0] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    bag = open_feature_bag(tmp_path / "nan.npy")  # values are checked as rows are read
    np.testing.assert_array_equal(bag.read([0, 1]), rows[:2])
    with pytest.raises(InputError, match=r"nan.npy: features hold NaN or inf \(patch 2\)"):
        bag.read([1, 2])


def test_the_benchmark_reads_rows_with_the_same_feature_file_class():
    import ips.bench

    assert ips.bench.FeatureFile is FeatureFile


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("writeable", [True, False])
def test_the_finiteness_pass_sees_any_non_finite_value_in_either_kind_of_array(bad, writeable):
    from ips.data.feature_bags import _sum_is_finite

    rows = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
    rows.flags.writeable = writeable  # torch sums writeable arrays, numpy the others
    assert _sum_is_finite(rows)
    spoilt = rows.copy()
    spoilt[217, 5] = bad
    spoilt.flags.writeable = writeable
    assert not _sum_is_finite(spoilt)
    huge = np.full((8, 8), 3e38, dtype=np.float32)  # finite values, an overflowing sum:
    assert not _sum_is_finite(huge)  # `read` then checks each row in float64
    assert FeatureBag(huge).read(np.arange(8)).shape == (8, 8)
