from __future__ import annotations

import csv
import logging
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MNIST_TINY
from ips.config import TrainConfig, load_config
from ips.data import generate_megapixel_mnist, load_mnist
from ips.errors import InUseError
from ips.metrics import roc_auc
from ips.model import load_checkpoint
from ips.precision import autocast, native_bf16, resolve_amp
from ips.train import evaluate_checkpoint, fit, lr_factor, parameter_groups

TINY_RUN = [
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.head_dim=8",
    "model.mlp_dim=32",
    "model.patch_size=30",
    "selection.memory_size=6",
    "selection.chunk_size=8",
    "train.batch_size=8",
    "train.warmup_epochs=0.5",
    "data.val_fraction=0.25",
]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    digits = load_mnist(MNIST_TINY)
    path = tmp_path_factory.mktemp("data") / "mm.npz"
    return generate_megapixel_mnist(
        path, digits, num_train=32, num_test=16, canvas_size=(150, 150), num_noise=2, seed=1
    )


def _config(data, *extra):
    return load_config("configs/megapixel_mnist_cpu.yaml", [*TINY_RUN, f"data.path={data}", *extra])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup_steps=10, total_steps=100, min_ratio=1e-3) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert lr_factor(100, warmup_steps=10, total_steps=100, min_ratio=1e-3) == pytest.approx(1e-3)


def test_no_decay_covers_norms_biases_and_queries(tiny):
    import ips

    model = ips.create_model(**tiny)
    decay, no_decay = parameter_groups(model, TrainConfig())
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay_ids}
    assert "pool.queries" in names and "encoder.stem.1.weight" in names  # bn1
    assert "pool.norm1.weight" in names and "heads.heads.digit.bias" in names
    assert "heads.heads.digit.weight" not in names and decay["weight_decay"] == 0.1


def test_roc_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert math.isnan(roc_auc(scores, np.zeros(40)))


