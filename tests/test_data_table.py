"""Own images and slides: labels tables and image folders, their labels, files, splits, masks
and grids."""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ips.config import Config, DataConfig, GridConfig, ModelConfig, TaskSpec, load_config
from ips.data.registry import build_dataset, build_validation, resolve_config
from ips.data.table import ImageDataset, encode_labels, read_table, resolve_tasks
from ips.heads import compute_loss
from ips.metrics import MetricTracker
from ips.sources import tissue
from ips.sources.grid_cache import GridCache

SIDE, PATCH = 32, 8  # images of 32 x 32 pixels: 16 patches of 8


def write_image(path: Path, *, spot: bool, seed: int = 0, side: int = SIDE) -> Path:
    """A grey RGB image; with ``spot`` one red 8 x 8 patch at a seeded place."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), 128, dtype=np.uint8)
    if spot:
        y, x = rng.integers(0, side // PATCH, 2) * PATCH
        image[y : y + PATCH, x : x + PATCH] = (220, 30, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_table(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def table_config(table: Path, tasks: dict, *sets: str) -> Config:
    overrides = [
        "data.dataset=table",
        f"data.path={table}",
        "model.encoder=small_cnn",
        "model.in_channels=3",
        f"model.patch_size={PATCH}",
        f"model.tasks={json.dumps(tasks)}",
        *sets,
    ]
    return load_config(None, overrides)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A table of 8 PNGs: grade as names, spot as 0/1, split train/val/test."""
    rows = []
    for i in range(8):
        name = f"img/{i}.png"
        write_image(tmp_path / name, spot=i % 2 == 1, seed=i)
        grade = ["low", "high", "mid"][i % 3]
        split = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
        rows.append([name, grade, i % 2, split[i]])
    return write_table(tmp_path / "labels.csv", ["path", "grade", "spot", "split"], rows)


TASKS = {"grade": {"kind": "multiclass", "num_classes": None}, "spot": {"kind": "binary"}}


# ---- labels -----------------------------------------------------------------------------------


def test_class_names_map_to_sorted_indices_and_the_config_keeps_them(photos):
    config = resolve_config(table_config(photos, TASKS))
    grade = config.model.tasks[0]
    assert grade.classes == ("high", "low", "mid") and grade.num_classes == 3
    rows = read_table(photos, ["grade", "spot"])
    targets = [encode_labels(row, config.model.tasks) for row in rows]
    assert [int(t["grade"]) for t in targets] == [1, 0, 2, 1, 0, 2, 1, 0]
    assert [float(t["spot"]) for t in targets] == [0, 1, 0, 1, 0, 1, 0, 1]


