"""Files from elsewhere are data: hostile or broken annotation XML, GeoJSON masks, feature bags
and TIFF tile tables each give one InputError line naming the file and what was expected.

Each case writes a tiny file, reads it with the reader that meets such files in a run, and
checks the error's type, that it is one line, and the words that name the file and the problem.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

import ips
from ips.cli import main
from ips.data.camelyon16 import read_asap_xml, write_asap_xml
from ips.data.feature_bags import FeatureBag, open_feature_bag
from ips.errors import InputError, MissingFileError
from ips.sources.base import CannotReadError
from ips.sources.tiff import TiffSource
from ips.sources.tissue import load_tissue_mask, rasterize_geojson
from ips.train import READ_ERRORS

h5py = pytest.importorskip("h5py")


def raises_one_line(error: type[Exception], call, *words: str) -> str:
    """Run `call`, expect `error` with a one-line message holding every word; return it."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ---- ASAP XML ---------------------------------------------------------------------------------

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
{annotations}
</Annotations><AnnotationGroups/></ASAP_Annotations>
"""
SQUARE = '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>'
SQUARE += '<Coordinate Order="2" X="10" Y="10"/><Coordinate Order="3" X="0" Y="10"/>'


def asap(*annotations: str) -> str:
    return ASAP.format(annotations="\n".join(annotations))


def annotation(name: str, coordinates: str, kind: str = "Polygon") -> str:
    return (
        f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="Tumor">'
        f"<Coordinates>{coordinates}</Coordinates></Annotation>"
    )


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE ASAP_Annotations [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ASAP_Annotations><Annotations>
<Annotation Name="&lol9;" Type="Polygon" PartOfGroup="Tumor"/>
</Annotations></ASAP_Annotations>
"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE ASAP_Annotations [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<ASAP_Annotations><Annotations>
<Annotation Name="&x;" Type="Polygon" PartOfGroup="Tumor"/>
</Annotations></ASAP_Annotations>
"""

DTD_ONLY = """<?xml version="1.0"?>
<!DOCTYPE ASAP_Annotations SYSTEM "http://example.invalid/asap.dtd">
<ASAP_Annotations><Annotations/></ASAP_Annotations>
"""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param(BILLION_LAUGHS, ["refused", "entity 'lol'", "billion laughs"], id="laughs"),
        pytest.param(
            XXE, ["refused", "external entity 'x'", "file:///etc/passwd", "another file"], id="xxe"
        ),
        pytest.param(DTD_ONLY, ["refused", "has a DTD", "<!DOCTYPE ASAP_Annotations"], id="dtd"),
    ],
)
def test_asap_xml_with_a_dtd_or_entities_is_refused_before_anything_expands(tmp_path, text, words):
    path = tmp_path / "hostile.xml"
    path.write_text(text)
    start = time.perf_counter()
    message = raises_one_line(InputError, lambda: read_asap_xml(path), str(path), *words)
    assert time.perf_counter() - start < 1.0  # nothing expanded
    assert "root:" not in message  # /etc/passwd was not read into the message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param("<ASAP_Annotations><Annotations>", ["not valid XML"], id="malformed"),
        pytest.param(
            b"<ASAP_Annotations>\xff\xfe</ASAP_Annotations>", ["not valid XML"], id="utf8"
        ),
        pytest.param(
            asap(annotation("A", SQUARE), annotation("B", '<Coordinate Order="0" Y="3"/>' * 3)),
            ["annotation 1 ('B')", "expected numeric Order, X and Y", "'Y': '3'"],
            id="missing-x",
        ),
        pytest.param(
            asap(annotation("A", SQUARE.replace('X="10" Y="10"', 'X="10" Y="ten"'))),
            ["annotation 0 ('A')", "expected numeric Order, X and Y", "'ten'"],
            id="non-numeric",
        ),
        pytest.param(
            asap(annotation("A", SQUARE.replace('X="10" Y="10"', 'X="nan" Y="10"'))),
            ["annotation 0 ('A')", "finite", "'nan'"],
            id="nan",
        ),
        pytest.param(
            asap(annotation("A", SQUARE.replace('X="10" Y="10"', 'X="inf" Y="10"'))),
            ["annotation 0 ('A')", "finite"],
            id="inf",
        ),
        pytest.param(
            asap(
                annotation("A", SQUARE),
                annotation("Thin", SQUARE[: SQUARE.index('<Coordinate Order="2"')]),
            ),
            ["annotation 1 ('Thin')", "a Polygon needs at least 3 coordinate(s), got 2"],
            id="two-points",
        ),
        pytest.param(
            asap(annotation("Empty", "")),
            ["annotation 0 ('Empty')", "needs at least 3 coordinate(s), got 0"],
            id="no-points",
        ),
        pytest.param(
            "<Other/>", ["expected an <ASAP_Annotations> document, got <Other>"], id="root"
        ),
    ],
)
def test_broken_asap_xml_names_the_file_the_annotation_and_what_was_expected(tmp_path, body, words):
    path = tmp_path / "broken.xml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    raises_one_line(InputError, lambda: read_asap_xml(path), str(path), *words)


