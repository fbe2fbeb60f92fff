"""Tests for ips.viz: score scaling, rasterising, pictures (decoded with PIL) and GeoJSON."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from ips import viz

pictures = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="pictures need matplotlib"
)

GREEN = (0, 255, 0)  # thumbnail colour that no colormap, text or outline produces


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _green_picture(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.array(GREEN, np.uint8), (height, width, 3)).copy()


def _thumbnail_box(picture: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the green thumbnail inside a rendered picture."""
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    rows, cols = np.nonzero((g > r + 40) & (g > b + 40))
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def _region(picture, box, thumb_shape, rows, cols) -> np.ndarray:
    """Mean colour (3,) of the picture over thumbnail rows/cols [start, stop)."""
    top, left, bottom, right = box
    sy, sx = (bottom - top) / thumb_shape[0], (right - left) / thumb_shape[1]
    y0, y1 = round(top + rows[0] * sy), round(top + rows[1] * sy)
    x0, x1 = round(left + cols[0] * sx), round(left + cols[1] * sx)
    return picture[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)


# level-0 image 800 x 600 shown as an 80 x 60 thumbnail; 100-pixel patches cover 10 x 10
IMAGE_SIZE = (800, 600)
THUMB = (60, 80)
HOT, COLD = (
    (600, 100),
    (100, 400),
)  # (x, y): thumbnail cols 60-69 rows 10-19 / cols 10-19 rows 40-49
COORDS = np.array([HOT, COLD, (300, 300)], float)
SCORES = np.array([0.9, 0.01, 0.3])


# -------------------------------------------------------------------------------- scale_scores


@pytest.mark.parametrize("mode", viz.SCALES)
def test_scale_scores_keeps_order_and_spans_zero_to_one(mode):
    scores = np.random.default_rng(0).exponential(0.01, 200)
    values = viz.scale_scores(scores, mode)
    order = np.argsort(scores)
    assert values.shape == scores.shape
    assert np.all(np.diff(values[order]) >= 0)
    assert values.min() == pytest.approx(0.0) and values.max() == pytest.approx(1.0)
    assert values[np.argmin(scores)] == pytest.approx(0.0)
    assert values[np.argmax(scores)] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["linear", "rank"])
def test_scale_scores_keeps_distinct_scores_distinct(mode):
    scores = np.random.default_rng(1).random(50)
    values = viz.scale_scores(scores, mode)
    assert np.all(np.diff(values[np.argsort(scores)]) > 0)


def test_rank_scale_spreads_a_peaked_distribution_that_linear_squashes():
    rest = np.random.default_rng(2).uniform(0.5e-4, 1.5e-4, 100)
    scores = np.concatenate([[0.99], rest])
    median_patch = np.argsort(scores)[len(scores) // 2]
    assert viz.scale_scores(scores, "rank")[median_patch] == pytest.approx(0.5, abs=0.02)
    assert viz.scale_scores(scores, "linear")[median_patch] < 1e-3


def test_log_scale_separates_orders_of_magnitude():
    values = viz.scale_scores(np.array([1e-4, 1e-3, 1e-2, 1e-1]), "log")
    np.testing.assert_allclose(values, [0, 1 / 3, 2 / 3, 1])


def test_log_scale_clips_tiny_and_zero_scores_at_the_floor():
    values = viz.scale_scores(np.array([0.0, 1e-12, 1.0]), "log")
    np.testing.assert_allclose(values, [0, 0, 1])


@pytest.mark.parametrize("mode", viz.SCALES)
def test_equal_scores_all_scale_to_one(mode):
    np.testing.assert_array_equal(viz.scale_scores(np.full(4, 0.25), mode), np.ones(4))
    np.testing.assert_array_equal(viz.scale_scores(np.array([0.7]), mode), [1.0])


def test_ties_share_their_mean_rank():
    values = viz.scale_scores(np.array([1.0, 2.0, 2.0, 3.0]), "rank")
    np.testing.assert_allclose(values, [0, 0.5, 0.5, 1])


def test_unknown_scale_mode_is_refused_naming_scale_and_the_choices():
    with pytest.raises(ValueError, match=r"scale must be one of .*linear.*rank.*log"):
        viz.scale_scores(np.ones(3), "sqrt")


def test_log_scale_refuses_scores_without_a_positive_maximum():
    with pytest.raises(ValueError, match="log"):
        viz.scale_scores(np.array([-1.0, 0.0]), "log")


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="scores must be finite"):
        viz.scale_scores(np.array([0.1, np.nan]))


