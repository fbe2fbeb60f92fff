"""The end-to-end demo: Megapixel MNIST generated, trained on the CPU, evaluated, pictured.

``ips demo --out runs/demo`` writes::

    runs/demo/
    ├── megapixel_mnist_500.npz   the generated dataset (a description, rendered on the fly)
    ├── run/                      config.yaml, last.pt, best.pt, metrics.csv, tensorboard/
    ├── pictures/                 test images with the selected patches and their scores
    └── summary.json              test metrics per task and where everything is
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips.config import load_config, resolve_config_path
from ips.data import MegapixelMNIST, generate_megapixel_mnist, load_mnist
from ips.files import write_atomically
from ips.heads import predictions
from ips.metrics import nest_metrics
from ips.model import load_model
from ips.precision import precision_name, resolve_amp
from ips.train import evaluate_checkpoint, fit

log = logging.getLogger(__name__)

# the shipped CPU configuration on a smaller training set, sized for a few minutes on 2 cores
DEMO_DATA = dict(num_train=4000, num_test=500, canvas_size=(500, 500), num_noise=6, seed=0)
DEMO_OVERRIDES = ["train.epochs=5", "data.val_fraction=0.1"]


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    mnist: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    pictures: int = 4,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate, train, evaluate, draw; return ``{"test": metrics per task, "run_dir", ...}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digits = load_mnist(mnist)
    spec = {**DEMO_DATA, **(data or {})}
    data_path = generate_megapixel_mnist(out / "megapixel_mnist_500.npz", digits, **spec)
    log.info("dataset: %s (digits from %s)", data_path, digits.source)

    config = load_config(
        resolve_config_path("megapixel_mnist_cpu"),
        [f"data.path={data_path}", *DEMO_OVERRIDES, *(overrides or [])],
    )
    run_dir = out / "run"
    if (run_dir / "last.pt").is_file():  # the demo starts over: its own run of a former call
        log.info("replacing the former demo run in %s", run_dir)
        shutil.rmtree(run_dir)
    fit(config, run_dir, device=device, progress=progress)
    best = run_dir / "best.pt"
    test = evaluate_checkpoint(best, split="test", device=device)

    drawn = draw_test_pictures(best, data_path, out / "pictures", count=pictures, device=device)
    result = {
        "test": nest_metrics({k: v for k, v in test.items() if "/" in k}),
        "test_diagnostics": {k: v for k, v in test.items() if "/" not in k},
        "run_dir": str(run_dir),
        "pictures": [str(p) for p in drawn],
        "digits": digits.source,
        "precision": resolve_amp(torch.device(device), config.train.amp),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomically(out / "summary.json", json.dumps(result, indent=2) + "\n")
    _print_summary(result)
    return result


def draw_test_pictures(
    checkpoint: Path, data_path: Path, folder: Path, *, count: int, device: torch.device | str
) -> list[Path]:
    """For the first ``count`` test images: the image with the selected patches coloured by
    their selection score, titled with the true and predicted majority digit."""
    from ips.viz import selection_overlay

    model = load_model(checkpoint).to(device).eval()
    dataset = MegapixelMNIST(data_path, "test", patch_size=model.model_config.patch_size)
    rows, cols = dataset.grid_shape
    size = model.model_config.patch_size
    task = {t.name: t for t in model.tasks}["majority"]
    drawn = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        with torch.no_grad():
            out = model(item["patches"][None], generator=torch.Generator().manual_seed(i))
        ids = out.selected[0][out.mask[0]].numpy()
        coords = np.stack([(ids % cols) * size, (ids // cols) * size], axis=1)  # (x, y)
        predicted = int(predictions(out.logits["majority"], task)[0])
        truth = int(item["targets"]["majority"])
        on_digits = dataset.foreground_patches(i)[ids].mean()
        title = (
            f"test image {i}: majority digit {truth}, predicted {predicted} - "
            f"{on_digits:.0%} of the {len(ids)} selected patches touch a digit"
        )
        drawn.append(
            selection_overlay(
                dataset.render(i),
                coords,
                out.scores[0][out.mask[0]].cpu().numpy(),
                patch_size=size,
                out=folder / f"test_{i}.png",
                title=title,
                top_labels=5,
            )
        )
    return drawn


def _print_summary(result: dict[str, Any]) -> None:
    precision = precision_name(result["precision"])
    lines = [
        "",
        f"demo finished in {result['seconds']:.0f} s ({precision}; digits: {result['digits']})",
    ]
    for task, metrics in result["test"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        lines.append(f"  test {task:<9} {shown}")
    diag = result["test_diagnostics"]
    if "foreground_share" in diag:
        lines.append(f"  selected patches on digits: {diag['foreground_share']:.0%}")
    lines.append(f"  run folder: {result['run_dir']}  (tensorboard --logdir {result['run_dir']})")
    lines.append(
        f"  pictures:   {Path(result['pictures'][0]).parent}" if result["pictures"] else ""
    )
    log.info("\n".join(lines))