def test_asap_xml_written_here_and_dots_still_read(tmp_path):
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=np.float64)
    (lesion,) = read_asap_xml(write_asap_xml(tmp_path / "a.xml", [square]))
    np.testing.assert_allclose(lesion.points, square)
    dot = annotation("D", '<Coordinate Order="0" X="4" Y="5"/>', kind="Dot")
    (tmp_path / "dot.xml").write_text(asap(dot))
    (point,) = read_asap_xml(tmp_path / "dot.xml")
    assert point.kind == "Dot" and point.points.tolist() == [[4.0, 5.0]]
    with pytest.raises(MissingFileError, match="nothing.xml"):
        read_asap_xml(tmp_path / "nothing.xml")
    edge = SQUARE.replace('X="10" Y="10"', 'X="10" Y="-4"')  # an outline over the slide's edge
    (tmp_path / "edge.xml").write_text(asap(annotation("E", edge)))
    (crossing,) = read_asap_xml(tmp_path / "edge.xml")
    assert crossing.points[:, 1].min() == -4.0


# ---- GeoJSON masks ----------------------------------------------------------------------------

RING = [[0, 0], [400, 0], [400, 200], [0, 200], [0, 0]]


def feature(geometry: object) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {}}


def collection(*geometries: object) -> dict:
    return {"type": "FeatureCollection", "features": [feature(g) for g in geometries]}