# -------------------------------------------------------------------------------- score_grid


def test_score_grid_paints_one_patch_at_its_thumbnail_pixels_and_nan_elsewhere():
    grid = viz.score_grid(np.array([HOT]), np.array([0.7]), 100, IMAGE_SIZE, THUMB)
    assert grid.shape == THUMB
    expected = np.full(THUMB, np.nan)
    expected[10:20, 60:70] = 0.7
    np.testing.assert_array_equal(grid, expected)
    row, col = np.unravel_index(np.nanargmax(grid), grid.shape)
    assert 10 <= row < 20 and 60 <= col < 70


def test_score_grid_keeps_the_higher_score_where_patches_overlap():
    coords = np.array([(0, 0), (50, 50)], float)
    grid = viz.score_grid(coords, np.array([0.2, 0.9]), 100, IMAGE_SIZE, THUMB)
    assert grid[2, 2] == 0.2 and grid[7, 7] == 0.9 and grid[12, 12] == 0.9
    assert np.isnan(grid[2, 12])  # under neither patch


def test_score_grid_gives_a_tiny_patch_one_pixel_and_skips_patches_outside():
    coords = np.array([(405, 305), (5000, 5000)], float)
    grid = viz.score_grid(coords, np.array([1.0, 1.0]), 2, IMAGE_SIZE, THUMB)
    assert np.count_nonzero(~np.isnan(grid)) == 1 and grid[30, 40] == 1.0


# ----------------------------------------------------------------------------------- heatmap


@pictures
def test_heatmap_hot_patch_is_brighter_than_the_cold_patch_and_lies_where_it_should(tmp_path):
    out = viz.heatmap_overlay(
        _green_picture(*THUMB),
        COORDS,
        SCORES,
        patch_size=100,
        image_size=IMAGE_SIZE,
        out=tmp_path / "heat.png",
        title="prediction: tumour (p = 0.93)",
    )
    picture = _read(out)
    assert picture.shape[0] >= THUMB[0] and picture.shape[1] >= THUMB[1]
    box = _thumbnail_box(picture)
    hot = _region(picture, box, THUMB, (11, 19), (61, 69))
    cold = _region(picture, box, THUMB, (41, 49), (11, 19))
    empty = _region(picture, box, THUMB, (51, 59), (71, 79))  # under no patch
    assert hot[0] > cold[0] + 80  # inferno: hot end pale yellow, cold end black
    assert hot.sum() > cold.sum() + 150
    np.testing.assert_allclose(empty, GREEN, atol=2)  # the plain thumbnail shows through
    assert cold[1] < 200  # the cold patch is overlaid (darkened), not left plain


@pictures
def test_heatmap_is_at_least_as_large_as_a_large_thumbnail(tmp_path):
    thumbnail = np.full((700, 900), 200, np.uint8)  # grey
    out = viz.heatmap_overlay(
        thumbnail,
        COORDS,
        SCORES,
        patch_size=100,
        image_size=(9000, 7000),
        out=tmp_path / "big.png",
        scale="rank",
    )
    height, width = _read(out).shape[:2]
    assert width >= 900 and height >= 700


@pictures
@pytest.mark.parametrize("selected", [np.array([True, False, False]), np.array([0])])
def test_heatmap_outlines_only_when_patches_are_selected(tmp_path, selected):
    def cyan_pixels(**kwargs):
        out = viz.heatmap_overlay(
            _green_picture(*THUMB),
            COORDS,
            SCORES,
            patch_size=100,
            image_size=IMAGE_SIZE,
            out=tmp_path / "h.png",
            **kwargs,
        )
        p = _read(out)
        return np.count_nonzero((p[..., 0] < 80) & (p[..., 1] > 180) & (p[..., 2] > 200))

    assert cyan_pixels() == 0
    assert cyan_pixels(selected=selected) > 100


@pictures
@pytest.mark.parametrize("scale", viz.SCALES)
def test_heatmap_draws_every_scale(tmp_path, scale):
    out = viz.heatmap_overlay(
        _green_picture(*THUMB),
        COORDS,
        SCORES,
        patch_size=100,
        image_size=IMAGE_SIZE,
        out=tmp_path / f"{scale}.png",
        scale=scale,
    )
    assert _read(out).shape[2] == 3


# --------------------------------------------------------------------------------- selection


