"""Data-parallel training: several CPU processes (gloo) against one process.

Processes are started the way torchrun starts them (torch's elastic launcher, or the
``ips train --nproc`` command line), so they join the group from torchrun's environment.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import ips
from conftest import MNIST_TINY, TINY, random_patches, random_targets
from ips import distributed
from ips.config import Config, TrainConfig, load_config
from ips.distributed import EvalBatchSampler, TrainBatchSampler
from ips.errors import PREEMPTED_EXIT
from ips.model import load_checkpoint, load_model
from ips.train import evaluate_checkpoint, fit, make_loader, make_train_loader, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers (module level: the launched processes import them) -----------------------------


class Bags(Dataset):
    """``num_items`` images of 12 distinct random patches with random targets."""

    def __init__(self, num_items: int):
        self.patches = random_patches(num_items, 12, seed=1)
        self.targets = random_targets(num_items, seed=2)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        targets = {name: value[i] for name, value in self.targets.items()}
        return {"patches": self.patches[i], "targets": targets, "index": i}


def _train(*, num_items: int, batch_size: int, accumulate: int) -> dict:
    """One epoch of SGD on Bags, in this process or as one of a process group.

    The encoder's BatchNorm layers are removed: batch statistics of a share of the batch
    differ from those of the whole batch, everything else must not. In float32: bf16 rounds
    the products of a share differently from those of the whole batch.
    """
    ranks = distributed.current()
    torch.manual_seed(0)
    model = ips.create_model(**TINY, memory_size=4, chunk_size=4)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    config = Config(
        model=model.model_config,
        selection=model.selection_config,
        train=TrainConfig(batch_size=batch_size, accumulate=accumulate, amp="none"),
    )
    wrapped = distributed.wrap(model) if ranks.world_size > 1 else model
    loader = make_train_loader(
        Bags(num_items), config, epoch=0, rank=ranks.rank, world_size=ranks.world_size
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = train_one_epoch(
        wrapped,
        loader,
        optimizer,
        scheduler,
        config.train,
        device=torch.device("cpu"),
        epoch=3,
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "metrics": metrics, "steps": scheduler.last_epoch}


def _in_group(runs: list[dict]) -> list[dict]:
    torch.set_num_threads(1)
    distributed.init_distributed("cpu", timeout=timedelta(seconds=60))
    try:
        return [_train(**run) for run in runs]
    finally:
        distributed.shutdown()


def _fit_failing_on_rank_1(data: str, run_dir: str) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    from ips.data.megapixel_mnist import MegapixelMNIST

    def fail(self, i):
        raise OSError(f"corrupt tile in image {i} on rank 1")

    @record
    def run() -> None:
        torch.set_num_threads(1)
        distributed.init_distributed("cpu", timeout=timedelta(seconds=120))
        if distributed.current().rank == 1:
            MegapixelMNIST.__getitem__ = fail
        fit(_mnist_config(data), run_dir, progress=False)

    run()


def _launch(entrypoint, *args, nproc: int = 2, logs: Path | None = None) -> dict[int, object]:
    """Run ``entrypoint(*args)`` in ``nproc`` processes through torch's elastic launcher;
    returns rank -> return value. ``logs``: where the launcher keeps each process's error file.

    The processes fork from a server that has imported torch and this module once, so that
    each launch does not pay for importing torch again.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    multiprocessing.set_forkserver_preload(["torch", "torchvision", __name__])

    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the launcher takes these over
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in names}
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"test-{uuid.uuid4()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="forkserver",
        logs_specs=DefaultLogsSpecs(log_dir=None if logs is None else str(logs)),
    )
    try:
        return elastic_launch(config, entrypoint)(*args)
    finally:
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)


MNIST_RUN = [
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.head_dim=8",
    "model.mlp_dim=32",
    "model.patch_size=30",
    "model.dropout=0.0",
    "selection.memory_size=6",
    "selection.chunk_size=8",
    "train.batch_size=8",
    "train.warmup_epochs=0.5",
    "train.epochs=1",
    "data.val_fraction=0.5",
]


def _mnist_config(data, *extra):
    return load_config(
        ROOT / "configs/megapixel_mnist_cpu.yaml", [*MNIST_RUN, f"data.path={data}", *extra]
    )


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    from ips.data import generate_megapixel_mnist, load_mnist

    digits = load_mnist(MNIST_TINY)
    path = tmp_path_factory.mktemp("data") / "mm.npz"
    return generate_megapixel_mnist(
        path, digits, num_train=32, num_test=8, canvas_size=(150, 150), num_noise=2, seed=1
    )


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- which process loads which images -------------------------------------------------------