def polygon(*rings: object) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("{not json", ["cannot read as GeoJSON"], id="invalid-json"),
        pytest.param('{"type": "Polygon", "coordinates": [[[0, NaN]]]}', ["NaN"], id="nan-literal"),
        pytest.param("[" * 100_000 + "]" * 100_000, ["cannot read as GeoJSON"], id="too-deep"),
        pytest.param(
            "42", ["expected a GeoJSON FeatureCollection, Feature", "int 42"], id="number"
        ),
        pytest.param(
            {"type": "Topology"}, ["expected a GeoJSON FeatureCollection", "'Topology'"], id="type"
        ),
        pytest.param({"features": []}, ["an object without 'type'"], id="no-type"),
        pytest.param(
            {"type": "FeatureCollection", "features": {"a": 1}},
            ["features: expected a list of Features"],
            id="features-not-a-list",
        ),
        pytest.param(
            {"type": "FeatureCollection", "features": [polygon(RING)]},
            ["features[0]: expected a Feature, got an object of type 'Polygon'"],
            id="bare-geometry-in-features",
        ),
        pytest.param(
            collection(polygon(RING), {"type": "Circle", "radius": 3}),
            ["features[1].geometry: expected a geometry of type Polygon", "'Circle'"],
            id="geometry-type",
        ),
        pytest.param(
            collection(polygon([["0", "0"], ["4", "0"], ["4", "4"]])),
            ["features[0].geometry.coordinates[0]: expected a ring", "str"],
            id="string-coordinates",
        ),
        pytest.param(
            collection(polygon([[True, False], [True, True], [False, True]])),
            ["coordinates[0]: expected a ring", "bool"],
            id="bool-coordinates",
        ),
        pytest.param(
            '{"type": "Polygon", "coordinates": [[[0, 0], [1e400, 0], [0, 5]]]}',
            ["coordinates[0]: expected a ring", "finite", "inf"],
            id="infinite",
        ),
        pytest.param(
            collection(polygon([[0, 0], [4e9, 0], [0, 4]])),
            ["within ±1e+09", "4000000000.0"],
            id="too-far",
        ),
        pytest.param(
            collection({"type": "Polygon", "coordinates": RING}),
            ["features[0].geometry.coordinates[0]: expected a ring", "[0, 0]"],
            id="one-level-too-shallow",
        ),
        pytest.param(
            collection({"type": "MultiPolygon", "coordinates": [RING]}),
            ["coordinates[0][0]: expected a ring"],
            id="multipolygon-too-shallow",
        ),
        pytest.param(
            collection(polygon([[0, 0], [4, 0, 1, 2, 3], [4]])),
            ["coordinates[0]: expected a ring"],
            id="ragged",
        ),
        pytest.param(
            collection(polygon()),
            ["coordinates: expected a non-empty list of rings", "an empty list"],
            id="empty-polygon",
        ),
        pytest.param(
            collection({"type": "MultiPolygon", "coordinates": []}),
            ["coordinates: expected a non-empty list of polygons"],
            id="empty-multipolygon",
        ),
        pytest.param(
            collection(polygon([[0, 0], [5, 5]])),
            ["coordinates[0]: expected a ring of at least 3", "got 2 position(s)"],
            id="two-positions",
        ),
        pytest.param(
            collection(polygon(RING, [[1, 1], [2, 2]])),
            ["coordinates[1]: expected a ring of at least 3"],
            id="degenerate-hole",
        ),
        pytest.param(
            collection({"type": "Point", "coordinates": [1, 2]}),
            ["no Polygon or MultiPolygon geometry found (only Point)"],
            id="points-only",
        ),
        pytest.param({"type": "FeatureCollection", "features": []}, ["(no geometry)"], id="empty"),
    ],
)
def test_broken_geojson_masks_name_the_file_the_place_and_what_was_expected(tmp_path, text, words):
    path = tmp_path / "mask.geojson"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    raises_one_line(InputError, lambda: load_tissue_mask(path, (800, 400)), str(path), *words)


def test_geojson_points_lines_and_null_geometries_beside_polygons_are_ignored(tmp_path):
    doc = collection(
        polygon(RING, [[100, 50], [300, 50], [300, 150], [100, 150]]),
        {"type": "Point", "coordinates": [5, 5]},
        {"type": "LineString", "coordinates": [[0, 0], [9, 9]]},
        None,
        {"type": "GeometryCollection", "geometries": [polygon([[500, 0], [600, 0], [600, 80]])]},
    )
    path = tmp_path / "mask.geojson"
    path.write_text("\ufeff" + json.dumps(doc), encoding="utf-8")  # a BOM, as Windows tools write
    mask, downsample = load_tissue_mask(path, (800, 400), downsample=10.0)
    assert mask.shape == (40, 80) and downsample == (10.0, 10.0)
    assert mask[2, 2] and not mask[10, 20] and mask[1, 58] and not mask[30, 70]
    with pytest.raises(InputError, match=r"^GeoJSON: expected a GeoJSON FeatureCollection"):
        rasterize_geojson("Polygon", (800, 400), 10.0)  # without a file: the default name


# ---- feature bags -----------------------------------------------------------------------------

N, F = 6, 4
GOOD_COORDS = np.stack([np.arange(N) * 16, np.zeros(N)], axis=1).astype(np.int64)


def features(n: int = N) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, F)).astype(np.float32)


