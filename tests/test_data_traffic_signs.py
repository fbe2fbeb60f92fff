"""Swedish traffic signs: every filtering rule, patches, augmentation, checked downloads."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import ips.data.traffic_signs as traffic
from ips.config import config_from_dict
from ips.data.registry import build_dataset
from ips.data.traffic_signs import (
    CLASSES,
    TrafficSigns,
    download_traffic_signs,
    label_of,
    parse_annotations,
)

SMALL, BIG = "10, 10, 0, 0", "300, 300, 0, 0"  # boxes of area 100 and 90000
SET1 = {  # image -> (annotation, expected class name or None when left out)
    "empty.jpg": ("", "EMPTY"),
    "misc_only.jpg": ("MISC_SIGNS;", "EMPTY"),
    "fifty.jpg": (f"VISIBLE, {SMALL}, SPEED_LIMIT, 50_SIGN;", "50_SIGN"),
    "no_speed_limit.jpg": (f"VISIBLE, {BIG}, PRIORITY_ROAD, PRIORITY_ROAD;", None),
    "blurred_only.jpg": (f"BLURRED, {BIG}, SPEED_LIMIT, 70_SIGN;", None),
    "visibility_beats_area.jpg": (
        f"OCCLUDED, {BIG}, SPEED_LIMIT, 80_SIGN;VISIBLE, {SMALL}, SPEED_LIMIT, 70_SIGN;",
        "70_SIGN",
    ),
    "larger_wins.jpg": (
        f"VISIBLE, {SMALL}, SPEED_LIMIT, 50_SIGN;VISIBLE, {BIG}, SPEED_LIMIT, 80_SIGN;",
        "80_SIGN",
    ),
    "other_signs_ignored.jpg": (
        f"VISIBLE, {BIG}, PRIORITY_ROAD, PRIORITY_ROAD;"
        f"VISIBLE, 12.5l, 12, 2, 2, SPEED_LIMIT, 70_SIGN;MISC_SIGNS;",
        "70_SIGN",
    ),
    "blurred_beats_side_road.jpg": (
        f"SIDE_ROAD, {BIG}, SPEED_LIMIT, 50_SIGN;BLURRED, {SMALL}, SPEED_LIMIT, 70_SIGN;",
        None,
    ),
}
SET2 = {"t1.jpg": ("", "EMPTY"), "t2.jpg": (f"VISIBLE, {BIG}, SPEED_LIMIT, 80_SIGN;", "80_SIGN")}


def write_set(root, number: int, images: dict, *, subfolder: bool = False) -> None:
    folder = root / f"Set{number}"
    pictures = folder / f"Set{number}Part0" if subfolder else folder
    pictures.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (name, (signs, _)) in enumerate(images.items()):
        colour = (40 * k % 256, 80, 160)
        Image.new("RGB", (64, 48), colour).save(pictures / name)
        lines.append(f"{name}:{signs}\n")
    (folder / "annotations.txt").write_text("".join(lines))


@pytest.fixture
def signs(tmp_path):
    root = tmp_path / "traffic_signs"
    write_set(root, 1, SET1)
    write_set(root, 2, SET2, subfolder=True)
    return root


def test_every_filtering_rule_of_the_speed_limit_subset(signs):
    parsed = dict(parse_annotations(signs / "Set1" / "annotations.txt"))
    assert parsed["misc_only.jpg"] == [] and len(parsed["other_signs_ignored.jpg"]) == 2
    assert parsed["other_signs_ignored.jpg"][1].box == (12.5, 12.0, 2.0, 2.0)  # "12.5l" read
    for name, (_, expected) in SET1.items():
        label = label_of(parsed[name])
        assert (None if label is None else CLASSES[label]) == expected, name
    dataset = TrafficSigns(signs, "train", patch_size=10, image_size=(40, 60))
    kept = {path.name: CLASSES[label] for path, label in dataset.items}
    assert kept == {name: cls for name, (_, cls) in SET1.items() if cls is not None}
    test = TrafficSigns(signs, "test", patch_size=10, image_size=(40, 60))
    assert [(p.name, CLASSES[y]) for p, y in test.items] == [
        ("t1.jpg", "EMPTY"),
        ("t2.jpg", "80_SIGN"),
    ]
    swapped = TrafficSigns(signs, "train", patch_size=10, image_size=(40, 60), train_set=2)
    assert len(swapped) == 2


def test_images_are_resized_and_cut_into_raster_patches(signs):
    dataset = TrafficSigns(signs, "test", patch_size=10, image_size=(40, 60))
    item = dataset[1]
    assert dataset.grid_shape == (4, 6)
    assert item["patches"].shape == (24, 3, 10, 10) and item["patches"].dtype == torch.uint8
    assert item["targets"]["sign"].dtype == torch.long and item["targets"]["sign"].item() == 3
    image = dataset.image(1)  # (3, 40, 60)
    np.testing.assert_array_equal(item["patches"][7], image[:, 10:20, 10:20])  # row 1, col 1


def test_training_images_are_augmented_and_test_images_are_not(signs):
    train = TrafficSigns(signs, "train", patch_size=10, image_size=(40, 60))
    test = TrafficSigns(signs, "test", patch_size=10, image_size=(40, 60))
    torch.manual_seed(0)
    a, b = train.image(2), train.image(2)
    assert not torch.equal(a, b)  # jitter and translation are drawn anew
    assert torch.equal(test.image(0), test.image(0))


def test_the_registry_builds_it_from_a_config_and_reports_missing_files(signs, tmp_path):
    config = config_from_dict(
        {
            "model": {
                "in_channels": 3,
                "patch_size": 10,
                "tasks": {"sign": {"kind": "multiclass", "num_classes": 4}},
            },
            "data": {
                "dataset": "traffic_signs",
                "path": str(signs),
                "val_fraction": 0.25,
                "options": {"image_size": [40, 60]},
            },
        }
    )
    train, val = build_dataset(config, "train"), build_dataset(config, "val")
    assert len(train) + len(val) == 6 and len(val) == 2
    assert len(build_dataset(config, "test")) == 2
    (signs / "Set1" / "fifty.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 annotated image\(s\) are missing \(fifty.jpg"):
        TrafficSigns(signs, "train")
    with pytest.raises(FileNotFoundError, match="Set1/annotations.txt: missing"):
        TrafficSigns(tmp_path / "nothing", "train")
    (signs / "Set2" / "annotations.txt").write_text("t1.jpg:FOGGY, 1, 2, 3, 4, X, 50_SIGN;\n")
    with pytest.raises(ValueError, match="line 1: visibility must be one of"):
        TrafficSigns(signs, "test")


def fake_server(files: dict[str, bytes]):
    """A stand-in for ips.files.download that serves `files` by URL suffix, checking digests."""
    calls = []

    def fetch(url, path, sha256, **_):
        name = url.split("swedishSignsSummer/")[1]
        data = files[name]
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{url}: checksum mismatch")
        calls.append(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return fetch, calls


def served_sets() -> dict[str, bytes]:
    files = {}
    for number, images in ((1, {"a.jpg": None}), (2, {"b.jpg": None})):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for name in images:
                picture = io.BytesIO()
                Image.new("RGB", (32, 24), (200, 0, 0)).save(picture, format="JPEG")
                zf.writestr(name, picture.getvalue())
        files[f"Set{number}/Set{number}Part0.zip"] = buffer.getvalue()
        files[f"Set{number}/annotations.txt"] = f"{next(iter(images))}:\n".encode()
    return files


def test_download_keeps_only_files_with_the_expected_sha256_and_unpacks_them(tmp_path, monkeypatch):
    files = served_sets()
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    fetch, calls = fake_server(files)
    monkeypatch.setattr(traffic, "download", fetch)
    root = tmp_path / "ts"
    download_traffic_signs(root, sha256=digests)
    assert sorted(calls) == sorted(files)
    assert (root / "Set1" / "a.jpg").is_file() and (root / "Set2" / "b.jpg").is_file()
    dataset = TrafficSigns(root, "train", patch_size=8, image_size=(16, 16))
    assert [label for _, label in dataset.items] == [0]
    calls.clear()
    listing = tmp_path / "SHA256SUMS"
    listing.write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))
    download_traffic_signs(root, sha256=listing)  # everything there and intact: no fetch
    assert calls == []
    bad = {**digests, "Set2/annotations.txt": "0" * 64}
    (root / "Set2" / "annotations.txt").unlink()
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_traffic_signs(root, sha256=bad)


def test_download_refuses_to_run_without_known_digests(tmp_path, monkeypatch):
    fetch, calls = fake_server(served_sets())
    monkeypatch.setattr(traffic, "download", fetch)
    monkeypatch.setattr(traffic, "TRAFFIC_SIGNS_SHA256", {})
    with pytest.raises(ValueError, match="no SHA-256 known for Set1/annotations.txt"):
        download_traffic_signs(tmp_path)
    assert calls == []
    assert all(url.startswith("https://") for url in [traffic.URL])


def test_an_archive_member_outside_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.jpg", b"x")
    with pytest.raises(ValueError, match="would land outside"):
        traffic._unpack(archive, tmp_path / "set")
    assert not (tmp_path / "outside.jpg").exists()


def test_the_download_command_checks_digests_and_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from ips.cli import main

    files = served_sets()
    fetch, calls = fake_server(files)
    monkeypatch.setattr(traffic, "download", fetch)
    monkeypatch.setattr(traffic, "TRAFFIC_SIGNS_SHA256", {})
    assert main(["download-traffic-signs", "--out", str(tmp_path / "ts")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ips: error: no SHA-256 known") and len(err.splitlines()) == 1
    listing = tmp_path / "SHA256SUMS"
    listing.write_text("".join(f"{hashlib.sha256(d).hexdigest()} *{n}\n" for n, d in files.items()))
    assert (
        main(["download-traffic-signs", "--out", str(tmp_path / "ts"), "--sha256", str(listing)])
        == 0
    )
    assert sorted(calls) == sorted(files) and (tmp_path / "ts" / "Set2" / "b.jpg").is_file()
