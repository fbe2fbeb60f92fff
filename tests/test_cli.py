from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA, TINY_MNIST_SETS
from ips.cli import main


def _mnist() -> str:
    path = SHARED_DATA / "mnist.npz"
    if not path.exists():
        pytest.skip("shared MNIST not available")
    return str(path)


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
    assert 0.0 <= printed["test"]["majority"]["accuracy"] <= 1.0
    assert "exact_match" in printed["test"]["multi"]
    assert json.loads(out_file.read_text()) == printed


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
