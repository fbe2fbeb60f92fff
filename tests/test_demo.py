from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MNIST_SETS, megapixel_mnist_test_metrics, random_digits
from ips.data.mnist import _save_npz
from ips.demo import run_demo


def test_the_demo_trains_evaluates_draws_and_says_which_precision_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    mnist = _save_npz(tmp_path / "digits.npz", random_digits())
    result = run_demo(
        tmp_path / "demo",
        mnist=str(mnist),
        progress=False,
        pictures=1,
        overrides=[
            *TINY_MNIST_SETS,
            "selection.shuffle=false",  # the same selection without a generator, for the check
            "train.epochs=1",
            "train.batch_size=8",
        ],
        data=dict(num_train=24, num_test=8, canvas_size=(150, 150)),
    )
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["precision"] == "bf16" == result["precision"]  # train.amp: auto
    expected = megapixel_mnist_test_metrics(
        tmp_path / "demo" / "run" / "best.pt", tmp_path / "demo" / "megapixel_mnist_500.npz"
    )
    test = summary["test"]
    assert test["majority"]["accuracy"] == pytest.approx(expected["majority_accuracy"])
    assert test["multi"]["label_accuracy"] == pytest.approx(expected["multi_label_accuracy"])
    assert result["test"] == test
    assert (tmp_path / "demo" / "run" / "best.pt").is_file()
    assert [p.endswith("test_0.png") for p in summary["pictures"]] == [True]
