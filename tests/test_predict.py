"""Inference: predictions, score maps of every patch, pictures, GeoJSON, failures, feature bags."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ips
from ips.config import GridConfig
from ips.predict import run_predict
from ips.viz import score_grid

SIDE, PATCH = 160, 20  # a 160 x 160 grey image cut into 8 x 8 patches of 20 x 20
OBJECT = (100, 40)  # (x, y) of the one bright 20 x 20 square: patch row 2, col 5
OBJECT_ID = 2 * (SIDE // PATCH) + 5


class Brightness(nn.Module):
    """(n, 1, P, P) -> (n, D): the mean brightness of a patch times a vector of ones."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("direction", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * self.direction


def brightness_model(**selection) -> ips.IPSModel:
    """A one-head model whose selection score grows with the brightness of a patch."""
    model = ips.create_model(
        embed_dim=16,
        num_heads=1,
        head_dim=8,
        mlp_dim=32,
        dropout=0.0,
        in_channels=1,
        patch_size=PATCH,
        memory_size=selection.get("memory_size", 4),
        chunk_size=selection.get("chunk_size", 8),
        distinct=selection.get("distinct", False),  # the M kept include copies of black
        tasks={"label": {"kind": "multiclass", "num_classes": 3}},
    )
    model.encoder = Brightness(16)
    attn = model.pool.attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.q_proj.bias.fill_(4.0)  # every query is 4 * ones
        attn.k_proj.weight.fill_(1.0 / 16)  # key = brightness * ones: logit ~ 11 * brightness
    return model


def object_image(scale: int = 1) -> np.ndarray:
    """(SIDE * scale, SIDE * scale) uint8: black with one bright square of PATCH * scale."""
    image = np.zeros((SIDE * scale, SIDE * scale), dtype=np.uint8)
    x, y = OBJECT[0] * scale, OBJECT[1] * scale
    image[y : y + PATCH * scale, x : x + PATCH * scale] = 255
    return image


def save_png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


