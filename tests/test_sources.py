"""Patch sources: arrays, TIFF, OpenSlide and Pillow readers, resolution choice, pickling."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CMU_SVS
from ips.sources import (
    ArraySource,
    OpenSlideSource,
    PillowSource,
    TiffSource,
    choose_resolution,
    open_source,
    write_synthetic_slide,
)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A lossless 1024 x 768 pyramid with 4 levels and 128-pixel tiles."""
    path = tmp_path_factory.mktemp("slides") / "pyramid.tif"
    return write_synthetic_slide(
        path, width=1024, height=768, tile_size=128, lesions=2, compression="zlib"
    )


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    """An 8192 x 8192 JPEG pyramid: 1024 tiles of 256 pixels on level 0."""
    path = tmp_path_factory.mktemp("slides") / "big.tif"
    return write_synthetic_slide(path, width=8192, height=8192, tissue_blobs=1)


# ---- resolution choice -------------------------------------------------------------------
def test_choose_resolution_picks_exact_levels_and_resizes_between_them():
    downsamples = [1.0, 4.000723, 16.01]
    assert choose_resolution(downsamples) == (0, 1.0, False)
    assert choose_resolution(downsamples, level=2) == (2, 16.01, False)
    assert choose_resolution(downsamples, downsample=4) == (1, 4.000723, False)
    assert choose_resolution(downsamples, downsample=8) == (1, 8.0, True)
    assert choose_resolution(downsamples, target_mpp=1.0, mpp=0.25) == (1, 4.000723, False)
    assert choose_resolution(downsamples, downsample=0.5) == (0, 0.5, True)


def test_choose_resolution_rejects_conflicting_or_impossible_requests():
    with pytest.raises(ValueError, match="at most one of level, downsample, target_mpp"):
        choose_resolution([1.0, 2.0], level=1, downsample=2, name="a.svs")
    with pytest.raises(ValueError, match=r"a\.svs: target_mpp=0\.5 needs .* pass mpp="):
        choose_resolution([1.0, 2.0], target_mpp=0.5, name="a.svs")
    with pytest.raises(ValueError, match=r"level must be in \[0, 2\)"):
        choose_resolution([1.0, 2.0], level=2)


# ---- readers agree -----------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2])
def test_tiff_and_openslide_read_identical_patches_of_a_lossless_pyramid(pyramid, level):
    tiff = TiffSource(pyramid.path, patch_size=64, stride=48, level=level)
    slide = OpenSlideSource(pyramid.path, patch_size=64, stride=48, level=level)
    assert len(tiff) == len(slide) > 0
    np.testing.assert_array_equal(tiff.coords, slide.coords)
    ids = np.arange(len(tiff))[::-1]
    np.testing.assert_array_equal(tiff.read(ids), slide.read(ids))
    assert tiff.mpp == slide.mpp == 0.5
    assert tiff.level_downsamples == slide.level_downsamples


def test_tiff_and_openslide_read_identical_patches_of_a_real_svs():
    tiff = TiffSource(CMU_SVS, patch_size=224, stride=200)
    slide = OpenSlideSource(CMU_SVS, patch_size=224, stride=200)
    assert tiff.level0_size == slide.level0_size == (2220, 2967)
    assert tiff.mpp == pytest.approx(0.499) and slide.mpp == pytest.approx(0.499)
    ids = np.arange(0, len(tiff), 7)
    np.testing.assert_array_equal(tiff.read(ids), slide.read(ids))


def test_patches_equal_the_matching_level_region_read_by_openslide(pyramid):
    import openslide

    source = TiffSource(pyramid.path, patch_size=32, level=1)
    ids = np.array([0, 5, len(source) - 1])
    with openslide.OpenSlide(str(pyramid.path)) as slide:
        for i, patch in zip(ids, source.read(ids), strict=True):
            x, y = source.coords[i]
            expected = np.asarray(slide.read_region((int(x), int(y)), 1, (32, 32)))[..., :3]
            np.testing.assert_array_equal(patch.transpose(1, 2, 0), expected)


