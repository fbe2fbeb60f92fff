"""Faults: a run killed with SIGKILL resumes to the same result, repeated deterministic runs
agree bit for bit, a corrupt tile is skipped or stops the run by policy, checkpoints that would
run code are refused, and downloads are checked before they are kept."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import ips
from conftest import TINY_MNIST_SETS, random_digits
from ips.cli import main
from ips.config import Config, config_to_dict, load_config, resolve_config_path
from ips.data import generate_megapixel_mnist
from ips.data import mnist as mnist_module
from ips.errors import PREEMPTED_EXIT, Stopped
from ips.files import download
from ips.sources import CannotReadError
from ips.sources.synthetic import write_synthetic_slide
from ips.sources.tiff import TiffSource
from ips.train import fit

RUN = [
    *TINY_MNIST_SETS,
    "train.batch_size=4",
    "train.epochs=3",
    "train.warmup_epochs=0.5",
    "train.deterministic=true",
    "data.val_fraction=0.25",
]
TIMING = ("elapsed_s", "images_per_second", "peak_rss_mb")  # columns measuring the machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process run below uses one thread too


def _train_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "ips", "train", "--config", "megapixel_mnist_cpu"]
    args += ["--out", str(run_dir), "--no-progress", "-q", *extra]
    for item in [*RUN, f"data.path={data}"]:
        args += ["--set", item]
    return args


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the columns that measure time."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def _weights(run_dir: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of the last checkpoint's state dict as dtype, shape and raw bytes."""
    state = ips.load_checkpoint(run_dir / "last.pt")["model"]
    return {k: (str(v.dtype), tuple(v.shape), v.numpy().tobytes()) for k, v in state.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mm.npz"
    return generate_megapixel_mnist(
        path, random_digits(), num_train=8, num_test=4, canvas_size=(150, 150), num_noise=2
    )


def _fit_here(data: Path, run_dir: Path, workers: int = 0, **kwargs) -> Path:
    """Train in this process with one thread, as the runs in other processes do."""
    sets = [*RUN, f"data.path={data}", f"data.num_workers={workers}"]
    config = load_config(resolve_config_path("megapixel_mnist_cpu"), sets)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        fit(config, run_dir, progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return run_dir


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """A deterministic run of three epochs, never interrupted."""
    return _fit_here(data, tmp_path_factory.mktemp("straight"))


def _wait_for_epoch_1(proc: subprocess.Popen, run_dir: Path, log: Path) -> None:
    """Return once the training process ``proc`` has saved epoch 1 into ``run_dir``."""
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.csv").exists():  # written once epoch 1 is saved
        assert proc.poll() is None, f"the run ended before epoch 1 was saved: {log.read_text()}"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.005)


# ---- kill -9 and resume -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(data, straight, tmp_path):
    run_dir, log = tmp_path / "killed", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(_train_command(data, run_dir), env=ENV, stderr=stderr)
    try:
        _wait_for_epoch_1(proc, run_dir, log)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ips.load_checkpoint(run_dir / "last.pt")["epoch"]
    assert 1 <= killed_at < 3  # it died with work left

    (run_dir / ".last.pt.1a2b3c.tmp").write_bytes(b"half a checkpoint")  # a write cut short
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the killed process
    try:
        assert main(_train_command(data, run_dir, "--resume")[3:]) == 0  # ips train --resume
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert ips.load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    assert _weights(run_dir) == _weights(straight)
    assert _metrics(run_dir) == _metrics(straight)


# ---- SIGTERM (preemption) and a dead data loader worker ---------------------------------------


def _signal_at_step(monkeypatch, step: int, when: str = "step") -> None:
    """Send this process SIGTERM during its ``step``-th training step (1-based, over the
    run), or, with ``when="save"``, while the ``step``-th checkpoint is being written."""
    import ips.train as train_module

    calls = {"n": 0}
    target = train_module._train_step if when == "step" else train_module.save_checkpoint

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag: work goes on
        return target(*args, **kwargs)

    name = "_train_step" if when == "step" else "save_checkpoint"
    monkeypatch.setattr(train_module, name, wrapped)


def _resume_here(data: Path, run_dir: Path) -> None:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        assert main(_train_command(data, run_dir, "--resume")[3:]) == 0  # ips train --resume
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_sigterm_inside_an_epoch_saves_that_step_and_resume_ends_as_an_unbroken_run(
    data, straight, tmp_path, monkeypatch
):
    run_dir, handler = tmp_path / "run", signal.getsignal(signal.SIGTERM)
    _signal_at_step(monkeypatch, 3)  # epoch 2 of 3, its first of two steps
    with pytest.raises(Stopped, match=r"stopped by SIGTERM; .*last\.pt holds epoch 2 after step 1"):
        _fit_here(data, run_dir)
    last = ips.load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 1 and last["progress"]["step"] == 1
    assert int(last["scheduler"]["last_epoch"]) == 3  # three optimizer steps are in it
    assert not list(run_dir.glob(".*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is handler  # training's handler went away

    monkeypatch.undo()
    _resume_here(data, run_dir)
    assert ips.load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    assert _weights(run_dir) == _weights(straight)
    assert _metrics(run_dir) == _metrics(straight)


def test_sigterm_while_a_checkpoint_is_written_keeps_it_whole_and_resumes_exactly(
    data, straight, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    _signal_at_step(monkeypatch, 1, when="save")  # while epoch 1's last.pt is written
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after epoch 1") as stopped:
        _fit_here(data, run_dir)
    assert stopped.value.exit_status == PREEMPTED_EXIT
    last = ips.load_checkpoint(run_dir / "last.pt")  # whole: it loads
    assert last["epoch"] == 1 and "progress" not in last
    monkeypatch.undo()
    _resume_here(data, run_dir)
    assert _weights(run_dir) == _weights(straight)
    assert _metrics(run_dir) == _metrics(straight)


@pytest.mark.slow
def test_ips_train_stopped_by_sigterm_exits_with_the_preemption_status(data, straight, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen(_train_command(data, run_dir), env=ENV, stderr=stderr)
    try:
        _wait_for_epoch_1(proc, run_dir, log)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith("ips:")]
    if proc.returncode == 0:  # the signal came after the last step: nothing left to stop
        assert ips.load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    else:
        assert proc.returncode == PREEMPTED_EXIT, log.read_text()
        assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0]
        _resume_here(data, run_dir)
    assert _weights(run_dir) == _weights(straight)
    assert _metrics(run_dir) == _metrics(straight)


def test_a_data_loader_worker_killed_mid_epoch_is_named_and_the_run_resumes(
    data, straight, tmp_path, monkeypatch
):
    from torch.utils.data import get_worker_info

    from ips.data.megapixel_mnist import MegapixelMNIST

    marker, read = tmp_path / "killed-once", MegapixelMNIST.__getitem__

    def oom(self, i):  # the out-of-memory killer takes the worker reading image 2, once
        if get_worker_info() is not None and i == 2 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    monkeypatch.setattr(MegapixelMNIST, "__getitem__", oom)
    run_dir = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        _fit_here(data, run_dir, workers=1)
    message = str(stopped.value)
    assert stopped.value.exit_status == 1 and "\n" not in message
    assert re.search(r"data loader worker 0 \(pid \d+\) .* while reading sample 2\b", message)
    assert "out-of-memory" in message and "--resume" in message
    last = ips.load_checkpoint(run_dir / "last.pt")
    assert last["config"]["data"]["num_workers"] == 1
    monkeypatch.undo()
    _resume_here(data, run_dir)
    assert _weights(run_dir) == _weights(straight)  # workers read what the main process reads
    assert _metrics(run_dir) == _metrics(straight)


# ---- deterministic repeats ----------------------------------------------------------------------


def test_two_deterministic_runs_agree_byte_for_byte(data, straight, tmp_path):
    _fit_here(data, tmp_path)
    assert _weights(tmp_path) == _weights(straight)
    assert _metrics(tmp_path) == _metrics(straight)
    assert (tmp_path / "config.yaml").read_bytes() == (straight / "config.yaml").read_bytes()
    rows = _metrics(straight)
    assert len(rows) == 3 and "elapsed_s" not in rows[0] and "train_loss" in rows[0]


# ---- a corrupt tile inside a good slide ---------------------------------------------------------


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """good.tif and bad.tif (the same kind of slide, one level-0 tile overwritten with zeros),
    and a checkpoint of a tiny RGB model."""
    d = tmp_path_factory.mktemp("slides")
    for name, seed in (("good", 0), ("bad", 1)):
        write_synthetic_slide(d / f"{name}.tif", width=256, height=256, tile_size=128, seed=seed)
    with tifffile.TiffFile(d / "bad.tif") as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[1], page.databytecounts[1]
    with open(d / "bad.tif", "r+b") as f:
        f.seek(offset)
        f.write(bytes(count))
    model = ips.create_model(
        embed_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        in_channels=3,
        patch_size=32,
        memory_size=4,
        chunk_size=16,
        tasks={"tumour": {"kind": "binary"}},
    )
    ips.save_checkpoint(d / "model.pt", model, model.config)
    return d


def _predict_slides(slides: Path, out: Path, *options: str) -> list[str]:
    return [
        "predict",
        "--checkpoint",
        str(slides / "model.pt"),
        str(slides / "good.tif"),
        str(slides / "bad.tif"),
        "--out",
        str(out),
        "--no-pictures",
        "--no-progress",
        *options,
    ]


def test_a_corrupt_tile_is_skipped_reported_and_counted_under_skip(slides, tmp_path, capsys):
    assert main(_predict_slides(slides, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    reports = [line for line in err.splitlines() if "bad.tif" in line]
    assert len(reports) == 1 and reports[0].startswith("skipped ")  # once, as it happened
    assert "ips: 1 of 2 inputs failed and were skipped" in err
    assert "1 of 2 inputs predicted" in err
    with (tmp_path / "predictions.csv").open(newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["good"]["error"] == ""
    # the table gives the predicted class and its probability, the sigmoid of the logit
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    records = {r["name"]: r for r in map(json.loads, lines)}
    (logit,) = records["good"]["logits"]["tumour"]
    present = 1.0 / (1.0 + math.exp(-logit))
    assert rows["good"]["tumour"] == str(int(logit > 0))
    expected = present if logit > 0 else 1.0 - present
    assert float(rows["good"]["tumour_prob"]) == pytest.approx(expected, rel=1e-5)
    assert records["good"]["probabilities"]["tumour"] == [pytest.approx(present, rel=1e-6)]
    assert "bad.tif" in rows["bad"]["error"] and rows["bad"]["tumour_prob"] == ""


def test_a_corrupt_tile_stops_the_run_with_one_line_naming_the_file_under_fail(
    slides, tmp_path, capsys
):
    assert main(_predict_slides(slides, tmp_path, "--fail-fast", "-q")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ips: error: ")
    assert "bad.tif" in lines[0]
    assert not (tmp_path / "predictions.csv").exists()


def test_the_tifffile_reader_names_the_file_and_tile_it_cannot_decode(slides):
    source = TiffSource(slides / "bad.tif", patch_size=128)
    assert source.read([0]).shape == (1, 3, 128, 128)  # the other tiles still read
    with pytest.raises(CannotReadError, match=r"bad\.tif: tile 1 of level 0 cannot be decoded"):
        source.read([1])


def test_a_truncated_slide_fails_when_opened_not_when_read(slides, tmp_path):
    data = (slides / "good.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(CannotReadError, match=r"cut\.tif: .*truncated"):
        TiffSource(tmp_path / "cut.tif", patch_size=32)


# ---- checkpoints that would run code ------------------------------------------------------------


class _RunsCodeOnLoad:
    """Unpickling this calls exec(): it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _crafted_checkpoint(path: Path, marker: Path, container: str) -> Path:
    payload = {
        "format": "ips-checkpoint",
        "version": 1,
        "config": config_to_dict(Config()),
        "model": {"encoder.weight": _RunsCodeOnLoad(marker)},
    }
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_never_runs(tmp_path, capsys, container):
    control = _crafted_checkpoint(tmp_path / "control.pt", tmp_path / "control-ran", container)
    if container == "torch":  # what a careless loader would do
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert (tmp_path / "control-ran").exists()  # the crafted file does run code

    marker = tmp_path / "ran"
    evil = _crafted_checkpoint(tmp_path / "evil.pt", marker, container)
    with pytest.raises(ValueError, match=r"evil\.pt: refused"):
        ips.load_model(evil)
    with pytest.raises(ValueError, match=r"evil\.pt: refused"):
        ips.load_checkpoint(evil)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(evil), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ips: error: ") and "evil.pt" in lines[0]
    args = ["predict", "--checkpoint", str(evil), str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "-q"]) == 2
    assert not marker.exists()


# ---- downloads ----------------------------------------------------------------------------------


class _Response(io.BytesIO):
    """What urlopen returns, serving local bytes."""

    def __init__(self, data: bytes, url: str):
        super().__init__(data)
        self.url = url

    def geturl(self) -> str:
        return self.url


@pytest.fixture
def served(monkeypatch):
    """Serve files from a dict {url: bytes} instead of the network; record every request."""
    files: dict[str, bytes] = {}
    requests: list[tuple[str, ssl.SSLContext]] = []

    def urlopen(request, *, timeout, context):
        url = request.full_url
        requests.append((url, context))
        if url not in files:
            raise OSError(f"{url}: not served")
        target = files[url]
        if isinstance(target, tuple):  # (bytes, where the server redirects to)
            return _Response(target[0], target[1])
        return _Response(target, url)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return files, requests


def test_a_download_whose_checksum_differs_is_refused_and_not_kept(served, tmp_path):
    files, requests = served
    files["https://example.org/a.bin"] = b"tampered"
    expected = hashlib.sha256(b"original").hexdigest()
    with pytest.raises(ValueError, match="checksum") as info:
        download("https://example.org/a.bin", tmp_path / "a.bin", expected)
    assert expected in str(info.value) and hashlib.sha256(b"tampered").hexdigest() in str(
        info.value
    )
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    context = requests[0][1]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_a_download_with_the_right_checksum_is_kept(served, tmp_path):
    files, _ = served
    files["https://example.org/a.bin"] = b"original"
    path = download(
        "https://example.org/a.bin", tmp_path / "a.bin", hashlib.sha256(b"original").hexdigest()
    )
    assert path.read_bytes() == b"original"


@pytest.mark.parametrize(
    ("url", "redirect"),
    [("http://example.org/a.bin", None), ("https://example.org/a.bin", "http://example.org/b")],
)
def test_downloads_over_plain_http_are_refused(served, tmp_path, url, redirect):
    files, requests = served
    if redirect:
        files[url] = (b"original", redirect)
    with pytest.raises(ValueError, match="refused"):
        download(url, tmp_path / "a.bin", hashlib.sha256(b"original").hexdigest())
    assert not (tmp_path / "a.bin").exists()
    assert all(u.startswith("https://") for u, _ in requests)


def _idx_gz(array: np.ndarray) -> bytes:
    import gzip

    magic = 2051 if array.ndim == 3 else 2049
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def test_mnist_download_checks_every_file_and_keeps_nothing_unverified(
    served, tmp_path, monkeypatch, caplog
):
    files, requests = served
    digits = random_digits()
    idx = {
        "train-images-idx3-ubyte.gz": _idx_gz(digits.train_images),
        "train-labels-idx1-ubyte.gz": _idx_gz(digits.train_labels),
        "t10k-images-idx3-ubyte.gz": _idx_gz(digits.test_images),
        "t10k-labels-idx1-ubyte.gz": _idx_gz(digits.test_labels),
    }
    monkeypatch.setattr(
        mnist_module,
        "MNIST_SHA256",
        {name: hashlib.sha256(data).hexdigest() for name, data in idx.items()},
    )
    mirror = mnist_module.MNIST_MIRRORS[-1]
    for name, data in idx.items():  # only the last mirror answers; one file is tampered
        files[mirror + name] = data
    files[mirror + "t10k-labels-idx1-ubyte.gz"] = _idx_gz(digits.test_labels[::-1])
    with caplog.at_level(logging.WARNING, logger="ips.data.mnist"):
        assert mnist_module._download(tmp_path) is None
    assert any("checksum" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "mnist.npz").exists()
    assert not (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()
    assert requests and all(url.startswith("https://") for url, _ in requests)

    files[mirror + "t10k-labels-idx1-ubyte.gz"] = idx["t10k-labels-idx1-ubyte.gz"]
    loaded = mnist_module._download(tmp_path)
    assert loaded is not None and np.array_equal(loaded.test_labels, digits.test_labels)
    assert np.array_equal(np.load(tmp_path / "mnist.npz")["x_train"], digits.train_images)


# ---- own data: unreadable rows of a table -----------------------------------------------------


def _slide_table(slides: Path, tmp_path: Path, *extra: str) -> list[str]:
    """`ips train` of a tiny RGB model on a table of good.tif, bad.tif (read lazily: its
    corrupt tile is met during selection) and a PNG whose mask holds no tissue."""
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(tmp_path / "glass.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "empty.png")
    rows = [f"{slides / 'good.tif'},1,", f"{slides / 'bad.tif'},0,", "glass.png,0,empty.png"]
    (tmp_path / "t.csv").write_text("path,tumour,mask\n" + "\n".join(rows) + "\n")
    sets = [
        "data.dataset=table",
        f"data.path={tmp_path / 't.csv'}",
        "data.val_fraction=0",
        "model.encoder=small_cnn",
        "model.in_channels=3",
        "model.patch_size=32",
        "model.tasks={tumour: {kind: binary}}",
        "selection.memory_size=4",
        "selection.chunk_size=16",
        "train.batch_size=1",
        "train.epochs=1",
        *extra,
    ]
    args = ["train", "--config", "megapixel_mnist_cpu", "--out", str(tmp_path / "run")]
    return [*args, "--no-progress", *[a for s in sets for a in ("--set", s)]]


def test_unreadable_rows_of_a_table_are_skipped_and_counted_under_skip(slides, tmp_path, capsys):
    assert main(_slide_table(slides, tmp_path, "data.on_error=skip")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(
        "bad.tif" in line and "skipped a step of 1 images" in line for line in err.split("\n")
    )
    assert any("t.csv:4" in line and "no patch has a tissue" in line for line in err.split("\n"))
    (row,) = _metrics(tmp_path / "run")
    assert row["train_skipped"] == "2"  # the corrupt tile and the glass without tissue
    assert float(row["train_loss"]) > 0  # the good slide trained


def test_an_unreadable_row_of_a_table_stops_the_run_naming_it_under_fail(slides, tmp_path, capsys):
    assert main([*_slide_table(slides, tmp_path), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ips: error: ")
    assert "bad.tif" in lines[0] or "t.csv:4" in lines[0]
