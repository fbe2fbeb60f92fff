"""Feature extraction: bags, coordinates, resume, failures, ranks, workers, the command."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from camelyon16_fixture import write_synthetic_camelyon16
from ips.cli import main
from ips.config import GridConfig
from ips.data.feature_bags import open_feature_bag
from ips.encoders import TIMM_HINT
from ips.features import (
    build_extractor,
    extract_features,
    find_slides,
    summary_path,
)
from ips.files import sha256_of
from ips.sources import open_source, write_synthetic_slide

h5py = pytest.importorskip("h5py")
pytest.importorskip("tifffile")

TILE = 32
FAST = dict(encoder="resnet18_2blocks", patch_size=TILE, batch_size=64, amp="none")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models of these tests run fastest so on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def camelyon(tmp_path):
    """A tiny CAMELYON16 folder: normal_001, tumor_001 (with XML), test_001 (tumour)."""
    return write_synthetic_camelyon16(
        tmp_path / "CAMELYON16", normal=1, tumor=1, test_normal=0, test_tumor=1, size=512
    )


def test_bags_hold_one_feature_row_per_tissue_tile_at_level0_coords(camelyon, tmp_path):
    out = tmp_path / "features"
    summary = extract_features(camelyon, out, **FAST)
    # sorted by path: testing/ before training/
    assert [e["slide"] for e in summary["extracted"]] == ["test_001", "normal_001", "tumor_001"]
    assert summary["failed"] == [] and summary["skipped"] == []
    extractor = build_extractor("resnet18_2blocks", patch_size=TILE)
    for slide in sorted(camelyon.rglob("*.tif")):
        source = open_source(slide, patch_size=TILE, tissue="otsu")
        with h5py.File(out / f"{slide.stem}.h5", "r") as f:
            features, coords = f["features"][()], f["coords"][()]
            attrs = dict(f.attrs)
        assert features.dtype == np.float32 and features.shape == (len(source), 128)
        assert coords.dtype == np.int64
        np.testing.assert_array_equal(coords, source.coords)  # the source's tissue grid
        assert 0 < len(source) < source.grid_shape[0] * source.grid_shape[1]
        rows = [0, len(source) // 2, len(source) - 1]
        with torch.inference_mode():
            expected = extractor(torch.from_numpy(source.read(rows))).numpy()
        np.testing.assert_allclose(features[rows], expected, rtol=1e-4, atol=1e-5)
        assert attrs["patch_size"] == TILE and attrs["level"] == 0 and attrs["downsample"] == 1
        assert attrs["encoder"] == "resnet18_2blocks" and attrs["feature_dim"] == 128
        assert attrs["mpp"] == pytest.approx(0.5) and attrs["ips_version"]
        assert attrs["slide"] == slide.name and attrs["weights"] == "none"
    bag = open_feature_bag(out / "tumor_001.h5")
    assert bag.patch_size_level0 == TILE and len(bag) == len(bag.coords)
    written = json.loads(summary_path(out).read_text())
    assert [e["patches"] for e in written["extracted"]] == [
        e["patches"] for e in summary["extracted"]
    ]


def test_a_coarser_level_keeps_level0_coordinates(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tile_size=256)
    out = tmp_path / "bags"
    extract_features(slide.path, out, grid=GridConfig(level=1, tissue="otsu"), **FAST)
    source = open_source(slide.path, patch_size=TILE, level=1, tissue="otsu")
    with h5py.File(out / "s.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][()], source.coords)
        assert f.attrs["downsample"] == 2 and f.attrs["level"] == 1
        assert f.attrs["tile_mpp"] == pytest.approx(1.0)
    assert (source.coords % (2 * TILE) == 0).all()
    assert open_feature_bag(out / "s.h5").patch_size_level0 == 2 * TILE


def test_a_rerun_skips_finished_slides_and_redoes_only_missing_ones(camelyon, tmp_path):
    out = tmp_path / "features"
    extract_features(camelyon, out, **FAST)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    (out / "normal_001.h5").unlink()
    again = extract_features(camelyon, out, **FAST)
    assert [e["slide"] for e in again["extracted"]] == ["normal_001"]
    assert sorted(e["slide"] for e in again["skipped"]) == ["test_001", "tumor_001"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert after["tumor_001.h5"] == before["tumor_001.h5"]
    assert after["test_001.h5"] == before["test_001.h5"]
    assert sorted(after) == sorted(before)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError, match="other settings"):
        extract_features(camelyon, out, **{**FAST, "patch_size": 64})


def test_a_corrupt_slide_is_reported_and_the_others_are_extracted(camelyon, tmp_path):
    bad = camelyon / "training" / "normal" / "normal_002.tif"
    bad.write_bytes(b"II*\x00" + os.urandom(2000))
    out = tmp_path / "features"
    summary = extract_features(camelyon, out, **FAST)
    assert [f["slide"] for f in summary["failed"]] == ["normal_002"]
    assert "normal_002.tif" in summary["failed"][0]["error"]
    assert len(summary["extracted"]) == 3 and not (out / "normal_002.h5").exists()
    written = json.loads((out / "extraction_summary.json").read_text())
    assert written["failed"] == summary["failed"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_slide_without_tissue_and_an_encoder_giving_nan_are_failures(tmp_path, monkeypatch):
    (tmp_path / "slides").mkdir()
    write_synthetic_slide(tmp_path / "slides" / "glass.tif", width=256, height=256, tissue_blobs=0)
    write_synthetic_slide(tmp_path / "slides" / "tissue.tif", width=512, height=512)
    summary = extract_features(tmp_path / "slides", tmp_path / "out", **FAST)
    assert [f["slide"] for f in summary["failed"]] == ["glass"]
    assert "tissue" in summary["failed"][0]["error"]

    import ips.features

    real = ips.features.build_extractor

    def poisoned(*args, **kwargs):
        extractor = real(*args, **kwargs)
        extractor.encoder.register_forward_hook(lambda m, i, out: out * float("nan"))
        return extractor

    monkeypatch.setattr(ips.features, "build_extractor", poisoned)
    summary = extract_features(tmp_path / "slides" / "tissue.tif", tmp_path / "nan", **FAST)
    assert "NaN or inf" in summary["failed"][0]["error"]
    assert not (tmp_path / "nan" / "tissue.h5").exists()


def test_under_torchrun_each_rank_takes_every_kth_slide_and_writes_its_own_summary(
    camelyon, tmp_path, monkeypatch
):
    out = tmp_path / "features"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = extract_features(camelyon, out, **FAST)
    assert [e["slide"] for e in summary["extracted"]] == ["normal_001"]  # slide 1 of 3
    assert summary["rank"] == 1 and summary["world_size"] == 2
    assert (out / "extraction_summary.rank1.json").is_file()
    assert not (out / "extraction_summary.json").exists()
    monkeypatch.setenv("RANK", "0")
    first = extract_features(camelyon, out, **FAST)
    assert [e["slide"] for e in first["extracted"]] == ["test_001", "tumor_001"]  # 0 and 2
    assert sorted(p.stem for p in out.glob("*.h5")) == ["normal_001", "test_001", "tumor_001"]


def test_dataloader_workers_give_the_same_features(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tif", width=512, height=512, seed=3).path
    extract_features(slide, tmp_path / "w0", **FAST)
    extract_features(slide, tmp_path / "w2", num_workers=2, **{**FAST, "batch_size": 16})
    with h5py.File(tmp_path / "w0" / "s.h5") as a, h5py.File(tmp_path / "w2" / "s.h5") as b:
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
        np.testing.assert_allclose(a["features"][()], b["features"][()], rtol=1e-4, atol=1e-5)


def test_weights_come_from_a_local_state_dict(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    extractor = build_extractor("resnet18_4blocks", str(tmp_path / "r18.pth"), patch_size=TILE)
    assert extractor.feature_dim == 512
    assert torch.equal(extractor.encoder.stem[0].weight, reference.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        build_extractor("resnet18_2blocks", str(tmp_path / "nothing.pth"))


def test_pixel_encoders_only_and_timm_needs_its_extra(monkeypatch):
    with pytest.raises(ValueError, match="'features' is not a pixel encoder"):
        build_extractor("features")
    with pytest.raises(ValueError, match="'resnet19' is not a pixel encoder"):
        build_extractor("resnet19")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ImportError, match=r"\[timm\]"):
        build_extractor("timm:resnet18")
    assert "iterative-patch-selection[timm]" in TIMM_HINT


def test_timm_models_extract_their_pooled_features():
    pytest.importorskip("timm")
    extractor = build_extractor("timm:resnet18", patch_size=TILE)
    assert extractor.feature_dim == 512


def test_slides_come_from_folders_lists_and_files_with_unique_names(camelyon, tmp_path):
    listed = tmp_path / "slides.txt"
    listed.write_text("# two slides\nCAMELYON16/training/tumor/tumor_001.tif\n\n")
    assert [p.name for p in find_slides(listed)] == ["tumor_001.tif"]
    assert [p.stem for p in find_slides(camelyon)] == ["test_001", "normal_001", "tumor_001"]
    twin = tmp_path / "other" / "tumor_001.tif"
    twin.parent.mkdir()
    twin.write_bytes(b"")
    with pytest.raises(ValueError, match="two slides are called tumor_001"):
        find_slides([camelyon, twin])
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        find_slides(tmp_path / "nowhere.tif")


def test_cli_extracts_resumes_and_reports_failures(camelyon, tmp_path, capsys):
    out = tmp_path / "features"
    args = ["extract-features", str(camelyon), "--out", str(out), "--encoder", "resnet18_2blocks"]
    args += ["--patch-size", str(TILE), "--device", "cpu", "--no-progress", "-q"]
    assert main(args) == 0
    assert sorted(p.stem for p in out.glob("*.h5")) == ["normal_001", "test_001", "tumor_001"]
    (camelyon / "testing" / "images" / "test_002.tif").write_bytes(b"not a slide")
    assert main(args) == 1  # the new slide fails; the others were done already
    err = capsys.readouterr().err
    assert "ips: 1 slide(s) failed and were skipped" in err
    assert len([line for line in err.splitlines() if "test_002" in line]) == 1
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert len(summary["skipped"]) == 3 and summary["failed"][0]["slide"] == "test_002"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--patch-size", "0"], "--patch-size must be >= 1"),
        (["--encoder", "features"], "not a pixel encoder"),
        (["--weights", "missing.pth"], "missing.pth: no such file"),
        (["--level", "1", "--target-mpp", "1.0"], "one of level, downsample and target_mpp"),
    ],
)
def test_cli_user_errors_are_one_line(camelyon, tmp_path, capsys, extra, message):
    args = ["extract-features", str(camelyon), "--out", str(tmp_path / "f"), "--device", "cpu"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ips: error:") and message in err and len(err.splitlines()) == 1


def test_settings_keep_the_json_of_earlier_bags_so_they_are_not_refused():
    from ips.features import ExtractionSettings

    # as bags written before the grid settings were one object record them
    before = (
        '{"amp": "none", "encoder": "resnet50_4blocks", "level": 0, "min_tissue": 0.01, '
        '"mpp": null, "patch_size": 256, "seed": 0, "target_mpp": null, "tissue": "otsu", '
        '"weights": null}'
    )
    assert ExtractionSettings().to_json() == before
    strided = ExtractionSettings(grid=GridConfig(stride=128, tissue="none", target_mpp=1.0))
    assert json.loads(strided.to_json()) == {
        **json.loads(before),
        "level": None,
        "target_mpp": 1.0,
        "tissue": None,
        "stride": 128,
    }


def test_coords_from_other_bags_share_their_tiles_and_check_the_tile_size(tmp_path):
    (tmp_path / "slides").mkdir()
    slide = write_synthetic_slide(tmp_path / "slides" / "s1.tif", width=384, height=256, seed=3)
    first = extract_features(slide.path, tmp_path / "a", **FAST)
    assert not first["failed"]
    with h5py.File(tmp_path / "a" / "s1.h5", "r") as f:
        coords = f["coords"][()]
        tile = dict(f["coords"].attrs)
    assert tile["patch_size_level0"] == TILE and tile["patch_level"] == 0  # CLAM and TRIDENT
    assert tile["level0_magnification"] == pytest.approx(20.0)  # 0.5 um/px
    # a TRIDENT-style file: coords only, shifted off our grid, tiles named in level-0 pixels
    trident = tmp_path / "trident"
    trident.mkdir()
    with h5py.File(trident / "s1.h5", "w") as f:
        f.create_dataset("coords", data=coords[:5] + 7).attrs["patch_size_level0"] = TILE
    for source, expected in ((tmp_path / "a", coords), (trident, coords[:5] + 7)):
        out = tmp_path / f"b_{source.name}"
        summary = extract_features(
            slide.path, out, **{**FAST, "encoder": "small_cnn"}, coords_from=source
        )
        assert not summary["failed"], summary["failed"]
        with h5py.File(out / "s1.h5", "r") as f:
            np.testing.assert_array_equal(f["coords"][()], expected)
            assert f["features"].shape == (len(expected), 128)
            assert json.loads(f.attrs["extraction"])["coords_from"] == str(source.resolve())
    wider = extract_features(
        slide.path, tmp_path / "c", **{**FAST, "patch_size": 16}, coords_from=tmp_path / "a"
    )
    (failure,) = wider["failed"]
    assert "tiles are 32 level-0 pixels wide" in failure["error"]
    assert "downsample 2" in failure["error"]


def test_bags_record_the_weights_digest_and_refuse_other_weights(tmp_path):
    import torchvision

    (tmp_path / "slides").mkdir()
    slide = write_synthetic_slide(tmp_path / "slides" / "s.tif", width=256, height=256, seed=1)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    extract_features(slide.path, tmp_path / "out", weights=weights, **FAST)
    with h5py.File(tmp_path / "out" / "s.h5", "r") as f:
        attrs = dict(f.attrs)
    assert attrs["weights_sha256"] == sha256_of(weights) and attrs["amp"] == "none"
    assert attrs["embedding"] == "global average pool"
    torch.manual_seed(1)  # the same file name, other weights
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    with pytest.raises(ValueError, match="extracted with other settings"):
        extract_features(slide.path, tmp_path / "out", weights=weights, **FAST)


def test_auto_precision_is_bf16_where_the_cpu_has_bf16_units_and_the_bag_says_so(
    tmp_path, monkeypatch
):
    from ips import precision

    (tmp_path / "slides").mkdir()
    slide = write_synthetic_slide(tmp_path / "slides" / "s.tif", width=256, height=256, seed=1)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    extract_features(slide.path, tmp_path / "out", **{**FAST, "amp": "auto"})
    with h5py.File(tmp_path / "out" / "s.h5", "r") as f:
        assert f.attrs["amp"] == "bf16" and json.loads(f.attrs["extraction"])["amp"] == "bf16"


def test_presets_extract_in_their_measured_cpu_batch_by_default():
    from ips.features import default_batch_size

    assert default_batch_size("uni", torch.device("cpu")) == 8
    assert default_batch_size("prov_gigapath", torch.device("cpu")) == 4
    assert default_batch_size("resnet50_4blocks", torch.device("cpu")) == 16
    assert default_batch_size("uni", torch.device("cuda")) == 64