@pytest.mark.parametrize("world_size, accumulate", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
def test_the_processes_share_exactly_the_batches_of_one_process(world_size, accumulate):
    config = Config(train=TrainConfig(batch_size=4, accumulate=accumulate, seed=5))
    loader = make_loader(Bags(11), config, shuffle=True, epoch=2)  # batches of 4, 4, 3
    single = [batch["index"].tolist() for batch in loader]
    samplers = [
        TrainBatchSampler(11, 4, seed=5 * 100_003 + 2, rank=r, world_size=world_size,
                          accumulate=accumulate)
        for r in range(world_size)
    ]  # fmt: skip
    for step, batch in enumerate(single):
        got, counted = [], 0
        for sampler in samplers:
            for m in range(step * accumulate, (step + 1) * accumulate):
                real, total = sampler.shares[m]
                assert total == len(batch)
                assert len(sampler.batches[m]) == max(real, 1)  # a stand-in counts for nothing
                got += sampler.batches[m][:real]
                counted += real
        assert got == batch and counted == len(batch)
        assert max(len(s.batches[step * accumulate]) for s in samplers) <= 4 // (
            world_size * accumulate
        )


def test_evaluation_batches_are_dealt_to_the_processes_in_turn():
    samplers = [EvalBatchSampler(10, 3, rank=r, world_size=2) for r in range(2)]
    assert samplers[0].batch_ids == [0, 2] and samplers[1].batch_ids == [1, 3]
    assert samplers[0].batches == [[0, 1, 2], [6, 7, 8]]
    assert samplers[1].batches == [[3, 4, 5], [9]]


def test_a_batch_that_does_not_split_over_the_processes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size \(B=6\).*4 processes"):
        TrainBatchSampler(20, 6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="multiple of train.accumulate"):
        TrainConfig(batch_size=6, accumulate=4)


def test_ips_train_nproc_checks_the_batch_before_starting_processes(tiny_mnist, tmp_path, capsys):
    from ips.cli import _without_option, main

    argv = ["train", "--config", str(ROOT / "configs/megapixel_mnist_cpu.yaml")]
    argv += ["--set", f"data.path={tiny_mnist}", "--out", str(tmp_path / "run"), "--nproc", "3"]
    assert main(argv) == 2  # B = 8
    assert "must split evenly into 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert _without_option(["train", "--nproc", "2", "--out", "x", "--npr=2"], "--nproc") == [
        "train",
        "--out",
        "x",
    ]