def write_h5(path: Path, **datasets: object) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
        f.attrs["patch_size"] = 16
    return path


@pytest.mark.parametrize(
    ("datasets", "words"),
    [
        pytest.param(
            {"features": np.zeros((N, 2, F), np.float32), "coords": GOOD_COORDS},
            ["features must be (N, F), one row per patch, got shape (6, 2, 4)"],
            id="3d-features",
        ),
        pytest.param(
            {"features": np.full((N, F), b"x"), "coords": GOOD_COORDS},
            ["features must be real numbers", "got bytes"],
            id="bytes-features",
        ),
        pytest.param(
            {
                "features": np.array([["a"] * F] * N, dtype=h5py.string_dtype()),
                "coords": GOOD_COORDS,
            },
            ["features must be real numbers", "got objects"],
            id="string-features",
        ),
        pytest.param({"features": features()}, ["missing coords"], id="missing-coords"),
        pytest.param(
            {"features": np.ones((N, F), bool), "coords": GOOD_COORDS},
            ["features must be real numbers", "got booleans (bool)"],
            id="bool-features",
        ),
        pytest.param(
            {"features": np.ones((N, F), np.complex64), "coords": GOOD_COORDS},
            ["features must be real numbers", "complex"],
            id="complex-features",
        ),
        pytest.param(
            {"coords": GOOD_COORDS}, ["needs 'features' (N, F)", "missing features"], id="missing"
        ),
        pytest.param(
            {"features": np.zeros((0, F), np.float32), "coords": np.zeros((0, 2), np.int64)},
            ["features must be (N, F) with N >= 1 patches and F >= 1, got (0, 4)"],
            id="zero-patches",
        ),
        pytest.param(
            {"features": np.zeros((N, 0), np.float32), "coords": GOOD_COORDS},
            ["with N >= 1 patches and F >= 1, got (6, 0)"],
            id="zero-width",
        ),
        pytest.param(
            {"features": features(), "coords": np.zeros((N, 3), np.int64)},
            ["coords must be (N, 2) level-0 (x, y) = (6, 2)", "got (6, 3)"],
            id="coords-n-by-3",
        ),
        pytest.param(
            {"features": features(), "coords": GOOD_COORDS[:-1]},
            ["coords must be (N, 2)", "got (5, 2)"],
            id="coords-too-short",
        ),
        pytest.param(
            {"features": features(), "coords": np.full((N, 2), b"7")},
            ["coords must be real numbers (level-0 pixels), got bytes"],
            id="coords-text",
        ),
    ],
)
def test_broken_h5_bags_name_the_file_the_dataset_and_what_was_expected(tmp_path, datasets, words):
    path = write_h5(tmp_path / "bag.h5", **datasets)
    raises_one_line(InputError, lambda: open_feature_bag(path), str(path), *words)


def test_h5_bag_coords_with_nan_are_named_where_they_are_first_used(tmp_path):
    coords = GOOD_COORDS.astype(np.float64)
    coords[2, 1] = np.nan
    path = write_h5(tmp_path / "bag.h5", features=features(), coords=coords)
    bag = open_feature_bag(path)  # shapes and dtypes are fine: values are read on first use
    words = ["coords must be finite level-0 (x, y) pixels", "at row 2", "nan"]
    raises_one_line(InputError, lambda: bag.coords, str(path), *words)
    bag.close()


def test_h5_bags_whose_datasets_would_read_other_files_are_refused(tmp_path):
    other = write_h5(tmp_path / "other.h5", features=features(), coords=GOOD_COORDS)
    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f["features"] = h5py.ExternalLink(str(other), "/features")
        f["coords"] = GOOD_COORDS
    words = ["'features' must be a dataset stored in this file", "ExternalLink"]
    raises_one_line(InputError, lambda: open_feature_bag(tmp_path / "linked.h5"), *words)

    raw = tmp_path / "raw.bin"
    raw.write_bytes(features().tobytes())
    with h5py.File(tmp_path / "external.h5", "w") as f:
        f.create_dataset("features", (N, F), np.float32, external=[(str(raw), 0, N * F * 4)])
        f["coords"] = GOOD_COORDS
    words = ["'features' must be stored in this file, got external storage"]
    raises_one_line(InputError, lambda: open_feature_bag(tmp_path / "external.h5"), *words)

    with h5py.File(tmp_path / "group.h5", "w") as f:
        f.create_group("features")
        f["coords"] = GOOD_COORDS
    words = ["'features' must be a dataset, got a Group"]
    raises_one_line(InputError, lambda: open_feature_bag(tmp_path / "group.h5"), *words)