@pictures
def test_selection_overlay_marks_the_best_patch_more_strongly(tmp_path):
    out = viz.selection_overlay(
        _green_picture(*THUMB),
        COORDS,
        SCORES,
        patch_size=100,
        downsample=10,
        out=tmp_path / "sel.png",
        title="top patches",
        top_labels=0,
    )
    picture = _read(out)
    box = _thumbnail_box(picture)
    hot = _region(picture, box, THUMB, (12, 18), (62, 68))  # inside, away from the outline
    cold = _region(picture, box, THUMB, (42, 48), (12, 18))
    empty = _region(picture, box, THUMB, (51, 59), (71, 79))
    shift = lambda colour: np.abs(colour - GREEN).sum()  # noqa: E731
    assert shift(hot) > shift(cold) + 40
    assert shift(empty) < 3


@pictures
def test_selection_overlay_writes_score_tags_and_keeps_the_image_size(tmp_path):
    image = np.full((600, 700), 120, np.uint8)  # large enough to be drawn 1:1
    kwargs = dict(patch_size=100, downsample=1.0)
    plain = _read(
        viz.selection_overlay(image, COORDS, SCORES, out=tmp_path / "a.png", top_labels=0, **kwargs)
    )
    tagged = _read(
        viz.selection_overlay(image, COORDS, SCORES, out=tmp_path / "b.png", top_labels=2, **kwargs)
    )
    assert plain.shape[0] >= 600 and plain.shape[1] >= 700
    assert plain.shape == tagged.shape and np.abs(plain - tagged).sum() > 0


# ----------------------------------------------------------------------------------- gallery


@pictures
def test_patch_gallery_sorts_by_score_and_shows_every_patch_pixel(tmp_path):
    size = 128  # no enlargement: drawn 1:1
    patches = np.zeros((3, 3, size, size), np.uint8)
    for i in range(3):
        patches[i, i] = 255  # pure red, green, blue
    out = viz.patch_gallery(
        patches,
        np.array([0.1, 0.9, 0.5]),
        out=tmp_path / "g.png",
        title="most attended",
        labels=["a", "b", "c"],
    )
    picture = _read(out)
    assert picture.shape[1] >= 3 * size and picture.shape[0] >= size
    centres = {}
    for channel in range(3):
        pure = np.zeros(3, int)
        pure[channel] = 255
        rows, cols = np.nonzero((picture == pure).all(axis=2))
        assert len(rows) >= size * size  # at least one picture pixel per patch pixel
        centres[channel] = cols.mean()
    assert centres[1] < centres[2] < centres[0]  # green (0.9), blue (0.5), red (0.1)


@pictures
@pytest.mark.parametrize("shape", [(5, 16, 16), (5, 1, 16, 16)])
def test_patch_gallery_takes_grey_patches_and_enlarges_small_ones(tmp_path, shape):
    patches = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    out = viz.patch_gallery(patches, np.arange(5.0), out=tmp_path / "g.png", ncols=3)
    height, width = _read(out).shape[:2]
    assert width >= 3 * 16 * 6 and height >= 2 * 16 * 6  # 16-pixel patches shown 6x


# ----------------------------------------------------------------------------------- geojson


def test_geojson_polygons_map_back_to_the_patch_rectangles_best_first(tmp_path):
    coords = np.array([(100, 200), (0, 0), (512, 1024)], dtype=np.int64)
    scores = np.array([0.2, 0.7, 0.1], dtype=np.float32)
    out = viz.patches_to_geojson(
        coords,
        scores,
        patch_size=256,
        out=tmp_path / "p.geojson",
        properties={"slide": "s1", "level": np.int64(0)},
        name="ips",
    )

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    expected_order = [1, 0, 2]  # by descending score
    for rank, (feature, i) in enumerate(zip(doc["features"], expected_order, strict=True), start=1):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        x, y = coords[i]
        assert ring == [[x, y], [x + 256, y], [x + 256, y + 256], [x, y + 256], [x, y]]
        props = feature["properties"]
        assert props["score"] == pytest.approx(float(scores[i]))
        assert props["rank"] == rank and isinstance(props["rank"], int)
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] == "ips"
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["attention score"] == pytest.approx(float(scores[i]))
        assert props["slide"] == "s1" and props["level"] == 0


def test_geojson_refuses_nan_in_extra_properties(tmp_path):
    with pytest.raises(ValueError):
        viz.patches_to_geojson(
            COORDS,
            SCORES,
            patch_size=100,
            out=tmp_path / "p.geojson",
            properties={"bad": float("nan")},
        )
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- bad inputs


