from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ips
from conftest import CMU_SVS, MNIST_TINY, TINY_MNIST_SETS, megapixel_mnist_test_metrics
from ips.cli import main
from ips.precision import resolve_amp


def _mnist() -> str:
    return str(MNIST_TINY)


def test_make_mnist_writes_a_compact_dataset(tmp_path):
    out = tmp_path / "mm.npz"
    code = main(
        [
            "make-mnist",
            "--out",
            str(out),
            "--mnist",
            _mnist(),
            "--train",
            "10",
            "--test",
            "5",
            "--canvas",
            "200",
            "--noise",
            "3",
            "-q",
        ]
    )
    assert code == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["canvas_size"].tolist() == [200, 200]
        assert f["train_digit_ids"].shape == (10, 5)


def test_train_then_eval_prints_json_metrics(tmp_path, capsys):
    data = tmp_path / "mm.npz"
    main(
        [
            "make-mnist",
            "--out",
            str(data),
            "--mnist",
            _mnist(),
            "--train",
            "16",
            "--test",
            "8",
            "--canvas",
            "150",
            "--noise",
            "2",
            "-q",
        ]
    )
    sets = [
        *TINY_MNIST_SETS,
        "selection.shuffle=false",  # the same selection without a generator, for the check
        "train.epochs=1",
        "train.batch_size=8",
        f"data.path={data}",
    ]
    args = [
        "train",
        "--config",
        "megapixel_mnist_cpu",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "-q",
    ]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    capsys.readouterr()
    out_file = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "run" / "best.pt"),
                "--json",
                "--out",
                str(out_file),
                "--no-progress",
                "-q",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = megapixel_mnist_test_metrics(tmp_path / "run" / "best.pt", data)
    assert printed["test"]["majority"]["accuracy"] == pytest.approx(expected["majority_accuracy"])
    multi = printed["test"]["multi"]
    assert multi["exact_match"] == pytest.approx(expected["multi_exact_match"])
    assert multi["label_accuracy"] == pytest.approx(expected["multi_label_accuracy"])
    assert json.loads(out_file.read_text()) == printed
    settings = printed["settings"]  # what the figures were measured with
    assert (settings["memory_size"], settings["chunk_size"], settings["epoch"]) == (4, 8, 1)
    assert settings["precision"] == resolve_amp(torch.device("cpu"), "auto")
    assert settings["selection_order"] == "raster"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--config", "nope.yaml", "--out", "x"], "nope.yaml"),
        (
            [
                "train",
                "--config",
                "megapixel_mnist_cpu",
                "--out",
                "x",
                "--set",
                "selection.memory_size=0",
            ],
            "selection.memory_size",
        ),
        (
            ["train", "--config", "megapixel_mnist_cpu", "--out", "x", "--set", "model.depth=3"],
            "model.depth",
        ),
        (
            [
                "train",
                "--config",
                "megapixel_mnist_cpu",
                "--out",
                "x",
                "--set",
                "data.path=/no/such/file.npz",
            ],
            "/no/such/file.npz",
        ),
        (["eval", "--checkpoint", "missing.pt"], "missing.pt"),
        (["make-mnist", "--out", "o.npz", "--mnist", "/no/mnist.npz"], "/no/mnist.npz"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_field(
    tmp_path, monkeypatch, capsys, args, named
):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ips: error:") and named in err[0]


def test_predict_command_writes_tables_and_reports_a_bad_input(tmp_path, capsys, tiny):
    import torch
    from PIL import Image

    import ips

    model = ips.create_model(**{**tiny, "memory_size": 4, "chunk_size": 4})
    ckpt = ips.save_checkpoint(tmp_path / "m.pt", model, model.config)
    folder = tmp_path / "images"
    folder.mkdir()
    image = (torch.rand(40, 48) * 255).to(torch.uint8).numpy()
    Image.fromarray(image).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    code = main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            str(folder),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--no-pictures",
            "-q",
        ]
    )
    assert code == 1
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 3 and any("broken.png" in r for r in rows)
    assert "broken.png" in capsys.readouterr().err