@pytest.mark.parametrize("scale", [1, 2])
def test_top_patch_heatmap_maximum_and_geojson_sit_on_the_bright_object(tmp_path, scale):
    image = object_image(scale)
    path = save_png(image, tmp_path / "object.png")
    options = {"grid": GridConfig(target_mpp=float(scale), mpp=1.0)} if scale > 1 else {}
    (pred,) = ips.predict(brightness_model(), [path], out_dir=tmp_path / "out", **options)
    assert pred.ok, pred.error
    side = PATCH * scale  # patch side in level-0 pixels
    x0, y0 = OBJECT[0] * scale, OBJECT[1] * scale
    assert pred.patch_size == side and pred.image_size == (SIDE * scale, SIDE * scale)
    assert pred.selected_ids[0] == OBJECT_ID
    assert pred.selected_coords[0].tolist() == [x0, y0]
    assert pred.selected_scores[0] == pred.selected_scores.max()
    # the score map covers every patch, and its maximum lies on the object
    assert pred.all_scores.shape == ((SIDE // PATCH) ** 2,) and np.isfinite(pred.all_scores).all()
    np.testing.assert_allclose(pred.all_scores[pred.selected_ids], pred.selected_scores)
    grid = score_grid(pred.all_coords, pred.all_scores, side, pred.image_size, image.shape)
    row, col = np.unravel_index(np.nanargmax(grid), grid.shape)
    assert x0 <= col < x0 + side and y0 <= row < y0 + side
    # GeoJSON polygons are the selected patches' level-0 pixel rectangles, best first
    geo = json.loads((tmp_path / "out" / "object" / "selected.geojson").read_text())
    rings = [f["geometry"]["coordinates"][0] for f in geo["features"]]
    assert len(rings) == len(pred.selected_ids) == 4
    for ring, (x, y) in zip(rings, pred.selected_coords, strict=True):
        assert ring == [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    boxes = [np.asarray(r, dtype=float).astype(int) for r in rings]  # (5, 2) x, y
    crops = [image[b[0, 1] : b[2, 1], b[0, 0] : b[2, 0]] for b in boxes]
    assert crops[0].shape == (side, side) and (crops[0] == 255).all()
    assert all((crop == 0).all() for crop in crops[1:])


def test_pictures_decode_and_are_at_least_as_large_as_expected(tmp_path):
    path = save_png(object_image(), tmp_path / "object.png")
    (pred,) = ips.predict(brightness_model(), path, out_dir=tmp_path, gallery_k=3)
    folder = tmp_path / "object"
    assert set(pred.outputs) == {"heatmap", "selected", "gallery", "geojson", "scores"}
    assert all(Path(p).parent == folder for p in pred.outputs.values())
    minimum = {"heatmap.png": (640, 640), "selected.png": (640, 640), "gallery.png": (300, 100)}
    for name, (width, height) in minimum.items():
        with Image.open(folder / name) as picture:
            picture.load()
            assert picture.width >= width and picture.height >= height, name
    with np.load(folder / "scores.npz") as saved:
        np.testing.assert_array_equal(saved["scores"], pred.all_scores)
        np.testing.assert_array_equal(saved["selected_ids"], pred.selected_ids)


def test_arrays_and_batches_give_the_same_predictions_as_files_one_at_a_time(tmp_path):
    image = object_image()
    wide = np.zeros((SIDE, 2 * SIDE), dtype=np.uint8)
    wide[OBJECT[1] : OBJECT[1] + PATCH, OBJECT[0] : OBJECT[0] + PATCH] = 255
    inputs = [save_png(image, tmp_path / "a.png"), torch.from_numpy(wide), image]
    model = brightness_model()
    alone = ips.predict(model, inputs, batch_size=1)
    together = ips.predict(model, inputs, batch_size=3)
    assert [p.name for p in alone] == ["a", "array_1", "array_2"]
    for one, other in zip(alone, together, strict=True):
        assert one.ok and other.ok
        assert one.selected_coords[0].tolist() == list(OBJECT)
        assert other.selected_coords[0].tolist() == list(OBJECT)
        np.testing.assert_allclose(
            one.probabilities["label"], other.probabilities["label"], rtol=1e-5
        )
    assert len(alone[1].all_scores) == 2 * len(alone[0].all_scores)


def test_a_corrupt_file_is_reported_and_the_others_finish(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    save_png(object_image(), folder / "a.png")
    (folder / "b.png").write_bytes(np.random.default_rng(0).bytes(500))
    save_png(object_image(), folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    model = brightness_model()
    out = tmp_path / "out"
    results = ips.predict(model, [folder], out_dir=out, heatmaps=False)
    assert [p.name for p in results] == ["a", "b", "c"]
    assert [p.ok for p in results] == [True, False, True]
    assert "b.png" in results[1].error and "\n" not in results[1].error
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["error"] == rows[2]["error"] == ""
    assert "b.png" in rows[1]["error"] and rows[1]["label"] == ""
    records = [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        for line in (out / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["error"] is None for r in records] == [True, False, True]
    # the table gives the most likely class and its probability, the softmax of the logits
    softmax = torch.tensor(records[0]["logits"]["label"], dtype=torch.float64).softmax(0)
    assert rows[0]["label"] == str(int(softmax.argmax()))
    assert float(rows[0]["label_prob"]) == pytest.approx(float(softmax.max()), rel=1e-5)
    assert records[0]["probabilities"]["label"] == pytest.approx(softmax.tolist(), rel=1e-6)
    assert records[0]["selected"][0] == {
        "rank": 1,
        "id": OBJECT_ID,
        "x": OBJECT[0],
        "y": OBJECT[1],
        "score": pytest.approx(float(results[0].selected_scores[0]), rel=1e-6),
    }
    assert (out / "a" / "selected.geojson").is_file() and not (out / "b").exists()
    with pytest.raises(ValueError, match=r"b\.png"):
        ips.predict(model, [folder], on_error="fail")


def test_a_wrong_channel_count_is_a_one_line_error_naming_the_file(tmp_path):
    rgb = np.repeat(object_image()[..., None], 3, axis=2)
    path = save_png(rgb, tmp_path / "colour.png")
    with pytest.raises(ValueError) as caught:
        ips.predict(brightness_model(), [path], on_error="fail")
    message = str(caught.value)
    assert "\n" not in message
    assert "colour.png" in message and "3 channel" in message and "expects 1" in message
    (pred,) = ips.predict(brightness_model(), [path])
    assert not pred.ok and "colour.png" in pred.error and "expects 1" in pred.error


def feature_model() -> ips.IPSModel:
    return ips.create_model(
        encoder="features",
        feature_dim=8,
        embed_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        dropout=0.0,
        memory_size=4,
        chunk_size=4,
        tasks={"tumour": {"kind": "binary"}, "labels": {"kind": "multilabel", "num_classes": 3}},
    )


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".npy"])
def test_a_feature_bag_is_predicted_by_a_features_model(tmp_path, suffix):
    rng = np.random.default_rng(0)
    rows, cols, step = 5, 6, 256
    coords = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2) * step
    features = rng.normal(size=(rows * cols, 8)).astype(np.float32)
    path = tmp_path / f"bag{suffix}"
    if suffix == ".npz":
        np.savez(path, features=features, coords=coords)
    elif suffix == ".npy":
        np.save(path, features)
    else:
        h5py = pytest.importorskip("h5py")
        with h5py.File(path, "w") as f:
            f["features"] = features
            f["coords"] = coords
            f["coords"].attrs["patch_size"] = step
    (pred,) = ips.predict(feature_model(), [tmp_path], out_dir=tmp_path / "out")
    assert pred.ok, pred.error
    assert pred.all_scores.shape == (rows * cols,) and np.isfinite(pred.all_scores).all()
    assert len(pred.selected_ids) == 4 and len(set(pred.selected_ids.tolist())) == 4
    assert len(pred.probabilities["tumour"]) == 1 and len(pred.predicted["labels"]) == 3
    written = set(pred.outputs)
    if suffix == ".npy":  # no coords: nothing to draw or place
        assert written == {"scores"} and (pred.selected_coords == -1).all()
        return
    np.testing.assert_array_equal(pred.selected_coords, coords[pred.selected_ids])
    assert pred.patch_size == step and pred.image_size == (cols * step, rows * step)
    assert written == {"heatmap", "geojson", "scores"}  # no pixels: no overlay, no gallery
    with Image.open(pred.outputs["heatmap"]) as picture:
        assert picture.width >= 512
    geo = json.loads(Path(pred.outputs["geojson"]).read_text())
    assert geo["features"][0]["geometry"]["coordinates"][0][0] == pred.selected_coords[0].tolist()


def test_a_pixel_model_refuses_a_feature_bag_and_a_features_model_an_image(tmp_path):
    bag = tmp_path / "bag.npz"
    np.savez(bag, features=np.zeros((3, 8), np.float32), coords=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="bag.npz: a feature bag, but the model reads pixels"):
        ips.predict(brightness_model(), [bag], on_error="fail")
    image = save_png(object_image(), tmp_path / "object.png")
    with pytest.raises(ValueError, match="object.png: the model reads precomputed features"):
        ips.predict(feature_model(), [image], on_error="fail")


def test_a_checkpoint_path_predicts_like_the_model_object(tmp_path):
    model = ips.create_model(
        embed_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        dropout=0.0,
        in_channels=1,
        patch_size=16,
        memory_size=4,
        chunk_size=4,
        tasks={"digit": {"kind": "multiclass", "num_classes": 3}},
    )
    checkpoint = ips.save_checkpoint(tmp_path / "model.pt", model, model.config)
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    image = save_png(noise, tmp_path / "noise.png")
    (from_path,) = ips.predict(checkpoint, [image])
    (from_model,) = ips.predict(model, [image])
    assert from_path.ok and from_model.ok
    np.testing.assert_array_equal(from_path.selected_ids, from_model.selected_ids)
    np.testing.assert_allclose(from_path.all_scores, from_model.all_scores, rtol=1e-5)
    np.testing.assert_allclose(
        from_path.probabilities["digit"], from_model.probabilities["digit"], rtol=1e-5
    )
    # the command: a summary of what worked and what did not
    summary = run_predict(checkpoint, [image, tmp_path / "missing.png"], tmp_path / "out")
    assert summary["inputs"] == 2 and summary["succeeded"] == 1
    assert summary["failed"][0]["name"] == "missing"
    assert "missing.png" in summary["failed"][0]["error"]
    assert Path(summary["predictions_csv"]).is_file()
    # selection overrides apply to this call only
    (smaller,) = ips.predict(model, [image], memory_size=2)
    assert len(smaller.selected_ids) == 2 and model.selection_config.memory_size == 4


def test_the_score_map_orders_all_patches_as_one_global_pass_would():
    # every patch a different grey level: with one head and one query the score grows with it
    levels = np.random.default_rng(0).permutation(64) * 3 + 20  # (64,) distinct, raster order
    image = np.kron(levels.reshape(8, 8), np.ones((PATCH, PATCH))).astype(np.uint8)
    (pred,) = ips.predict(brightness_model(memory_size=4, chunk_size=8), [image])
    np.testing.assert_array_equal(np.argsort(pred.all_scores), np.argsort(levels))
    np.testing.assert_array_equal(pred.selected_ids, np.argsort(-levels)[:4])
    np.testing.assert_allclose(pred.all_scores[pred.selected_ids], pred.selected_scores, rtol=1e-5)