def test_bad_tile_size_attributes_are_named(tmp_path):
    path = write_h5(tmp_path / "bag.h5", features=features(), coords=GOOD_COORDS)
    for value, shown in ((b"big", "'big'"), (-16, "-16"), (np.nan, "nan")):
        with h5py.File(path, "r+") as f:
            f.attrs["patch_size"] = value
        words = ["patch_size must be a number > 0", shown]
        raises_one_line(InputError, lambda: open_feature_bag(path), str(path), *words)
    np.savez(tmp_path / "bag.npz", features=features(), coords=GOOD_COORDS, patch_size="16px")
    words = ["patch_size must be a number > 0", "'16px'"]
    raises_one_line(InputError, lambda: open_feature_bag(tmp_path / "bag.npz"), *words)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        pytest.param(
            {"features": features().astype(str), "coords": GOOD_COORDS},
            ["features must be real numbers", "got text"],
            id="text-features",
        ),
        pytest.param(
            {"features": features(), "coords": GOOD_COORDS.astype(float) + [[np.inf, 0]]},
            ["coords must be finite level-0 (x, y) pixels, got [inf, 0.0] at row 0", "6 of 6"],
            id="inf-coords",
        ),
        pytest.param({"features": features()}, ["missing coords"], id="missing-coords"),
    ],
)
def test_broken_npz_bags_name_the_file_and_dataset(tmp_path, arrays, words):
    np.savez(tmp_path / "bag.npz", **arrays)
    call = lambda: open_feature_bag(tmp_path / "bag.npz")  # noqa: E731
    assert "cannot read" not in raises_one_line(InputError, call, "bag.npz", *words)


def test_damaged_numpy_files_are_named(tmp_path):
    np.savez_compressed(tmp_path / "bag.npz", features=features(200), coords=np.zeros((200, 2)))
    data = bytearray((tmp_path / "bag.npz").read_bytes())
    data[200:400] = bytes(200)  # inside the compressed features
    (tmp_path / "bag.npz").write_bytes(bytes(data))
    raises_one_line(
        InputError, lambda: open_feature_bag(tmp_path / "bag.npz"), "bag.npz", "cannot read"
    )
    with open(tmp_path / "huge.npy", "wb") as fh:  # a header that asks for 14.6 TiB
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(64))
    raises_one_line(
        InputError, lambda: open_feature_bag(tmp_path / "huge.npy"), "huge.npy", "cannot read"
    )


def test_nan_features_are_one_line_naming_the_file_when_their_rows_are_read(tmp_path):
    rows = features()
    rows[3, 1] = np.nan
    path = write_h5(tmp_path / "nan.h5", features=rows, coords=GOOD_COORDS)
    bag = open_feature_bag(path)
    assert bag.read([0, 1, 2]).shape == (3, F)  # rows are checked as they are read
    words = ["nan.h5: features hold NaN or inf (patch 3); expected finite numbers"]
    raises_one_line(InputError, lambda: bag.read(np.arange(N)), *words)
    bag.close()