def _own_cohort(folder) -> tuple[object, int]:
    """A table mixing PNG photos (with a tissue mask), generated pyramidal TIFFs and the real
    Aperio slide; returns (table, rows)."""
    from PIL import Image

    from ips.sources import write_synthetic_slide

    rng = np.random.default_rng(0)
    rows = [["path", "kind", "flag", "split", "mask"]]
    full = folder / "all_tissue.png"
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(full)
    for i in range(6):
        image = rng.integers(100, 160, (256, 256, 3), dtype=np.uint8)
        if i % 2:
            image[64:128, 128:192] = (200, 20, 40)
        Image.fromarray(image).save(folder / f"photo{i}.png")
        split = {4: "val", 5: "test"}.get(i, "train")
        flag = "" if i == 2 else i % 2  # one unknown label
        rows.append([f"photo{i}.png", "tumour" if i % 2 else "normal", flag, split, full.name])
    for i, lesions in enumerate((2, 0)):
        write_synthetic_slide(
            folder / f"slide{i}.tif",
            width=1024,
            height=1024,
            lesions=lesions,
            tile_size=128,
            seed=i,
        )
        kind = "tumour" if lesions else "normal"
        rows.append([f"slide{i}.tif", kind, int(bool(lesions)), "train" if i else "test", ""])
    rows.append([str(CMU_SVS), "normal", 0, "train", ""])
    table = folder / "labels.csv"
    table.write_text("".join(",".join(str(c) for c in row) + "\n" for row in rows))
    return table, len(rows) - 1