def test_listed_classes_keep_their_order_and_unknown_names_name_the_line(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    table = write_table(
        tmp_path / "t.csv", ["path", "grade"], [["a.png", "mid"], ["a.png", "severe"]]
    )
    task = TaskSpec("grade", "multiclass", None, ("low", "mid", "high"))
    rows = read_table(table, ["grade"])
    assert encode_labels(rows[0], (task,))["grade"].item() == 1
    with pytest.raises(ValueError, match=r"t\.csv:3: task grade: unknown class 'severe'"):
        resolve_tasks(rows, (task,), str(table))


def test_integer_labels_accept_pandas_floats_and_out_of_range_names_the_line(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    table = write_table(
        tmp_path / "t.csv", ["path", "grade"], [["a.png", "2.0"], ["a.png", "0"], ["a.png", "5"]]
    )
    rows = read_table(table, ["grade"])
    (inferred,) = resolve_tasks(rows[:2], (TaskSpec("grade", "multiclass", None),), "t")
    assert inferred.num_classes == 3 and inferred.classes is None
    with pytest.raises(ValueError, match=r"t\.csv:4: task grade: label 5 is out of range"):
        resolve_tasks(rows, (TaskSpec("grade", "multiclass", 3),), "t")


def test_a_class_name_in_a_column_of_integers_is_an_error_naming_its_line(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    table = write_table(
        tmp_path / "t.csv", ["path", "grade"], [["a.png", "0"], ["a.png", "1"], ["a.png", "high"]]
    )
    rows = read_table(table, ["grade"])
    with pytest.raises(ValueError, match=r"t\.csv:4: task grade: 'high' is not an integer"):
        resolve_tasks(rows, (TaskSpec("grade", "multiclass", None),), "t")


def test_binary_labels_read_true_false_and_refuse_other_words(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    cells = ["true", "FALSE", "1", "0.0", "yes", "maybe"]
    table = write_table(tmp_path / "t.csv", ["path", "spot"], [["a.png", c] for c in cells])
    rows = read_table(table, ["spot"])
    task = TaskSpec("spot", "binary")
    assert [encode_labels(r, (task,))["spot"].item() for r in rows[:5]] == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"t\.csv:7: task spot: 'maybe' is not a binary label"):
        resolve_tasks(rows, (task,), "t")


def test_multilabel_cells_split_on_semicolons_with_a_dash_for_none(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    cells = ["cat;dog", "-", "", "dog"]
    table = write_table(tmp_path / "t.csv", ["path", "pets"], [["a.png", c] for c in cells])
    rows = read_table(table, ["pets"])
    (task,) = resolve_tasks(rows, (TaskSpec("pets", "multilabel", None),), "t")
    assert task.classes == ("cat", "dog")
    targets = [encode_labels(r, (task,))["pets"].tolist() for r in rows]
    assert targets[0] == [1.0, 1.0] and targets[1] == [0.0, 0.0] and targets[3] == [0.0, 1.0]
    assert all(math.isnan(v) for v in targets[2])


def test_unknown_labels_add_no_loss_and_no_metric():
    tasks = (TaskSpec("grade", "multiclass", 3), TaskSpec("spot", "binary"))
    logits = {"grade": torch.randn(4, 3, requires_grad=True), "spot": torch.randn(4)}
    targets = {"grade": torch.tensor([2, -1, 0, -1]), "spot": torch.tensor([1.0, 0, math.nan, 1])}
    _, per_task = compute_loss(logits, targets, tasks)
    known = [0, 2]
    expected = torch.nn.functional.cross_entropy(logits["grade"][known], targets["grade"][known])
    assert torch.allclose(per_task["grade"], expected)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits["spot"][[0, 1, 3]], targets["spot"][[0, 1, 3]]
    )
    assert torch.allclose(per_task["spot"], expected)
    tracker = MetricTracker(tasks)
    tracker.update(
        {"grade": torch.tensor([[0.0, 0, 9], [9, 0, 0], [0, 9, 0], [9, 0, 0]])}
        | {"spot": torch.tensor([5.0, -5, 5, 5])},
        targets,
        1.0,
    )
    metrics = tracker.compute()
    assert metrics["grade/accuracy"] == 0.5  # 2 known: one right, one wrong
    assert metrics["spot/accuracy"] == 1.0 and metrics["spot/auc"] == 1.0  # NaN row left out


def test_a_task_without_any_known_label_in_a_batch_gives_zero_loss_with_a_gradient():
    task = TaskSpec("grade", "multiclass", 3)
    logits = torch.randn(2, 3, requires_grad=True)
    loss, _ = compute_loss({"grade": logits}, {"grade": torch.tensor([-1, -1])}, (task,))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


# ---- files, splits, masks -------------------------------------------------------------------


def test_every_missing_file_is_listed_at_once_before_training(photos):
    for i in (0, 5, 7):
        (photos.parent / f"img/{i}.png").unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(table_config(photos, TASKS), "train")
    message = str(err.value)
    assert "3 file(s) not found" in message
    assert all(f"labels.csv:{i + 2}: image" in message for i in (0, 5, 7))


def test_missing_files_are_left_out_with_on_error_skip(photos, caplog):
    (photos.parent / "img/1.png").unlink()
    train = build_dataset(table_config(photos, TASKS, "data.on_error=skip"), "train")
    assert len(train) == 3 and "labels.csv:3: image" in caplog.text


def test_table_missing_a_path_or_task_column_is_named(tmp_path):
    table = write_table(tmp_path / "t.csv", ["file", "grade"], [["a.png", "1"]])
    with pytest.raises(ValueError, match=r"t\.csv: a table needs a 'path' column"):
        build_dataset(table_config(table, TASKS), "train")
    table = write_table(tmp_path / "u.tsv", ["path", "grade"], [["a.png", "1"]], sep="\t")
    with pytest.raises(ValueError, match=r"u\.tsv: no column for task\(s\) spot"):
        build_dataset(table_config(table, TASKS), "train")


def test_the_split_column_decides_train_val_and_test(photos):
    config = table_config(photos, TASKS)
    sizes = [len(build_dataset(config, split)) for split in ("train", "val", "test")]
    assert sizes == [4, 2, 2]


def test_without_val_rows_validation_is_carved_from_training_and_test_is_missing(tmp_path):
    rows = []
    for i in range(10):
        write_image(tmp_path / f"{i}.png", spot=i % 2 == 0, seed=i)
        rows.append([f"{i}.png", i % 2])
    table = write_table(tmp_path / "t.csv", ["path", "spot"], rows)
    config = table_config(table, {"spot": {"kind": "binary"}}, "data.val_fraction=0.2")
    train, val = build_dataset(config, "train"), build_validation(config)
    assert (len(train), len(val)) == (8, 2)
    assert {r.path for r in train.rows}.isdisjoint(r.path for r in val.rows)
    none = table_config(table, {"spot": {"kind": "binary"}}, "data.val_fraction=0")
    assert build_validation(none) is None
    with pytest.raises(ValueError, match="there is no test split"):
        build_dataset(config, "test")


def test_a_mask_column_keeps_only_the_masked_patches_of_its_row(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:PATCH, :] = 255  # the top row of patches
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    geojson = {"type": "Polygon", "coordinates": [[[0, 24], [8, 24], [8, 32], [0, 32], [0, 24]]]}
    (tmp_path / "b.geojson").write_text(json.dumps(geojson))
    table = write_table(
        tmp_path / "t.csv",
        ["path", "spot", "mask"],
        [["a.png", 0, "a_mask.png"], ["a.png", 1, "b.geojson"], ["a.png", 1, ""]],
    )
    config = table_config(
        table, {"spot": {"kind": "binary"}}, "data.val_fraction=0", "data.grid.min_tissue=0.5"
    )
    dataset = build_dataset(config, "train")
    sources = [dataset[i]["patches"] for i in range(3)]
    assert sources[0].coords[:, 1].tolist() == [0, 0, 0, 0]  # y of the top row
    assert sources[1].coords.tolist() == [[0, 24]]
    assert len(sources[2]) == 16  # no mask, tissue none: every patch


def test_a_mask_of_the_wrong_kind_names_the_row(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    (tmp_path / "notes.txt").write_text("not a mask")
    table = write_table(tmp_path / "t.csv", ["path", "spot", "mask"], [["a.png", 0, "notes.txt"]])
    config = table_config(table, {"spot": {"kind": "binary"}}, "data.val_fraction=0")
    dataset = build_dataset(config, "train")
    with pytest.raises(ValueError, match=r"t\.csv:2: .*notes\.txt: cannot read as a mask"):
        dataset[0]


def test_grid_tissue_mask_needs_a_mask_for_every_row(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    table = write_table(tmp_path / "t.csv", ["path", "spot"], [["a.png", 0]])
    config = table_config(
        table, {"spot": {"kind": "binary"}}, "data.val_fraction=0", "data.grid.tissue=mask"
    )
    with pytest.raises(ValueError, match=r"t\.csv:2: .*data\.grid\.tissue is 'mask'"):
        build_dataset(config, "train")[0]


def test_an_image_smaller_than_a_patch_or_of_other_channels_names_its_row(tmp_path):
    write_image(tmp_path / "small.png", spot=False, side=4)
    Image.fromarray(np.zeros((SIDE, SIDE), dtype=np.uint8)).save(tmp_path / "grey.png")
    table = write_table(tmp_path / "t.csv", ["path", "spot"], [["small.png", 0], ["grey.png", 1]])
    dataset = build_dataset(
        table_config(table, {"spot": {"kind": "binary"}}, "data.val_fraction=0"), "train"
    )
    with pytest.raises(ValueError, match=r"t\.csv:2: .*smaller than patch_size"):
        dataset[0]
    with pytest.raises(ValueError, match=r"t\.csv:3: grey\.png has 1 channel"):
        dataset[1]


# ---- grids ------------------------------------------------------------------------------------


def _count_otsu(monkeypatch) -> list[int]:
    calls = [0]
    original = tissue.otsu_threshold_mask

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr("ips.sources.base.otsu_threshold_mask", counting)
    return calls


def test_tissue_detection_runs_once_per_file_and_grid_across_processes(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    image = np.full((SIDE, SIDE, 3), 255, dtype=np.uint8)
    image[8:24, 8:24] = (200, 60, 160)  # tissue in the middle
    Image.fromarray(image).save(path)
    calls = _count_otsu(monkeypatch)
    rows = read_table(write_table(tmp_path / "t.csv", ["path", "spot"], [["a.png", 1]]), ["spot"])
    cache = GridCache(tmp_path / "cache")
    tasks = (TaskSpec("spot", "binary"),)
    dataset = ImageDataset(
        rows, tasks, patch_size=PATCH, grid=GridConfig(tissue="otsu"), grid_cache=cache
    )
    first = dataset[0]["patches"]
    assert len(first) == 4 and calls[0] == 1
    assert len(dataset[0]["patches"]) == 4 and calls[0] == 1  # from memory
    in_worker = pickle.loads(pickle.dumps(dataset))  # a worker: empty memory, the same folder
    assert in_worker[0]["patches"].coords.tolist() == first.coords.tolist() and calls[0] == 1
    other = ImageDataset(
        rows,
        tasks,
        patch_size=PATCH,
        grid=GridConfig(tissue="otsu", min_tissue=0.9),
        grid_cache=cache,
    )
    assert len(other[0]["patches"]) == 4 and calls[0] == 2  # another grid: computed
    image[8:24, 8:16] = 255  # the file changes: computed again
    Image.fromarray(image).save(path)
    assert len(dataset[0]["patches"]) == 2 and calls[0] == 3


def test_a_file_without_tissue_fails_from_the_cache_too(tmp_path, monkeypatch):
    Image.fromarray(np.full((SIDE, SIDE, 3), 255, dtype=np.uint8)).save(tmp_path / "glass.png")
    rows = read_table(
        write_table(tmp_path / "t.csv", ["path", "spot"], [["glass.png", 0]]), ["spot"]
    )
    calls = _count_otsu(monkeypatch)
    dataset = ImageDataset(
        rows,
        (TaskSpec("spot", "binary"),),
        patch_size=PATCH,
        grid=GridConfig(tissue="otsu"),
        grid_cache=GridCache(tmp_path / "cache"),
    )
    for _ in range(2):
        with pytest.raises(tissue.EmptyTissueError, match=r"t\.csv:2: .*no patch has a tissue"):
            dataset[0]
    assert calls[0] == 1


# ---- image folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_an_image_folder_gives_one_task_whose_classes_are_the_folder_names(tmp_path, layout):
    for split in ("train", "test"):
        base = tmp_path / split if layout == "splits" else tmp_path
        for name in ("zebra", "apple", "mango"):
            for i in range(2):
                write_image(base / name / f"{split}{i}.png", spot=name == "zebra", seed=i)
    config = load_config(
        None,
        [
            "data.dataset=image_folder",
            f"data.path={tmp_path}",
            "data.val_fraction=0.25",
            "model.in_channels=3",
            f"model.patch_size={PATCH}",
        ],
    )
    resolved = resolve_config(config)
    (task,) = resolved.model.tasks
    classes = ("apple", "mango", "zebra")  # sorted; the default task takes their number
    assert (task.name, task.classes, task.num_classes) == ("label", classes, 3)
    train, val = build_dataset(config, "train"), build_validation(config)
    labels = {
        row.path.parent.name: int(part.targets(i)["label"])
        for part in (train, val)
        for i, row in enumerate(part.rows)
    }
    assert labels == {"apple": 0, "mango": 1, "zebra": 2}
    if layout == "splits":
        test = build_dataset(config, "test")
        assert len(test) == 6 and all(r.path.parent.parent.name == "test" for r in test.rows)
    else:
        assert len(train) + len(val) == 12


def test_an_image_folder_refuses_a_second_task(tmp_path):
    write_image(tmp_path / "a" / "x.png", spot=False)
    config = Config(
        model=ModelConfig(
            in_channels=3,
            patch_size=PATCH,
            tasks=(TaskSpec("a", "multiclass", 2), TaskSpec("b", "binary")),
        ),
        data=DataConfig(dataset="image_folder", path=str(tmp_path)),
    )
    with pytest.raises(ValueError, match="an image folder has one multiclass task"):
        resolve_config(config)


def test_loader_workers_hand_over_sources_that_read_the_same_patches(photos):
    from torch.utils.data import DataLoader

    from ips.data.collate import collate_patches

    dataset = build_dataset(table_config(photos, TASKS), "train")
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_patches)
    for batch in loader:
        for source, i in zip(batch["patches"], batch["index"].tolist(), strict=True):
            ids = np.arange(len(source))
            np.testing.assert_array_equal(source.read(ids), dataset.open(i).read(ids))
        assert batch["targets"]["grade"].dtype == torch.long


def test_tables_as_spreadsheets_and_pandas_write_them_are_read(tmp_path):
    write_image(tmp_path / "a.png", spot=False)
    text = "\ufeffPath ,grade,Split\r\na.png, 1 ,TEST\r\na.png,NaN,train\r\na.png,2.0,\r\n"
    (tmp_path / "t.csv").write_text(text, encoding="utf-8")
    rows = read_table(tmp_path / "t.csv", ["grade"])
    assert [r.split for r in rows] == ["test", "train", "train"]
    assert [r.labels["grade"] for r in rows] == ["1", "", "2.0"]  # NaN is unknown


def test_a_repeated_column_and_a_folder_in_place_of_a_table_are_named(tmp_path):
    table = write_table(tmp_path / "t.csv", ["path", "grade", "grade"], [["a.png", 1, 2]])
    with pytest.raises(ValueError, match=r"t\.csv: the header names grade more than once"):
        read_table(table, ["grade"])
    with pytest.raises(ValueError, match="a folder; a table is a .csv or .tsv file"):
        read_table(tmp_path, ["grade"])