# ---- grid ------------------------------------------------------------------------------------
def test_grid_is_raster_order_with_level0_coords_and_positions(pyramid):
    source = TiffSource(pyramid.path, patch_size=100, stride=150, level=1)  # level 1: 512 x 384
    assert source.grid_shape == ((384 - 100) // 150 + 1, (512 - 100) // 150 + 1) == (2, 3)
    assert len(source) == 6
    np.testing.assert_array_equal(
        source.positions(range(6)), [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    )
    np.testing.assert_array_equal(source.coords[:4], [[0, 0], [300, 0], [600, 0], [0, 300]])
    assert source.coords.dtype == np.int64 and source.positions([0]).dtype == np.int64
    assert source.downsample == 2.0 and source.patch_size_level0 == 200.0
    assert source.level0_size == (1024, 768)


def test_int_index_returns_one_patch_and_ids_keep_their_order(pyramid):
    source = TiffSource(pyramid.path, patch_size=64)
    batch = source.read([7, 2, 7])
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.uint8
    np.testing.assert_array_equal(source[2], batch[1])
    np.testing.assert_array_equal(batch[0], batch[2])
    assert source.read([]).shape == (0, 3, 64, 64)


def test_out_of_range_ids_raise_index_error_naming_the_source(pyramid):
    source = TiffSource(pyramid.path, patch_size=64)
    with pytest.raises(IndexError, match=r"pyramid\.tif: patch ids must be in \[0, 192\), got 192"):
        source.read([0, len(source)])
    with pytest.raises(IndexError, match="got -1"):
        source.read([-1])


def test_downsample_between_levels_resizes_the_finer_level(pyramid):
    source = TiffSource(pyramid.path, patch_size=32, downsample=3)
    assert (source.level, source.downsample) == (1, 3.0)
    level0 = TiffSource(pyramid.path, patch_size=96)
    ids = np.arange(0, len(source), 5)
    np.testing.assert_array_equal(source.coords[ids] % 96, 0)
    coarse = source.read(ids).astype(np.float32)
    fine = level0.read_region((0, 0), level0.level0_size)  # (C, H, W)
    for patch, (x, y) in zip(coarse, source.coords[ids], strict=True):
        block = fine[:, y : y + 96, x : x + 96].reshape(3, 32, 3, 32, 3).mean(axis=(2, 4))
        assert np.abs(patch - block).mean() < 3


def test_target_mpp_picks_the_level_with_that_resolution(pyramid):
    source = TiffSource(pyramid.path, patch_size=32, target_mpp=2.0)
    assert (source.level, source.downsample) == (2, 4.0)
    with pytest.raises(ValueError, match="at most one of"):
        TiffSource(pyramid.path, patch_size=32, target_mpp=2.0, level=1)


def test_read_region_outside_the_image_is_white_for_files_and_black_for_arrays(pyramid):
    source = TiffSource(pyramid.path, patch_size=64)
    region = source.read_region((1000, -10), (40, 20))
    assert region.shape == (3, 20, 40)
    assert (region[:, :10] == 255).all() and (region[:, :, 24:] == 255).all()
    array = ArraySource(np.full((50, 50), 7, np.uint8), patch_size=10)
    region = array.read_region((45, 45), (10, 10))
    assert (region[:, :5, :5] == 7).all() and (region[:, 5:] == 0).all()


def test_thumbnail_keeps_the_aspect_and_fits_in_max_size(pyramid):
    thumb = TiffSource(pyramid.path, patch_size=64).thumbnail(200)
    assert thumb.dtype == np.uint8 and thumb.shape[2] == 3
    assert max(thumb.shape[:2]) <= 200 and thumb.shape[1] / thumb.shape[0] == pytest.approx(
        4 / 3, rel=0.05
    )
    assert thumb.min() < 200 and thumb.max() == 255  # tissue and glass


# ---- lazy reading ----------------------------------------------------------------------------
def test_tiff_reads_decode_only_the_tiles_the_patches_touch(big_slide, monkeypatch):
    decoded = []
    original = TiffSource._decode_segment

    def counting(self, level, index):
        decoded.append((level, index))
        return original(self, level, index)

    monkeypatch.setattr(TiffSource, "_decode_segment", counting)
    source = TiffSource(big_slide.path, patch_size=224)
    assert decoded == []  # building the grid reads no pixels
    ids = [0, 600, len(source) - 1]
    patches = source.read(ids)
    assert patches.shape == (3, 3, 224, 224)
    assert 0 < len(decoded) <= 3 * 4  # at most 2 x 2 tiles of 256 per patch
    assert len(decoded) < (8192 // 256) ** 2 / 50
    assert {level for level, _ in decoded} == {0}


def test_tile_cache_decodes_each_tile_once(pyramid, monkeypatch):
    from ips.sources import tiff

    monkeypatch.setattr(tiff, "_SHARED", {})  # this process's shared cache, empty
    decoded = []
    original = TiffSource._decode_segment
    monkeypatch.setattr(
        TiffSource, "_decode_segment", lambda s, lv, i: decoded.append(i) or original(s, lv, i)
    )
    source = TiffSource(pyramid.path, patch_size=64)
    first = source.read(range(len(source)))
    assert sorted(decoded) == list(range((1024 // 128) * (768 // 128)))
    np.testing.assert_array_equal(source.read(range(len(source))), first)
    assert len(decoded) == 48
    other = TiffSource(pyramid.path, patch_size=64)  # the same file: its tiles are cached
    np.testing.assert_array_equal(other.read(range(len(other))), first)
    assert len(decoded) == 48
    private = TiffSource(pyramid.path, patch_size=64, cache_mb=1)  # a cache of its own
    private.read(range(len(private)))
    assert len(decoded) == 96


def test_one_tile_cache_bounds_the_memory_of_all_open_slides(pyramid, monkeypatch):
    from ips.sources import tiff

    monkeypatch.setattr(tiff, "_SHARED", {})
    monkeypatch.setattr(tiff, "SHARED_CACHE_MB", 0.5)  # ~5 decoded 128 x 128 RGB tiles
    sources = [TiffSource(pyramid.path, patch_size=64) for _ in range(4)]
    for source in sources:
        source.read(range(len(source)))
    cache = tiff.shared_tile_cache()
    assert all(s._cache is cache for s in sources)
    assert 0 < cache.nbytes <= 0.5 * 2**20


def test_open_tiff_source_keeps_no_tifffile_pages(pyramid):
    # tifffile holds per-tile offsets as Python int tuples (~80 bytes per tile): at 250k tiles
    # that outweighs the patch grid, so an open source keeps numpy copies and closes tifffile
    import gc

    import tifffile

    source = TiffSource(pyramid.path, patch_size=64)
    first = source.read([0, 5])
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, (tifffile.TiffFile, tifffile.TiffPage))]
    assert not any(
        isinstance(o, tifffile.TiffFile) and Path(o.filehandle.path) == Path(pyramid.path)
        for o in alive
    )
    assert not any(
        isinstance(o, tifffile.TiffPage) and Path(o.parent.filehandle.path) == Path(pyramid.path)
        for o in alive
    )
    np.testing.assert_array_equal(source.read([0, 5]), first)
    offsets = source._levels[0].offsets
    assert isinstance(offsets, np.ndarray) and len(offsets) == (1024 // 128) * (768 // 128)


# ---- arrays ----------------------------------------------------------------------------------
def _expected(image_hwc, coords, p):
    return np.stack([image_hwc[y : y + p, x : x + p].transpose(2, 0, 1) for x, y in coords])


@pytest.mark.parametrize("layout", ["hwc", "chw", "hw"])
def test_array_source_equals_manual_slicing(layout):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    array = {"hwc": image, "chw": image.transpose(2, 0, 1), "hw": image[..., 0]}[layout]
    source = ArraySource(array, patch_size=16, stride=12)
    assert source.grid_shape == ((70 - 16) // 12 + 1, (90 - 16) // 12 + 1)
    ids = np.array([3, 0, len(source) - 1])
    expected = _expected(image if layout != "hw" else image[..., :1], source.coords[ids], 16)
    np.testing.assert_array_equal(source.read(ids), expected)


def test_array_source_reads_memmap_and_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    mm = np.memmap(tmp_path / "image.u8", dtype=np.uint8, mode="w+", shape=image.shape)
    mm[:] = image
    mm.flush()
    mm = np.memmap(tmp_path / "image.u8", dtype=np.uint8, mode="r", shape=image.shape)
    reference = ArraySource(image, patch_size=16)
    ids = np.arange(len(reference))
    for array in (mm, torch.from_numpy(image), torch.from_numpy(image.transpose(2, 0, 1).copy())):
        np.testing.assert_array_equal(
            ArraySource(array, patch_size=16).read(ids), reference.read(ids)
        )
    floats = torch.from_numpy(image).float() / 255
    np.testing.assert_array_equal(ArraySource(floats, patch_size=16).read(ids), reference.read(ids))


def test_array_source_needs_channels_last_when_the_layout_is_ambiguous():
    with pytest.raises(ValueError, match=r"cannot tell the channel axis of shape \(5, 40, 40\)"):
        ArraySource(np.zeros((5, 40, 40), np.uint8), patch_size=8)
    source = ArraySource(np.zeros((5, 40, 40), np.uint8), patch_size=8, channels_last=False)
    assert source.channels == 5 and source.read([0]).shape == (1, 5, 8, 8)


def test_image_smaller_than_a_patch_is_an_error():
    with pytest.raises(ValueError, match="small: image is 10x10 .* smaller than patch_size 16"):
        ArraySource(np.zeros((10, 10), np.uint8), patch_size=16, name="small")


# ---- pickling and workers --------------------------------------------------------------------
def test_sources_pickle_after_a_read_and_read_the_same(pyramid, tmp_path):
    mm = np.memmap(tmp_path / "m.u8", dtype=np.uint8, mode="w+", shape=(300, 200, 3))
    mm[:] = np.arange(300 * 200 * 3, dtype=np.uint64).reshape(mm.shape) % 251
    mm.flush()
    sources = [
        TiffSource(pyramid.path, patch_size=64, level=1),
        OpenSlideSource(pyramid.path, patch_size=64),
        ArraySource(
            np.memmap(tmp_path / "m.u8", dtype=np.uint8, mode="r", shape=(300, 200, 3)),
            patch_size=32,
        ),
    ]
    for source in sources:
        ids = np.arange(0, len(source), 2)
        before = source.read(ids)
        data = pickle.dumps(source)
        assert len(data) < 100_000  # handles and memory maps are not pickled as data
        np.testing.assert_array_equal(pickle.loads(data).read(ids), before)
        np.testing.assert_array_equal(source.read(ids), before)


def test_dataloader_workers_read_the_right_patches(pyramid):
    torch = pytest.importorskip("torch")

    class Patches(torch.utils.data.Dataset):
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            return torch.from_numpy(self.source[i]), i

    source = TiffSource(pyramid.path, patch_size=64)
    expected = source.read(range(len(source)))  # opens the file in the parent first
    loader = torch.utils.data.DataLoader(Patches(source), batch_size=8, num_workers=2)
    for patches, ids in loader:
        np.testing.assert_array_equal(patches.numpy(), expected[ids.numpy()])


# ---- other readers and open_source -----------------------------------------------------------
def test_pillow_source_reads_png_like_the_array_and_composites_alpha(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    source = open_source(tmp_path / "photo.png", patch_size=20)
    assert isinstance(source, PillowSource) and source.mpp is None
    ids = np.arange(len(source))
    np.testing.assert_array_equal(source.read(ids), ArraySource(image, patch_size=20).read(ids))
    rgba = np.zeros((40, 40, 4), np.uint8)
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert (PillowSource(tmp_path / "clear.png", patch_size=20).read([0]) == 255).all()


def test_open_source_picks_the_reader_by_suffix(pyramid, tmp_path):
    assert isinstance(open_source(pyramid.path, patch_size=64), OpenSlideSource)  # tiled TIFF
    assert isinstance(open_source(pyramid.path, patch_size=64, backend="tifffile"), TiffSource)
    strips = tmp_path / "plain.tif"
    import tifffile

    image = np.random.default_rng(3).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    tifffile.imwrite(strips, image, rowsperstrip=7, compression="zlib")
    source = open_source(strips, patch_size=30)  # not tiled: OpenSlide declines it
    assert isinstance(source, TiffSource)
    np.testing.assert_array_equal(
        source.read(range(len(source))), ArraySource(image, patch_size=30).read(range(12))
    )


def test_open_source_reads_svs_with_openslide():
    source = open_source(CMU_SVS, patch_size=256)
    assert isinstance(source, OpenSlideSource) and source.grid_shape == (11, 8)


@pytest.mark.parametrize("suffix", [".tif", ".svs", ".png"])
def test_missing_and_corrupt_files_give_one_line_errors_naming_the_path(tmp_path, suffix):
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(FileNotFoundError, match="missing") as info:
        open_source(missing, patch_size=32)
    assert str(missing) in str(info.value)
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(np.random.default_rng(4).bytes(5000))
    with pytest.raises(ValueError) as info:
        open_source(corrupt, patch_size=32)
    message = str(info.value)
    assert (
        message.startswith(f"{corrupt}: cannot read as a slide or image (") and "\n" not in message
    )


def test_tiff_source_on_a_corrupt_file_names_it(tmp_path):
    corrupt = tmp_path / "bad.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(100))
    with pytest.raises(ValueError, match=r"bad\.tif: cannot read as a slide or image"):
        TiffSource(corrupt, patch_size=32)


def test_sources_import_without_torch():
    src = Path(__file__).resolve().parents[1] / "src" / "ips"
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"
        f"pkg = types.ModuleType('ips'); pkg.__path__ = [{str(src)!r}]; sys.modules['ips'] = pkg\n"
        "import ips.sources\n"
        "assert not {'tifffile', 'openslide', 'skimage'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- TIFF layouts ----------------------------------------------------------------------------
def test_tiff_source_reads_subifd_pyramids(tmp_path):
    import tifffile

    rng = np.random.default_rng(5)
    level0 = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
    level1 = level0[::2, ::2].copy()
    path = tmp_path / "subifd.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(64, 64), subifds=1, photometric="rgb", compression="zlib")
        tif.write(level1, tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
    source = TiffSource(path, patch_size=32, level=1)
    assert source.level_dimensions == ((384, 256), (192, 128)) and source.downsample == 2.0
    np.testing.assert_array_equal(
        source.read([0, 7]), ArraySource(level1, patch_size=32).read([0, 7])
    )


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_source_reads_grey_16_bit_and_alpha_images(tmp_path, compression):
    import tifffile

    rng = np.random.default_rng(6)
    grey = rng.integers(0, 65536, (96, 128), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "grey.tif", grey, compression=compression)
    source = TiffSource(tmp_path / "grey.tif", patch_size=32)
    assert source.channels == 1
    expected = ArraySource((grey >> 8).astype(np.uint8), patch_size=32).read(range(12))
    np.testing.assert_array_equal(source.read(range(12)), expected)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 0  # transparent top half
    rgba[32:, :, 3] = 255
    tifffile.imwrite(
        tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples="unassalpha", tile=(32, 32)
    )
    source = TiffSource(tmp_path / "rgba.tif", patch_size=32)
    patches = source.read(range(4))
    assert source.channels == 3 and (patches[:2] == 255).all()
    np.testing.assert_array_equal(
        patches[2:], ArraySource(rgba[..., :3], patch_size=32).read([2, 3])
    )


def test_uncompressed_tiff_is_memory_mapped(tmp_path):
    import tifffile

    image = np.random.default_rng(7).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", image)
    source = TiffSource(tmp_path / "raw.tif", patch_size=50)
    ids = np.arange(len(source))
    np.testing.assert_array_equal(source.read(ids), ArraySource(image, patch_size=50).read(ids))
    assert source._levels[0].memmap is not None


def test_svs_falls_back_to_tifffile_without_openslide(monkeypatch):
    import ips.sources.base as base

    monkeypatch.setattr(base, "_installed", lambda module: module != "openslide")
    source = open_source(CMU_SVS, patch_size=256)
    assert isinstance(source, TiffSource) and source.mpp == pytest.approx(0.499)


def test_missing_optional_reader_names_the_extra(pyramid, monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ImportError, match=r"pip install 'iterative-patch-selection\[wsi\]'"):
        TiffSource(pyramid.path, patch_size=64)