# ---- equivalence with one process -----------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_half_batches_take_the_same_steps_as_one_process():
    # 5 images in batches of 4: the second step has one image, so one process stands in
    runs = [
        dict(num_items=5, batch_size=4, accumulate=1),
        dict(num_items=5, batch_size=4, accumulate=2),  # and micro-steps of one image
    ]
    one = _train(**runs[0])
    results = _launch(_in_group, runs)
    for rank in (0, 1):
        for run in results[rank]:
            assert run["steps"] == one["steps"] == 2
            _assert_close(run["state"], one["state"])
            for key in ("loss", "digit/accuracy", "tumour/auc", "labels/exact_match"):
                assert run["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    start = ips.create_model(**TINY, memory_size=4, chunk_size=4).state_dict()
    assert not torch.allclose(
        one["state"]["heads.heads.digit.weight"], start["heads.heads.digit.weight"]
    )


def test_accumulating_two_micro_steps_of_half_a_batch_equals_one_step_of_the_batch():
    config = Config(train=TrainConfig(batch_size=4, accumulate=2))
    loader = make_train_loader(Bags(5), config, epoch=0)
    assert [len(b) for b in loader.batch_sampler] == [2, 2, 1, 1]
    whole = _train(num_items=5, batch_size=4, accumulate=1)
    accumulated = _train(num_items=5, batch_size=4, accumulate=2)
    assert accumulated["steps"] == whole["steps"] == 2  # the schedule counts optimizer steps
    _assert_close(accumulated["state"], whole["state"])
    assert accumulated["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], abs=1e-6)


# ---- runs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_in_one_process(tiny_mnist, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "ips",
        "train",
        "--config",
        str(ROOT / "configs/megapixel_mnist_cpu.yaml"),
    ]
    command += [f"--set={item}" for item in [*MNIST_RUN, f"data.path={tiny_mnist}"]]
    command += ["--out", str(run), "--nproc", "2", "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    first = load_checkpoint(run / "last.pt")
    assert first["epoch"] == 1 and not any(k.startswith("module.") for k in first["model"])
    load_model(run / "last.pt")  # loads without DistributedDataParallel
    assert len(list((run / "tensorboard").iterdir())) == 1  # only rank 0 wrote
    logged = next(csv.DictReader((run / "metrics.csv").open()))
    assert logged["step"] == "2"  # 16 training images in global batches of 8
    # validation was shared out (2 batches of 8) and gathered: the same as one process
    metrics = evaluate_checkpoint(run / "last.pt", split="val")
    for key in ("majority/accuracy", "multi/label_accuracy", "loss", "attention_entropy"):
        assert metrics[key] == pytest.approx(float(logged[f"val_{key}"]), rel=1e-4), key

    fit(_mnist_config(tiny_mnist, "train.epochs=2"), run, resume=True, progress=False)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["step"] == "4"
    second = load_checkpoint(run / "last.pt")
    assert second["epoch"] == 2
    adam = second["optimizer"]["state"][0]
    assert int(adam["step"]) == 4  # the optimizer went on from the two processes' state
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert "pool.queries" in changed


@pytest.mark.slow
def test_sigterm_to_a_run_of_two_processes_stops_both_at_one_step(tiny_mnist, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ips", "train", "--config", "megapixel_mnist_cpu"]
    command += [f"--set={item}" for item in [*MNIST_RUN, f"data.path={tiny_mnist}"]]
    command += ["--set=train.epochs=6", "--out", str(run), "--nproc", "2", "--no-progress"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        launcher = subprocess.Popen(
            command, stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.csv").exists():  # epoch 1 saved
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.01)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)  # both processes stop; nothing hangs
    finally:
        launcher.kill()
        launcher.wait()
    text = log.read_text()
    assert launcher.returncode == PREEMPTED_EXIT, text[-3000:]
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
    state = load_checkpoint(run / "last.pt")  # whole, written by rank 0
    done = state["epoch"] + state.get("progress", {}).get("step", 0) / 2
    assert 1 <= done < 6
    summary = fit(_mnist_config(tiny_mnist, "train.epochs=6"), run, resume=True, progress=False)
    assert summary["epochs"] == 6 and load_checkpoint(run / "last.pt")["epoch"] == 6
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, 7)]
    assert [r["step"] for r in rows] == [str(2 * e) for e in range(1, 7)]


def test_a_failure_in_one_process_ends_the_run_with_its_error(tiny_mnist, tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    started = time.monotonic()
    with pytest.raises(ChildFailedError):
        _launch(_fit_failing_on_rank_1, str(tiny_mnist), tmp_path / "run", logs=tmp_path / "logs")
    assert time.monotonic() - started < 100  # ended by the launcher, not by a timeout (120 s)
    # the launcher reports the first process it sees failing: rank 1, or rank 0 on losing its
    # peer; rank 1's own error is in its error file either way
    (error_file,) = (tmp_path / "logs").glob("*/attempt_0/1/error.json")
    error = json.loads(error_file.read_text())["message"]["message"]
    assert error.startswith("OSError: corrupt tile in image")


def test_balanced_sampling_draws_every_class_equally_often_in_an_epoch_of_the_same_length():
    from ips.distributed import balanced_weights

    classes = [0] * 90 + [1] * 10 + [-1] * 20  # imbalanced, some unknown
    weights = balanced_weights(classes)
    sampler = TrainBatchSampler(len(classes), 8, seed=0, weights=weights)
    drawn = [i for batch in sampler for i in batch]
    assert len(drawn) == len(classes)
    again = TrainBatchSampler(len(classes) * 50, 8, seed=1, weights=weights * 50)
    counts = np.bincount([classes[i % 120] + 1 for batch in again for i in batch], minlength=3)
    unknown, zeros, ones = counts / counts.sum()
    assert zeros == pytest.approx(ones, abs=0.03) and unknown == pytest.approx(20 / 120, abs=0.03)
    assert TrainBatchSampler(120, 8, seed=0, weights=weights).batches == sampler.batches
    with pytest.raises(ValueError, match="no image of the training set has a known label"):
        balanced_weights([-1, -1])