def _heatmap(tmp_path, coords, scores):
    return viz.heatmap_overlay(
        _green_picture(*THUMB),
        coords,
        scores,
        patch_size=100,
        image_size=IMAGE_SIZE,
        out=tmp_path / "x.png",
    )


def _selection(tmp_path, coords, scores):
    return viz.selection_overlay(
        _green_picture(*THUMB), coords, scores, patch_size=100, out=tmp_path / "x.png"
    )


def _geojson(tmp_path, coords, scores):
    return viz.patches_to_geojson(coords, scores, patch_size=100, out=tmp_path / "x.geojson")


def _grid(tmp_path, coords, scores):
    return viz.score_grid(coords, scores, 100, IMAGE_SIZE, THUMB)


@pictures
@pytest.mark.parametrize("draw", [_heatmap, _selection, _geojson, _grid])
@pytest.mark.parametrize(
    ("coords", "scores", "argument"),
    [
        (np.zeros((3, 3)), np.zeros(3), "coords"),
        (np.zeros(3), np.zeros(3), "coords"),
        (np.zeros((3, 2)), np.zeros(4), "scores"),
        (np.zeros((3, 2)), np.zeros((3, 1)), "scores"),
    ],
)
def test_bad_shapes_are_refused_naming_the_argument(tmp_path, draw, coords, scores, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be .*got"):
        draw(tmp_path, coords, scores)


@pictures
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (
            lambda p: viz.heatmap_overlay(
                np.zeros((6, 8, 2), np.uint8),
                COORDS,
                SCORES,
                patch_size=100,
                image_size=IMAGE_SIZE,
                out=p,
            ),
            "thumbnail",
        ),
        (
            lambda p: viz.heatmap_overlay(
                np.zeros((6, 8), np.float32),
                COORDS,
                SCORES,
                patch_size=100,
                image_size=IMAGE_SIZE,
                out=p,
            ),
            "thumbnail",
        ),
        (
            lambda p: viz.heatmap_overlay(
                np.zeros((6, 8), np.uint8),
                COORDS,
                SCORES,
                patch_size=100,
                image_size=IMAGE_SIZE,
                out=p,
                selected=np.ones(2, bool),
            ),
            "selected",
        ),
        (
            lambda p: viz.selection_overlay(
                np.zeros((2, 6, 8, 3), np.uint8), COORDS, SCORES, patch_size=100, out=p
            ),
            "image",
        ),
        (
            lambda p: viz.patch_gallery(np.zeros((3, 2, 8, 8), np.uint8), np.zeros(3), out=p),
            "patches",
        ),
        (lambda p: viz.patch_gallery(np.zeros((3, 8, 8), np.uint8), np.zeros(2), out=p), "scores"),
        (
            lambda p: viz.patch_gallery(
                np.zeros((3, 8, 8), np.uint8), np.zeros(3), out=p, labels=["a"]
            ),
            "labels",
        ),
        (lambda p: viz.score_grid(COORDS, SCORES, 100, IMAGE_SIZE, (60,)), "out_shape"),
        (lambda p: viz.score_grid(COORDS, SCORES, 0, IMAGE_SIZE, THUMB), "patch_size"),
    ],
)
def test_bad_pictures_and_arguments_are_refused_naming_the_argument(tmp_path, call, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must"):
        call(tmp_path / "x.png")


# ------------------------------------------------------------------------------- file writing


@pictures
def test_pictures_are_written_atomically_and_a_failed_write_keeps_the_old_file(
    tmp_path, monkeypatch
):
    out = tmp_path / "sub" / "heat.png"
    _heatmap_to = lambda: viz.heatmap_overlay(  # noqa: E731
        _green_picture(*THUMB), COORDS, SCORES, patch_size=100, image_size=IMAGE_SIZE, out=out
    )
    assert _heatmap_to() == out
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"]  # no temporary left
    before = out.read_bytes()

    from matplotlib.figure import Figure

    def broken(self, fh, **kwargs):
        fh.write(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        _heatmap_to()
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"]


@pictures
def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pictures need matplotlib.*pip install matplotlib"):
        viz.patch_gallery(np.zeros((1, 8, 8), np.uint8), np.zeros(1), out=tmp_path / "g.png")
    out = viz.patches_to_geojson(COORDS, SCORES, patch_size=100, out=tmp_path / "p.geojson")
    assert out.exists()  # GeoJSON needs no matplotlib