def test_a_bag_without_coords_is_named_where_2d_positions_need_them(tmp_path):
    np.save(tmp_path / "plain.npy", features())
    bag = open_feature_bag(tmp_path / "plain.npy")
    assert bag.coords is None and bag.read([0]).shape == (1, F)  # no coords: fine until needed
    words = ["plain.npy: grid positions (model.pos_enc '2d') need 'coords' (N, 2)"]
    raises_one_line(InputError, lambda: bag.positions([0]), *words)
    model = ips.create_model(
        encoder="features",
        feature_dim=F,
        embed_dim=16,
        num_heads=1,
        head_dim=8,
        mlp_dim=16,
        memory_size=2,
        chunk_size=3,
        pos_enc="2d",
        tasks={"label": {"kind": "binary"}},
    ).eval()
    raises_one_line(InputError, lambda: model([bag]), *words)
    with_coords = FeatureBag(features(), GOOD_COORDS, name="mem")
    assert with_coords.positions([2]).tolist() == [[0, 2]]


# ---- TIFF tile tables -------------------------------------------------------------------------

TILE = 64


def write_tiled(
    path: Path, *, bigtiff: bool = False, strips: bool = False, levels: int = 2
) -> Path:
    """A 256 x 384 RGB image in 4 x 6 zlib tiles of 64 (or strips of 16 rows), and a level of
    half the size."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
    options = dict(photometric="rgb", compression="zlib")
    if strips:
        options["rowsperstrip"] = 16
    else:
        options["tile"] = (TILE, TILE)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(image, subfiletype=0, **options)
        if levels > 1:
            tif.write(image[::2, ::2], subfiletype=1, **options)
    return path


def patch_table(path: Path, tag: str, index: int, value: int, page: int = 0) -> None:
    """Overwrite entry `index` of a page's TileOffsets / TileByteCounts (or Strip...) in place."""
    with tifffile.TiffFile(path) as tif:
        entry = tif.pages[page].tags[tag]
        fmt = tif.byteorder + {4: "I", 16: "Q", 3: "H"}[entry.dtype]
        at = entry.valueoffset + index * struct.calcsize(fmt)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack(fmt, value))


def test_a_tile_offset_past_the_end_is_named_with_its_row_and_column_when_opened(tmp_path):
    path = write_tiled(tmp_path / "x.tif")
    patch_table(path, "TileOffsets", 2 * 6 + 5, 123_456_789)  # row 2, col 5 of level 0
    size = os.path.getsize(path)
    message = raises_one_line(CannotReadError, lambda: TiffSource(path, patch_size=TILE))
    counts = tifffile.TiffFile(path).pages[0].databytecounts
    assert message == (
        f"{path}: level 0 tile (row 2, col 5) at byte offset 123456789 ({counts[17]} bytes) runs "
        f"past the end of the file ({size} bytes); the file is truncated or corrupt"
    )


def test_a_byte_count_past_the_end_and_offsets_beyond_64_bits_signed_are_named(tmp_path):
    path = write_tiled(tmp_path / "count.tif")
    patch_table(path, "TileByteCounts", 4, 2**31, page=1)  # level 1: 2 x 3 tiles
    words = ["count.tif: level 1 tile (row 1, col 1) at byte offset", f"({2**31} bytes) runs past"]
    raises_one_line(CannotReadError, lambda: TiffSource(path, patch_size=TILE), *words)
    path = write_tiled(tmp_path / "big.tif", bigtiff=True)
    patch_table(path, "TileOffsets", 0, 2**64 - 1)
    words = [f"level 0 tile (row 0, col 0) at byte offset {2**64 - 1}", "truncated or corrupt"]
    raises_one_line(CannotReadError, lambda: TiffSource(path, patch_size=TILE), *words)


def test_a_truncated_file_names_its_first_missing_tile_and_how_many_more(tmp_path):
    path = write_tiled(tmp_path / "cut.tif", levels=1)
    with tifffile.TiffFile(path) as tif:
        offsets = tif.pages[0].dataoffsets
    assert max(offsets) == offsets[23]  # tiles are written in order, the last one last
    os.truncate(path, offsets[20] + 10)  # tile 20 (row 3, col 2) and the 3 after it are cut
    words = ["cut.tif: level 0 tile (row 3, col 2)", "; so do 3 more of level 0;", "truncated"]
    raises_one_line(CannotReadError, lambda: TiffSource(path, patch_size=TILE), *words)


