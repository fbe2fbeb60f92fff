from __future__ import annotations

import json

import numpy as np

from conftest import TINY_MNIST_SETS, random_digits
from ips.demo import run_demo


def test_the_demo_trains_evaluates_draws_and_says_which_precision_ran(tmp_path):
    digits = random_digits()
    mnist = tmp_path / "digits.npz"
    np.savez(
        mnist,
        x_train=digits.train_images,
        y_train=digits.train_labels,
        x_test=digits.test_images,
        y_test=digits.test_labels,
    )
    result = run_demo(
        tmp_path / "demo",
        mnist=str(mnist),
        progress=False,
        pictures=1,
        overrides=[*TINY_MNIST_SETS, "train.epochs=1", "train.batch_size=8", "train.amp=none"],
        data=dict(num_train=24, num_test=8, canvas_size=(150, 150)),
    )
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["precision"] == "none" == result["precision"]
    assert 0.0 <= summary["test"]["majority"]["accuracy"] <= 1.0
    assert (tmp_path / "demo" / "run" / "best.pt").is_file()
    assert [p.endswith("test_0.png") for p in summary["pictures"]] == [True]