def test_own_images_and_slides_train_resume_evaluate_and_predict_through_the_cli(tmp_path, capsys):
    import csv

    from ips.config import GridConfig
    from ips.sources import open_source

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    table, count = _own_cohort(cohort)
    run = tmp_path / "run"
    sets = [
        "data.dataset=table",
        f"data.path={table}",
        "data.grid.downsample=4",
        "data.grid.tissue=otsu",
        "model.encoder=small_cnn",
        "model.in_channels=3",
        "model.patch_size=32",
        "model.embed_dim=16",
        "model.num_heads=2",
        "model.head_dim=8",
        "model.mlp_dim=32",
        "model.tasks={kind: {kind: multiclass, num_classes: null}, flag: {kind: binary}}",
        "selection.memory_size=4",
        "selection.chunk_size=16",
        "train.batch_size=2",
        "train.epochs=1",
    ]
    train = ["train", "--config", "megapixel_mnist_cpu", "--out", str(run), "--no-progress", "-q"]
    assert main([*train, *[a for s in sets for a in ("--set", s)]]) == 0
    assert main([*train, "--resume", "--set", "train.epochs=2"]) == 0
    with (run / "metrics.csv").open(newline="") as fh:
        epochs = list(csv.DictReader(fh))
    assert [r["epoch"] for r in epochs] == ["1", "2"] and epochs[1]["train_skipped"] == "0"
    stored = ips.load_checkpoint(run / "last.pt")
    assert stored["epoch"] == 2
    assert stored["config"]["model"]["tasks"]["kind"]["classes"] == ["normal", "tumour"]
    assert stored["config"]["data"]["grid"]["downsample"] == 4.0
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["test"]) >= {"kind", "flag", "loss"}

    out = tmp_path / "preds"
    predict = ["predict", "--checkpoint", str(run / "best.pt"), str(table), "--split", "test"]
    assert main([*predict, "--out", str(out), "--no-pictures", "--no-progress", "-q"]) == 0
    with (out / "predictions.csv").open(newline="") as fh:
        predicted = list(csv.DictReader(fh))
    assert [r["name"] for r in predicted] == ["photo5", "slide0"]
    assert {r["kind"] for r in predicted} <= {"normal", "tumour"}
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["images"] == 2 and scored["labelled"] == {"kind": 2, "flag": 2}
    assert set(scored["metrics"]["kind"]) == {"accuracy"}
    with table.open(newline="") as fh:  # the accuracy of the table's predictions
        truth = {Path(r["path"]).stem: r["kind"] for r in csv.DictReader(fh)}
    hits = [r["kind"] == truth[r["name"]] for r in predicted]
    assert scored["metrics"]["kind"]["accuracy"] == pytest.approx(np.mean(hits))

    # a new slide is cut as training cut its slides: the checkpoint's grid
    assert (
        main(
            [
                *predict[:3],
                str(cohort / "slide1.tif"),
                "--out",
                str(tmp_path / "new"),
                "--no-pictures",
                "--no-progress",
                "-q",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "new" / "predictions.jsonl").read_text())
    expected = open_source(
        cohort / "slide1.tif", patch_size=32, grid=GridConfig(downsample=4, tissue="otsu")
    )
    assert record["num_patches"] == len(expected) < (1024 // 4 // 32) ** 2


def test_eval_of_a_table_without_a_test_split_says_so(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("path,spot\na.png,1\na.png,0\n")
    sets = [
        "data.dataset=table",
        f"data.path={tmp_path / 't.csv'}",
        "data.val_fraction=0",
        "model.encoder=small_cnn",
        "model.in_channels=3",
        "model.patch_size=16",
        "model.tasks={spot: {kind: binary}}",
        "selection.memory_size=2",
        "selection.chunk_size=2",
        "train.batch_size=2",
        "train.epochs=1",
    ]
    run = tmp_path / "run"
    train = ["train", "--config", "megapixel_mnist_cpu", "--out", str(run), "--no-progress", "-q"]
    assert main([*train, *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t.csv: there is no test split" in err[0]


def test_class_folders_train_resume_evaluate_and_predict_through_the_cli(tmp_path, capsys):
    import csv

    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("clear", "spotted", "striped"):
            for i in range(3):
                image = rng.integers(0, 100, (48, 48, 3), dtype=np.uint8)
                if name == "spotted":
                    image[8:24, 8:24] = 250
                elif name == "striped":
                    image[:, ::4] = 250
                folder = tmp_path / "images" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{i}.jpg")
    run = tmp_path / "run"
    config = tmp_path / "folders.yaml"  # no task named: the one task takes the class folders
    config.write_text(
        "model: {encoder: small_cnn, in_channels: 3, patch_size: 16, embed_dim: 16,\n"
        "        num_heads: 2, head_dim: 8, mlp_dim: 32}\n"
        "selection: {memory_size: 4, chunk_size: 4}\n"
        f"data: {{dataset: image_folder, path: '{tmp_path / 'images'}', val_fraction: 0.2}}\n"
        "train: {batch_size: 4, epochs: 1}\n"
    )
    train = ["train", "--config", str(config), "--out", str(run), "--no-progress", "-q"]
    assert main(train) == 0
    assert main([*train, "--resume", "--set", "train.epochs=2"]) == 0
    stored = ips.load_checkpoint(run / "last.pt")
    assert stored["epoch"] == 2
    assert stored["config"]["model"]["tasks"] == {
        "label": {
            "kind": "multiclass",
            "num_classes": 3,
            "classes": ["clear", "spotted", "striped"],
        }
    }
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "accuracy" in printed["test"]["label"]
    new = tmp_path / "images" / "test" / "spotted"
    out = tmp_path / "preds"
    predict = ["predict", "--checkpoint", str(run / "best.pt"), str(new), "--out", str(out)]
    assert main([*predict, "--no-pictures", "--no-progress", "-q"]) == 0
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and {r["label"] for r in rows} <= {"clear", "spotted", "striped"}
    assert not (out / "metrics.json").exists()  # a folder has no labels to score against


def test_encoders_command_lists_every_preset_with_its_width_and_weights(capsys):
    from ips.encoders import PRESETS

    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(PRESETS) <= set(rows) and "timm:<model>" in rows
    assert rows["virchow2"]["width"] == 2560 and rows["virchow2"]["gated"] is True
    assert rows["uni"]["weights"] == "MahmoodLab/UNI"