def test_strips_past_the_end_are_named_as_strips(tmp_path):
    path = write_tiled(tmp_path / "strips.tif", strips=True)
    patch_table(path, "StripOffsets", 7, 10**9)
    words = ["strips.tif: level 0 strip 7 at byte offset 1000000000", "runs past the end"]
    raises_one_line(CannotReadError, lambda: TiffSource(path, patch_size=TILE), *words)


def test_a_file_that_shrinks_after_opening_names_the_tile_a_read_cannot_get(tmp_path):
    path = write_tiled(tmp_path / "shrinks.tif")
    source = TiffSource(path, patch_size=TILE, cache_mb=1)
    assert source.read([0]).shape == (1, 3, TILE, TILE)  # opens the file and holds it open
    with tifffile.TiffFile(path) as tif:
        offsets = tif.pages[0].dataoffsets
    os.truncate(path, offsets[23] + 5)  # the last tile of level 0: row 3, col 5
    last = len(source) - 1
    words = ["shrinks.tif: level 0 tile (row 3, col 5) at byte offset", "runs past the end"]
    message = raises_one_line(CannotReadError, lambda: source.read([last]), *words)
    assert isinstance(CannotReadError(message), READ_ERRORS)  # data.on_error: skip catches it
    source.close()
    # reopened (as a DataLoader worker would), the file fails at once, naming the tile
    raises_one_line(CannotReadError, lambda: source.read([0]), "shrinks.tif: level 0 tile (row 3")


# ---- the command line -------------------------------------------------------------------------


def _tiny_model(**overrides: object) -> ips.IPSModel:
    settings = dict(embed_dim=16, num_heads=1, head_dim=8, mlp_dim=16, memory_size=2)
    return ips.create_model(**{**settings, "tasks": {"label": {"kind": "binary"}}, **overrides})


def _predict(checkpoint: Path, inputs: Path, out: Path, *options: str) -> list[str]:
    args = ["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out)]
    return [*args, "--fail-fast", "--no-pictures", "--no-progress", "-q", *options]


def test_the_command_line_answers_hostile_files_with_one_line_and_exit_2(tmp_path, capsys):
    bags = _tiny_model(encoder="features", feature_dim=F, chunk_size=3)
    bags_checkpoint = ips.save_checkpoint(tmp_path / "bags.pt", bags, bags.config)
    pixels = _tiny_model(in_channels=3, patch_size=32, chunk_size=4)
    pixels_checkpoint = ips.save_checkpoint(tmp_path / "pixels.pt", pixels, pixels.config)
    nan = features()
    nan[4, 0] = np.nan
    flat = write_h5(tmp_path / "flat.h5", features=np.zeros((N, 2, F)), coords=GOOD_COORDS)
    nan_bag = write_h5(tmp_path / "nan.h5", features=nan, coords=GOOD_COORDS)
    slide = write_tiled(tmp_path / "slide.tif")
    broken = write_tiled(tmp_path / "offsets.tif", strips=True)  # OpenSlide declines strips
    patch_table(broken, "StripOffsets", 7, 10**9)
    mask = tmp_path / "mask.geojson"
    mask.write_text(json.dumps(collection(polygon([[0, 0], ["a", 1], [2, 2]]))))
    cases = [
        (bags_checkpoint, flat, (), "flat.h5: features must be (N, F)"),
        (bags_checkpoint, nan_bag, (), "nan.h5: features hold NaN or inf"),
        (pixels_checkpoint, broken, ("--tissue", "none"), "offsets.tif: level 0 strip 7"),
        (pixels_checkpoint, slide, ("--tissue", str(mask)), "mask.geojson: features[0]"),
    ]
    for checkpoint, inputs, options, words in cases:
        assert main(_predict(checkpoint, inputs, tmp_path / inputs.stem, *options)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ips: error: "), lines
        assert words in lines[0], lines[0]