def test_a_tiny_training_run_lowers_the_loss_and_logs_everything(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=6", "train.lr=3e-3")
    fit(config, tmp_path, progress=False)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 6
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    for key in (
        "val_majority/accuracy",
        "val_multi/exact_match",
        "train_foreground_share",
        "val_attention_entropy",
        "lr",
        "train_images_per_second",
        "peak_rss_mb",
    ):
        assert key in rows[0], key
    assert float(rows[0]["peak_rss_mb"]) > 50  # MiB: torch alone takes more
    assert (tmp_path / "best.pt").exists() and (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_after_an_interrupted_run_matches_an_uninterrupted_run(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=2")
    fit(config, tmp_path / "straight", progress=False)
    fit(config, tmp_path / "split", progress=False, max_epochs=1)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    fit(config, tmp_path / "split", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    rows = list(csv.DictReader((tmp_path / "split" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_eval_of_a_checkpoint_reproduces_the_logged_validation_metrics(tiny_mnist, tmp_path):
    fit(_config(tiny_mnist, "train.epochs=1"), tmp_path, progress=False)
    logged = next(csv.DictReader((tmp_path / "metrics.csv").open()))
    metrics = evaluate_checkpoint(tmp_path / "last.pt", split="val")
    for key in ("majority/accuracy", "max/accuracy", "multi/label_accuracy", "loss"):
        assert metrics[key] == pytest.approx(float(logged[f"val_{key}"]), rel=1e-4), key


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_mnist, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"last\.pt: nothing to resume.*--resume auto"):
        fit(_config(tiny_mnist), tmp_path, resume=True, progress=False)


def test_resume_auto_starts_where_there_is_no_run_and_continues_where_there_is(
    tiny_mnist, tmp_path
):
    config = _config(tiny_mnist, "train.epochs=2")
    fit(config, tmp_path, resume="auto", progress=False, max_epochs=1)  # nothing there: starts
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    summary = fit(config, tmp_path, resume="auto", progress=False)  # goes on from epoch 1
    assert [row["epoch"] for row in summary["history"]] == [2]
    with pytest.raises(ValueError, match="resume must be True, False or 'auto'"):
        fit(config, tmp_path, resume="yes", progress=False)


def test_a_fresh_run_into_a_folder_holding_one_is_refused_and_leaves_it_alone(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=1")
    fit(config, tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(InUseError, match=r"already holds a run \(last\.pt\); --resume"):
        fit(config, tmp_path, progress=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "run.lock"} == {
        k: v for k, v in before.items() if k != "run.lock"
    }


def test_a_second_run_into_a_folder_a_live_run_holds_is_refused_naming_the_holder(
    tiny_mnist, tmp_path
):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InUseError) as refused:
            fit(_config(tiny_mnist, "train.epochs=1"), tmp_path, progress=False)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "another run is writing into this folder" in message
        assert not (tmp_path / "config.yaml").exists()  # the refused run wrote nothing
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    fit(
        _config(tiny_mnist, "train.epochs=1"), tmp_path, progress=False
    )  # a dead holder holds nothing
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert f"pid {os.getpid()} " in (tmp_path / "run.lock").read_text()


HOLD_LOCK = """
import sys, time
from ips.guard import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_resume_from_a_damaged_last_checkpoint_names_it_and_keeps_it(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=2")
    fit(config, tmp_path, progress=False, max_epochs=1)
    last = tmp_path / "last.pt"
    state = load_checkpoint(last)
    state["model"].pop(next(iter(state["model"])))  # a weight lost
    torch.save(state, last)
    damaged = last.read_bytes()
    with pytest.raises(ValueError, match=r"last\.pt: cannot resume.*is missing"):
        fit(config, tmp_path, progress=False, resume=True)
    assert last.read_bytes() == damaged

    state = load_checkpoint(last)
    fit(config, tmp_path / "other", progress=False, max_epochs=1)
    state["model"] = load_checkpoint(tmp_path / "other" / "last.pt")["model"]
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    torch.save(state, last)
    with pytest.raises(ValueError, match=r"last\.pt: cannot resume, its optimizer state"):
        fit(config, tmp_path, progress=False, resume=True)


def test_a_run_that_cannot_open_its_data_writes_no_config(tmp_path):
    config = _config(tmp_path / "absent.npz", "train.epochs=1")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_a_sample_that_fails_to_read_is_skipped_and_counted_or_ends_the_run(
    tiny_mnist, tmp_path, monkeypatch, policy
):
    from ips.data.megapixel_mnist import MegapixelMNIST

    original = MegapixelMNIST.__getitem__

    def flaky(self, i):
        if self.split == "train" and i == 2:
            raise OSError("corrupt tile at (0, 0)")
        return original(self, i)

    monkeypatch.setattr(MegapixelMNIST, "__getitem__", flaky)
    config = _config(tiny_mnist, "train.epochs=1", f"data.on_error={policy}")
    if policy == "fail":
        with pytest.raises(OSError, match="corrupt tile"):
            fit(config, tmp_path, progress=False)
        return
    fit(config, tmp_path, progress=False)
    row = next(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert float(row["train_skipped"]) == 1


def test_deterministic_runs_are_bit_identical(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=1", "train.deterministic=true")
    for name in ("a", "b"):
        fit(config, tmp_path / name, progress=False)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "capabilities, expected",
    [({"avx2": True}, "none"), ({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16")],
)
def test_auto_precision_is_bf16_only_on_cpus_with_bf16_instructions(
    monkeypatch, capabilities, expected
):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is (expected == "bf16")
    assert resolve_amp(cpu, "auto") == expected
    assert resolve_amp(cpu, "none") == "none" and resolve_amp(cpu, "bf16") == "bf16"
    with autocast(cpu, "auto"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_an_unknown_precision_is_named():
    with pytest.raises(ValueError, match="train.amp must be 'auto', 'none', 'bf16' or 'fp16'"):
        TrainConfig(amp="bf17")
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp(torch.device("cpu"), "half")


def test_a_bf16_run_trains_and_its_checkpoint_evaluates(tiny_mnist, tmp_path):
    config = _config(tiny_mnist, "train.epochs=3", "train.lr=3e-3", "train.amp=bf16")
    history = fit(config, tmp_path / "run", progress=False)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(math.isfinite(row["val_main"]) for row in history)
    metrics = evaluate_checkpoint(tmp_path / "run" / "best.pt")
    assert set(metrics) >= {"majority/accuracy", "loss"}


def test_data_balance_draws_the_rare_class_as_often_as_the_common_one(tmp_path):
    from ips.data.registry import build_dataset
    from ips.train import make_train_loader
    from test_data_table import table_config, write_image, write_table

    rows = []
    for i in range(40):
        write_image(tmp_path / f"{i}.png", spot=i < 4, seed=i)
        rows.append([f"{i}.png", int(i < 4)])
    table = write_table(tmp_path / "t.csv", ["path", "spot"], rows)
    config = table_config(
        table, {"spot": {"kind": "binary"}}, "data.val_fraction=0", "data.balance=spot"
    )
    train = build_dataset(config, "train")
    drawn = []
    for epoch in range(10):
        batches = make_train_loader(train, config, epoch=epoch).batch_sampler
        drawn += [i for batch in batches for i in batch]
    assert len(drawn) == 10 * 40  # epochs keep their length
    share = np.mean([i < 4 for i in drawn])
    assert 0.4 < share < 0.6  # 10 % of the images, half of the draws


def test_augmented_training_runs_and_refuses_colour_jitter_on_grey_images(tmp_path, tiny_mnist):
    config = _config(tiny_mnist, "train.epochs=1", "data.augment.flips=true")
    summary = fit(config, tmp_path / "flips", progress=False)
    assert summary["epochs"] == 1
    grey = _config(tiny_mnist, "train.epochs=1", "data.augment.hue=0.1")
    with pytest.raises(ValueError, match="data.augment.hue needs RGB patches"):
        fit(grey, tmp_path / "hue", progress=False)


def test_augmented_deterministic_runs_agree_and_pretrained_weights_set_the_normalisation(
    tmp_path, tiny_mnist
):
    import torchvision

    from ips.config import load_config as load

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    sets = [
        "train.epochs=1",
        "train.deterministic=true",
        "data.augment.flips=true",
        "data.augment.brightness=0.2",
        "model.encoder=resnet18_2blocks",
        f"model.pretrained={weights}",
    ]
    for name in ("a", "b"):
        fit(_config(tiny_mnist, *sets), tmp_path / name, progress=False)
    first, second = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in "ab")
    assert all(torch.equal(first[k], second[k]) for k in first)
    stored = load(tmp_path / "a" / "config.yaml")
    assert stored.model.normalize_mean == pytest.approx((0.449,))  # ImageNet's, averaged
    assert stored.model.normalize_std == pytest.approx((0.226,))


@pytest.mark.gpu
def test_a_training_step_runs_on_cuda_under_auto_precision(tiny):
    import ips
    from conftest import random_patches, random_targets
    from ips.heads import compute_loss

    device = torch.device("cuda")
    model = ips.create_model(**{**tiny, "memory_size": 4, "chunk_size": 4}).to(device).train()
    with autocast(device, "auto"):  # bf16 from Ampere on
        out = model(random_patches(2, 12).to(device))
    loss, _ = compute_loss(
        out.logits, {k: v.to(device) for k, v in random_targets(2).items()}, model.tasks
    )
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_a_run_logs_the_settings_unlike_the_reference_code(tiny_mnist, tmp_path, caplog):
    config = _config(tiny_mnist, "train.epochs=1", "model.query_std=1.0", "train.batch_size=4")
    with caplog.at_level(logging.INFO, logger="ips.train"):
        fit(config, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "unlike the reference" in r.getMessage()]
    assert lines == [
        "settings unlike the reference code: selection.distinct=true (reference: false), "
        "train.batch_size=4 (reference: 16), train.warmup_epochs=0.5 (reference: 10.0)"
    ]


def _parameters(checkpoint) -> dict[str, torch.Tensor]:
    """The learned tensors of a checkpoint (BatchNorm's running statistics left out)."""
    state = load_checkpoint(checkpoint)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point() and "running_" not in k}


def test_init_from_starts_a_fresh_run_from_another_runs_weights(tiny_mnist, tmp_path):
    fit(_config(tiny_mnist, "train.epochs=2", "train.lr=3e-3"), tmp_path / "a", progress=False)
    start = _parameters(tmp_path / "a" / "last.pt")
    # an almost zero learning rate: the weights stay where the run started
    sets = ("train.epochs=1", "train.lr=1e-12")
    init = f"train.init_from={tmp_path / 'a' / 'last.pt'}"
    fit(_config(tiny_mnist, *sets, init), tmp_path / "b", progress=False)
    fit(_config(tiny_mnist, *sets, "train.seed=5"), tmp_path / "c", progress=False)
    b, c = _parameters(tmp_path / "b" / "last.pt"), _parameters(tmp_path / "c" / "last.pt")
    assert all(torch.allclose(b[k], v, atol=1e-6) for k, v in start.items())
    assert not all(torch.allclose(c[k], v, atol=1e-3) for k, v in start.items())
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 1  # the epochs and the schedule start afresh
    assert load_config(tmp_path / "b" / "config.yaml").train.init_from == str(
        tmp_path / "a" / "last.pt"
    )


@pytest.fixture(scope="module")
def wide_checkpoint(tiny_mnist, tmp_path_factory):
    """A checkpoint of a model wider than `_config`'s."""
    run = tmp_path_factory.mktemp("wide")
    fit(_config(tiny_mnist, "train.epochs=1", "model.embed_dim=24"), run, progress=False)
    return run / "last.pt"


def _bad_source(kind: str, folder, wide):
    if kind == "not-a-checkpoint":
        (folder / "notes.pt").write_text("not a checkpoint")
        return folder / "notes.pt", r"train\.init_from: .*notes\.pt"
    if kind == "other-shapes":
        return wide, r"train\.init_from: .*last\.pt: its weights do not fit .*has shape"
    return folder / "nowhere.pt", r"train\.init_from: .*nowhere\.pt: checkpoint not found"


@pytest.mark.parametrize("kind", ["missing", "not-a-checkpoint", "other-shapes"])
def test_init_from_a_bad_checkpoint_is_named_and_the_run_folder_stays_empty(
    tiny_mnist, wide_checkpoint, tmp_path, kind
):
    source, message = _bad_source(kind, tmp_path, wide_checkpoint)
    config = _config(tiny_mnist, "train.epochs=1", f"train.init_from={source}")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_full_size_mnist_recipe_continues_its_first_stage_and_evaluates(tiny_mnist, tmp_path):
    """`megapixel_mnist_1500_cpu` starts from a `megapixel_mnist_cpu` run with 2-D positions:
    the two configs build the same weights, and the second stage trains and evaluates."""
    from ips.encoders import weights_mismatch
    from ips.model import IPSModel
    from ips.train import evaluation_settings

    first = load_config("configs/megapixel_mnist_cpu.yaml", ["model.pos_enc=2d"])
    second = load_config("configs/megapixel_mnist_1500_cpu.yaml")
    torch.manual_seed(0)
    a = IPSModel(first.model, first.selection).state_dict()
    b = IPSModel(second.model, second.selection).state_dict()
    assert weights_mismatch(b, a) is None

    tiny = [*TINY_RUN, f"data.path={tiny_mnist}", "train.epochs=1"]
    fit(
        load_config("configs/megapixel_mnist_cpu.yaml", [*tiny, "model.pos_enc=2d"]),
        tmp_path / "s1",
    )
    init = f"train.init_from={tmp_path / 's1' / 'last.pt'}"
    fit(load_config("configs/megapixel_mnist_1500_cpu.yaml", [*tiny, init]), tmp_path / "s2")
    metrics = evaluate_checkpoint(tmp_path / "s2" / "last.pt", split="test")
    assert {"majority/accuracy", "max/accuracy", "top/accuracy", "multi/exact_match"} <= set(
        metrics
    )
    settings = evaluation_settings(tmp_path / "s2" / "last.pt")
    assert (settings["memory_size"], settings["chunk_size"]) == (6, 8)
    assert settings["precision"] in ("none", "bf16")
