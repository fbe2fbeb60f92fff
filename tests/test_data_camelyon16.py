"""CAMELYON16: layout, labels, ASAP XML, bag dataset, and training on extracted bags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from camelyon16_fixture import write_synthetic_camelyon16
from ips.cli import main
from ips.config import TaskSpec
from ips.data.camelyon16 import (
    Camelyon16Bags,
    camelyon16_slides,
    lesion_patches,
    read_asap_xml,
    read_reference,
    write_asap_xml,
)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models of these tests run fastest so on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def touch(path, data: bytes = b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]])


@pytest.fixture
def layout(tmp_path):
    """Empty slide files in the CAMELYON16 layout (the layout reader never opens them)."""
    root = tmp_path / "CAMELYON16"
    for name in ("normal_001", "normal_002"):
        touch(root / "training" / "normal" / f"{name}.tif")
    for name in ("tumor_001", "tumor_002"):
        touch(root / "training" / "tumor" / f"{name}.tif")
        write_asap_xml(root / "training" / "lesion_annotations" / f"{name}.xml", [square(0, 0, 10)])
    for name in ("test_001", "test_002", "test_003"):
        touch(root / "testing" / "images" / f"{name}.tif")
    touch(root / "testing" / "reference.csv").write_text(
        "test_001,Tumor,Macro,Primary\nTest_002,Normal,,\ntest_003.tif,Tumor,Micro\n"
    )
    return root


def test_labels_come_from_the_training_folders_and_the_test_reference(layout):
    train = camelyon16_slides(layout, "train")
    assert [(s.name, s.label) for s in train] == [
        ("normal_001", 0),
        ("normal_002", 0),
        ("tumor_001", 1),
        ("tumor_002", 1),
    ]
    assert train[2].annotation.name == "tumor_001.xml" and train[0].annotation is None
    test = camelyon16_slides(layout, "test")
    assert [(s.name, s.label, s.split) for s in test] == [
        ("test_001", 1, "test"),
        ("test_002", 0, "test"),
        ("test_003", 1, "test"),
    ]


def test_a_header_row_in_the_reference_is_skipped_and_a_bad_row_is_named(tmp_path):
    csv = touch(tmp_path / "reference.csv")
    csv.write_text("image,class\ntest_001,Normal\n")
    assert read_reference(csv) == {"test_001": 0}
    csv.write_text("test_001,Normal\ntest_002,Metastatic\n")
    with pytest.raises(ValueError, match="reference.csv, line 2: expected 'name,Tumor'"):
        read_reference(csv)
    csv.write_text("test_001,Normal\ntest_001,Tumor\n")
    with pytest.raises(ValueError, match="test_001 is listed twice"):
        read_reference(csv)


@pytest.mark.parametrize(
    "damage, split, error, message",
    [
        (
            lambda r: _remove(r / "training" / "normal"),
            "train",
            FileNotFoundError,
            "normal: missing",
        ),
        (
            lambda r: _remove(r / "testing" / "reference.csv"),
            "test",
            FileNotFoundError,
            "reference.csv: missing",
        ),
        (
            lambda r: touch(r / "testing" / "images" / "test_004.tif"),
            "test",
            ValueError,
            r"1 test image\(s\) are not listed in .*reference.csv: test_004",
        ),
        (
            lambda r: (r / "testing" / "images" / "test_003.tif").unlink(),
            "test",
            ValueError,
            r"1 test image\(s\) are missing: test_003",
        ),
        (
            lambda r: write_asap_xml(
                r / "training" / "lesion_annotations" / "normal_001.xml", [square(0, 0, 5)]
            ),
            "train",
            ValueError,
            "lesion annotations for slides that are not in training/tumor: normal_001",
        ),
        (
            lambda r: touch(r / "training" / "tumor" / "normal_001.tif"),
            "train",
            ValueError,
            "two slides are called normal_001",
        ),
    ],
)
def test_missing_and_unmatched_files_are_named(layout, damage, split, error, message):
    damage(layout)
    with pytest.raises(error, match=message):
        camelyon16_slides(layout, split)


def _remove(path):
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_asap_xml_round_trips_and_marks_the_tiles_a_lesion_covers(tmp_path):
    lesion, hole = square(64, 64, 128), square(96, 96, 32)
    path = write_asap_xml(tmp_path / "a.xml", [lesion, hole], group=["Tumor", "_2"])
    (a, b) = read_asap_xml(path)
    np.testing.assert_allclose(a.points, lesion)
    assert a.group == "Tumor" and a.kind == "Polygon" and not a.is_exclusion
    assert b.group == "_2" and b.is_exclusion
    coords = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2) * 32
    inside = lesion_patches([a, b], coords, 32)
    expected = {(x, y) for x in (64, 96, 128, 160) for y in (64, 96, 128, 160)} - {(96, 96)}
    assert {tuple(c) for c in coords[inside]} == expected
    (tmp_path / "bad.xml").write_text("<Other/>")
    with pytest.raises(ValueError, match="bad.xml: expected an <ASAP_Annotations>"):
        read_asap_xml(tmp_path / "bad.xml")


def test_the_bag_dataset_names_missing_bags_and_the_one_task(layout, tmp_path):
    features = layout / "features"
    with pytest.raises(FileNotFoundError, match="no feature-bag folder"):
        Camelyon16Bags(layout, "train")
    features.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no feature bag for 4 train slide\(s\) "):
        Camelyon16Bags(layout, "train")
    with pytest.raises(ValueError, match="one binary task, 'metastases'"):
        Camelyon16Bags(layout, "train", tasks=(TaskSpec("label", "binary"),))
    np.savez(features / "tumor_001.npz", features=np.ones((3, 4)), coords=np.zeros((3, 2)))
    dataset = Camelyon16Bags(layout, "train", missing="skip")
    assert dataset.names == ["tumor_001"] and dataset.targets(0)["metastases"].item() == 1.0


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A synthetic CAMELYON16 folder (8 training, 8 test slides) and its extracted bags."""
    from ips.features import extract_features

    pytest.importorskip("h5py")
    pytest.importorskip("tifffile")
    root = write_synthetic_camelyon16(
        tmp_path_factory.mktemp("cam") / "CAMELYON16",
        normal=4,
        tumor=4,
        test_normal=4,
        test_tumor=4,
        size=512,
        lesions=3,
        seed=1,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = extract_features(
            root, root / "features", encoder="resnet18_2blocks", patch_size=16, batch_size=256
        )
    finally:
        torch.set_num_threads(threads)
    assert len(summary["extracted"]) == 16 and not summary["failed"]
    return root


def test_lesion_tiles_of_tumour_slides_are_known_to_the_dataset(extracted):
    dataset = Camelyon16Bags(extracted, "train")
    assert dataset.feature_dim == 128 and len(dataset) == 8
    shares = [dataset.foreground_patches(i).mean() for i in range(len(dataset))]
    for slide, share in zip(dataset.slides, shares, strict=True):
        assert (share > 0) == (slide.label == 1), slide.name


def test_training_on_bags_reaches_a_high_auc_on_held_out_slides(extracted, tmp_path, capsys):
    run = tmp_path / "run"
    settings = {
        "model.feature_dim": 128,
        "model.embed_dim": 32,
        "model.num_heads": 2,
        "model.head_dim": 16,
        "model.mlp_dim": 64,
        "model.dropout": 0.0,
        "selection.memory_size": 16,
        "selection.chunk_size": 32,
        "data.path": str(extracted),
        "data.options": "{features: " + str(extracted / "features") + "}",
        "data.val_fraction": 0.0,
        "train.epochs": 12,
        "train.batch_size": 4,
        "train.lr": 1.0e-3,
        "train.warmup_epochs": 1,
    }
    args = ["train", "--config", "camelyon16", "--out", str(run), "--device", "cpu"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args + ["--no-progress", "-q"]) == 0
    capsys.readouterr()
    checkpoint = str(run / "last.pt")
    assert (
        main(["eval", "--checkpoint", checkpoint, "--split", "test", "--json", "--device", "cpu"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test"]["metastases"]["auc"] >= 0.9, result
    assert result["test"]["foreground_share"] > 0  # selected patches lie in lesions
