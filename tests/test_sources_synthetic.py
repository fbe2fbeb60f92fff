"""Synthetic pyramidal slides: layout, determinism, level agreement, lesions, memory."""

import tracemalloc

import numpy as np
import pytest

from ips.sources import TiffSource, write_synthetic_slide
from ips.sources.synthetic import _Scene


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "jpeg.tif"
    return write_synthetic_slide(path, width=2048, height=1024, lesions=3, seed=1)


def test_pyramid_pages_and_resolution_are_what_openslide_and_tifffile_expect(jpeg_slide):
    import openslide
    import tifffile

    assert jpeg_slide.levels == 4  # 2048 -> 1024 -> 512 -> 256 = one tile
    with tifffile.TiffFile(jpeg_slide.path) as tif:
        assert tif.is_bigtiff and len(tif.pages) == 4
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1, 1]
        assert all(p.is_tiled and p.tilewidth == 256 for p in tif.pages)
        assert len(tif.series[0].levels) == 4
    with openslide.OpenSlide(str(jpeg_slide.path)) as slide:
        assert slide.level_dimensions == ((2048, 1024), (1024, 512), (512, 256), (256, 128))
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    assert TiffSource(jpeg_slide.path, patch_size=64).mpp == pytest.approx(0.5)


@pytest.fixture(scope="module")
def lossless_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "zlib.tif"
    return write_synthetic_slide(
        path, width=2048, height=1024, lesions=3, seed=1, compression="zlib"
    )


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize(
    ("name", "mean_error", "p99_error"), [("lossless_slide", 0.5, 3.0), ("jpeg_slide", 2.0, 12.0)]
)
def test_reduced_levels_match_the_box_downsampled_level0(
    request, name, mean_error, p99_error, level
):
    slide = request.getfixturevalue(name)
    factor = 2**level
    level0 = TiffSource(slide.path, patch_size=64)
    reduced = TiffSource(slide.path, patch_size=16, level=level)
    full = level0.read_region((0, 0), (2048, 1024)).astype(np.float32)  # (3, H, W)
    expected = full.reshape(3, 1024 // factor, factor, 2048 // factor, factor).mean(axis=(2, 4))
    got = reduced.read_region((0, 0), (2048 // factor, 1024 // factor)).astype(np.float32)
    error = np.abs(got - expected)
    assert error.mean() < mean_error and np.percentile(error, 99) < p99_error


def test_tiles_agree_with_the_picture_rendered_in_one_piece(tmp_path):
    slide = write_synthetic_slide(
        tmp_path / "s.tif", width=600, height=400, tile_size=128, lesions=1, compression="zlib"
    )
    scene = _Scene(600, 400, seed=0, blobs=None, lesions=1, background=255)
    centres = np.arange(600) + 0.5
    whole = scene.render(centres, centres[:400], 1)
    image = TiffSource(slide.path, patch_size=64).read_region((0, 0), (600, 400))
    np.testing.assert_array_equal(image.transpose(1, 2, 0), whole)


def test_same_seed_gives_the_same_slide_and_another_seed_another(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.tif", width=512, height=512, seed=5, compression=None)
    b = write_synthetic_slide(tmp_path / "b.tif", width=512, height=512, seed=5, compression=None)
    c = write_synthetic_slide(tmp_path / "c.tif", width=512, height=512, seed=6, compression=None)
    read = [TiffSource(s.path, patch_size=512).read([0]) for s in (a, b, c)]
    np.testing.assert_array_equal(read[0], read[1])
    assert not np.array_equal(read[0], read[2])


def test_lesions_are_darker_boxes_inside_the_tissue(jpeg_slide):
    assert len(jpeg_slide.lesion_boxes) == len(jpeg_slide.lesion_polygons) == 3
    source = TiffSource(jpeg_slide.path, patch_size=64)
    image = source.read_region((0, 0), (2048, 1024)).mean(axis=0)  # (H, W) brightness
    for (x0, y0, x1, y1), polygon in zip(
        jpeg_slide.lesion_boxes, jpeg_slide.lesion_polygons, strict=True
    ):
        assert 0 <= x0 < x1 <= 2048 and 0 <= y0 < y1 <= 1024
        assert polygon.shape[1] == 2 and (polygon.min(0) >= (x0, y0)).all()
        cx, cy = polygon.mean(axis=0).astype(int)
        assert image[cy - 2 : cy + 3, cx - 2 : cx + 3].mean() < 120  # dense dark purple
    glass = image[image > 250]
    assert glass.size > 0.1 * image.size  # white background remains


def test_blank_slide_is_all_background(tmp_path):
    slide = write_synthetic_slide(
        tmp_path / "blank.tif", width=512, height=256, tissue_blobs=0, background=240
    )
    assert slide.lesion_boxes == ()
    assert (TiffSource(slide.path, patch_size=256).read([0, 1]) == 240).all()
    with pytest.raises(ValueError, match="lesions need tissue"):
        write_synthetic_slide(tmp_path / "x.tif", width=512, height=256, tissue_blobs=0, lesions=1)


def test_writing_holds_a_few_tiles_not_the_image(tmp_path):
    tracemalloc.start()
    try:
        slide = write_synthetic_slide(tmp_path / "big.tif", width=8192, height=4096, lesions=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert slide.levels == 6
    assert peak < 32 * 2**20  # level 0 alone would be 96 MiB
    assert not (tmp_path / "big.tif.part").exists()
