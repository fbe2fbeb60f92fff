"""Tissue masks: Otsu on thumbnails, mask images, GeoJSON polygons, patch filtering."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import CMU_SVS
from ips.sources import (
    ArraySource,
    EmptyTissueError,
    OpenSlideSource,
    TiffSource,
    load_tissue_mask,
    otsu_tissue_mask,
    rasterize_geojson,
    tissue_patch_ids,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("tissue") / "slide.tif"
    return write_synthetic_slide(path, width=2048, height=1536, lesions=2, seed=3)


def test_otsu_on_a_constant_image_finds_no_tissue():
    for value in (0, 128, 255):
        mask = otsu_tissue_mask(np.full((30, 40, 3), value, np.uint8))
        assert mask.shape == (30, 40) and not mask.any()
    assert not otsu_tissue_mask(np.zeros((0, 0, 3), np.uint8)).any()


def test_otsu_separates_stained_pixels_from_glass_and_ignores_jpeg_noise():
    rng = np.random.default_rng(0)
    image = np.full((40, 60, 3), 250, np.uint8) - rng.integers(0, 3, (40, 60, 3)).astype(np.uint8)
    assert not otsu_tissue_mask(image).any()  # noise only
    image[10:30, 20:50] = (200, 120, 170)
    mask = otsu_tissue_mask(image)
    assert mask[10:30, 20:50].all() and mask.sum() == 20 * 30


def test_otsu_on_grey_images_uses_darkness():
    image = np.full((20, 20), 240, np.uint8)
    image[:10] = 60
    mask = otsu_tissue_mask(image)
    assert mask[:10].all() and not mask[10:].any()


def test_tissue_patch_ids_keep_patches_above_the_fraction():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True  # top-left quarter
    mask[4, 4] = True  # one pixel in the bottom-right quarter
    coords = np.array([[0, 0], [40, 0], [0, 40], [40, 40]])  # 40-pixel patches, mask at 1/10
    np.testing.assert_array_equal(tissue_patch_ids(mask, 10.0, coords, 40, 0.01), [0, 3])
    np.testing.assert_array_equal(tissue_patch_ids(mask, 10.0, coords, 40, 0.1), [0])
    np.testing.assert_array_equal(
        tissue_patch_ids(mask, (10.0, 10.0), coords, 40, 0.0), [0, 1, 2, 3]
    )


@pytest.mark.parametrize("reader", [TiffSource, OpenSlideSource])
def test_otsu_finds_tissue_on_a_real_slide(reader):
    full = reader(CMU_SVS, patch_size=224)
    kept = reader(CMU_SVS, patch_size=224, tissue="otsu")
    assert kept.grid_shape == full.grid_shape
    assert 0.05 <= len(kept) / len(full) <= 0.95
    assert np.isin(kept.coords, full.coords).all()
    brightness = kept.read(range(len(kept))).mean()
    assert brightness < full.read(range(len(full))).mean()  # glass-only patches dropped


def test_otsu_keeps_the_synthetic_tissue(slide):
    full = TiffSource(slide.path, patch_size=128)
    kept = TiffSource(slide.path, patch_size=128, tissue="otsu", min_tissue=0.5)
    assert 0 < len(kept) < len(full)
    patches = kept.read(range(len(kept)))
    saturation = (patches.max(1).astype(int) - patches.min(1)).mean(axis=(1, 2))
    assert (saturation > 20).all()  # every kept patch is mostly stained


def test_blank_slide_raises_empty_tissue_error_naming_the_slide(tmp_path):
    blank = write_synthetic_slide(tmp_path / "blank.tif", width=1024, height=1024, tissue_blobs=0)
    for reader in (TiffSource, OpenSlideSource):
        with pytest.raises(
            EmptyTissueError, match=r"blank\.tif: no patch .* min_tissue=0\.01"
        ) as info:
            reader(blank.path, patch_size=128, tissue="otsu")
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
        assert "threshold" in str(info.value)


def test_geojson_polygons_select_the_patches_they_cover(slide, tmp_path):
    # a 512 x 256 box at (256, 512) with a hole over the patch at (384, 512): 8 - 1 patches of 128
    box = [[256, 512], [768, 512], [768, 768], [256, 768], [256, 512]]
    hole = [[384, 512], [512, 512], [512, 640], [384, 640], [384, 512]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box, hole]}}
    expected = {(x, y) for x in (256, 384, 512, 640) for y in (512, 640)} - {(384, 512)}
    for i, doc in enumerate(({"type": "FeatureCollection", "features": [feature]}, [feature])):
        path = tmp_path / f"annotation{i}.geojson"
        path.write_text(json.dumps(doc))
        source = TiffSource(slide.path, patch_size=128, tissue=path, min_tissue=0.5)
        assert {tuple(c) for c in source.coords.tolist()} == expected
        assert source.grid_shape == (12, 16)


def test_geojson_rasterises_polygons_with_holes_at_low_resolution():
    ring = [[0, 0], [400, 0], [400, 200], [0, 200], [0, 0]]
    hole = [[100, 50], [300, 50], [300, 150], [100, 150], [100, 50]]
    geometry = {"type": "MultiPolygon", "coordinates": [[ring, hole]]}
    mask = rasterize_geojson(geometry, (800, 400), 10.0)
    assert mask.shape == (40, 80)
    assert mask[2, 2] and mask[18, 38] and not mask[10, 20] and not mask[30, 60]
    with pytest.raises(ValueError, match="no Polygon"):
        rasterize_geojson({"type": "Point", "coordinates": [1, 2]}, (800, 400), 10.0)


def test_mask_image_of_any_size_is_stretched_over_the_slide(slide, tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :20] = 255  # left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    loaded, downsample = load_tissue_mask(tmp_path / "mask.png", (2048, 1536))
    assert loaded.shape == (30, 40) and downsample == (2048 / 40, 1536 / 30)
    source = TiffSource(slide.path, patch_size=256, tissue=tmp_path / "mask.png", min_tissue=0.5)
    assert source.grid_shape == (6, 8) and len(source) == 6 * 4
    assert (source.coords[:, 0] < 1024).all() and (source.positions(range(24))[:, 1] < 4).all()


def test_mask_array_and_missing_or_invalid_masks(tmp_path):
    image = np.zeros((64, 64), np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    source = ArraySource(image, patch_size=16, tissue=mask, min_tissue=0.5)
    np.testing.assert_array_equal(source.coords, [[0, 0]])
    with pytest.raises(FileNotFoundError, match="nothing.geojson"):
        ArraySource(image, patch_size=16, tissue=tmp_path / "nothing.geojson")
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.geojson: cannot read as GeoJSON"):
        ArraySource(image, patch_size=16, tissue=tmp_path / "bad.geojson")
    with pytest.raises(EmptyTissueError, match="array: no patch"):
        ArraySource(image, patch_size=16, tissue=np.zeros((4, 4), bool))
