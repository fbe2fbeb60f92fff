"""Write errors: a full disk, a file-size limit or a read-only folder leaves the previous file
as it was and no temporary file, and reaches the user as one line naming the file.

A full disk (ENOSPC) cannot be made without a small filesystem; a file-size limit
(``RLIMIT_FSIZE``, EFBIG) stands in for it. The limit is set in a child process, so that it
never reaches pytest."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ips
from conftest import TINY_MNIST_SETS, random_digits
from ips.cli import main
from ips.config import Config, save_config
from ips.data import generate_megapixel_mnist
from ips.errors import UserError, WriteError
from ips.files import atomic_write, write_atomically

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux"
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOO_LARGE = os.strerror(errno.EFBIG)  # "File too large"

# run first in every child: what `limit_file_size(n)` does, and how a child reports an error
PRELUDE = """
import json, resource, signal, sys

def limit_file_size(limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

def caught(err):
    return {"type": type(err).__name__, "message": str(err), "errno": getattr(err, "errno", None)}
"""


def _child(code: str, *args: object) -> subprocess.CompletedProcess:
    """Run ``code`` (after PRELUDE) in a new Python process with ``args`` as sys.argv[1:]."""
    command = [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def _report(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a child printed last."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes anywhere below ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def model(tiny) -> ips.IPSModel:
    return ips.create_model(**{**tiny, "memory_size": 4, "chunk_size": 4})


@pytest.fixture
def image(tmp_path) -> Path:
    """A 40 x 48 grey PNG: 5 x 6 patches of the tiny model."""
    path = tmp_path / "images" / "good.png"
    path.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---- atomic_write itself ----------------------------------------------------------------------


def test_a_full_disk_is_a_write_error_naming_the_file_and_saying_nothing_was_written(
    tmp_path, monkeypatch
):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    path = tmp_path / "runs" / "x" / "metrics.json"
    with pytest.raises(WriteError) as caught:
        write_atomically(path, "{}\n")
    assert (
        str(caught.value)
        == f"{path}: cannot write it (No space left on device); nothing was written"
    )
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, UserError) and isinstance(caught.value, OSError)
    assert not path.exists() and _leftovers(tmp_path) == []


def test_an_error_of_the_producer_passes_unchanged_and_keeps_the_previous_file(tmp_path):
    path = write_atomically(tmp_path / "table.csv", "old\n")
    with pytest.raises(ValueError, match="^a bug$"):
        with atomic_write(path, "w") as fh:
            fh.write("half of it")
            raise ValueError("a bug")
    with pytest.raises(FileNotFoundError, match="input.tif"):  # reading, not writing, failed
        with atomic_write(path) as fh:
            fh.write(b"half of it")
            (tmp_path / "input.tif").read_bytes()
    assert path.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_every_writer_ips_uses_fails_as_a_write_error_past_the_file_size_limit(tmp_path):
    """torch.save wraps the failed write in a RuntimeError of its own and tifffile (numpy's
    tofile) reports a short write without errno: each still reaches the user as a WriteError
    naming the file, whose previous bytes are kept."""
    pytest.importorskip("h5py")
    pytest.importorskip("tifffile")
    code = """
    import os
    from pathlib import Path

    import h5py, numpy as np, tifffile, torch
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from ips.files import atomic_write

    def figure(fh):
        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        fig.add_subplot().imshow(np.random.default_rng(0).random((200, 200)))
        fig.savefig(fh, format="png")

    def bag(fh):
        with h5py.File(fh, "w") as out:
            features = out.create_dataset("features", shape=(1000, 64), dtype="float32")
            for start in range(0, 1000, 100):
                features[start : start + 100] = 1.0

    def tiff(fh):
        with tifffile.TiffWriter(fh, bigtiff=True) as tif:
            tif.write(np.ones((256, 256, 3), np.uint8), tile=(64, 64))

    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    writers = {
        "torch.save": ("wb", lambda fh: torch.save({"x": torch.ones(50_000)}, fh)),
        "h5py": ("w+b", bag),
        "tifffile": ("w+b", tiff),
        "np.savez": ("wb", lambda fh: np.savez(fh, x=np.ones(50_000))),
        "savefig": ("wb", figure),
        "Image.save": ("wb", lambda fh: Image.fromarray(noise).save(fh, format="PNG")),
        "text": ("w", lambda fh: fh.write("x" * 50_000)),
    }
    folder = Path(sys.argv[1])
    for name in writers:
        (folder / name).write_bytes(b"previous")
    limit_file_size(4096)
    found = {}
    for name, (mode, write) in writers.items():
        try:
            with atomic_write(folder / name, mode) as fh:
                write(fh)
            found[name] = None
        except Exception as err:
            found[name] = caught(err)
    print(json.dumps(found))
    """
    found = _report(_child(code, tmp_path))
    for name, error in found.items():
        assert error is not None, f"{name}: wrote past the limit"
        path = tmp_path / name
        assert error["type"] == "WriteError", (name, error)
        assert error["message"].startswith(f"{path}: cannot write it (")
        assert error["message"].endswith("); the previous file is kept")
        assert path.read_bytes() == b"previous", name
    assert found["torch.save"]["message"] == (
        f"{tmp_path / 'torch.save'}: cannot write it ({TOO_LARGE}); the previous file is kept"
    )
    assert "requested and" in found["tifffile"]["message"]  # numpy's short write, no errno
    assert _leftovers(tmp_path) == []


# ---- the writers of ips -----------------------------------------------------------------------


def test_a_checkpoint_past_the_file_size_limit_keeps_the_previous_last_pt(model, tiny, tmp_path):
    path = ips.save_checkpoint(tmp_path / "last.pt", model, model.config, epoch=1)
    before = path.read_bytes()
    code = """
    import ips

    tiny = json.loads(sys.argv[2])
    model = ips.create_model(**{**tiny, "memory_size": 4, "chunk_size": 4})
    limit_file_size(int(sys.argv[3]))
    try:
        ips.save_checkpoint(sys.argv[1], model, model.config, epoch=2)
        print(json.dumps(None))
    except Exception as err:
        print(json.dumps(caught(err)))
    """
    error = _report(_child(code, path, json.dumps(tiny), len(before) // 2))
    assert error == {
        "type": "WriteError",
        "message": f"{path}: cannot write it ({TOO_LARGE}); the previous file is kept",
        "errno": errno.EFBIG,
    }
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_feature_bag_past_the_file_size_limit_stops_extraction_and_leaves_no_file(tmp_path):
    pytest.importorskip("h5py")
    from ips.sources import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tif", width=256, height=256, tile_size=128)
    out = tmp_path / "bags"
    code = """
    from ips.features import extract_features

    limit_file_size(4096)  # the bag holds 128 float32 features per tissue tile of 32 x 32
    try:
        extract_features(
            sys.argv[1], sys.argv[2], encoder="resnet18_2blocks", patch_size=32, amp="none"
        )
        print(json.dumps(None))
    except Exception as err:
        print(json.dumps(caught(err)))
    """
    error = _report(_child(code, slide.path, out))
    bag = out / "s.h5"
    assert error["type"] == "WriteError"
    assert error["message"] == f"{bag}: cannot write it ({TOO_LARGE}); nothing was written"
    assert sorted(p.name for p in out.iterdir()) == []  # no bag, no temporary file


def test_predict_past_the_file_size_limit_exits_2_with_one_line_and_keeps_the_outputs(
    model, image, tmp_path
):
    checkpoint = ips.save_checkpoint(tmp_path / "model.pt", model, model.config)
    out = tmp_path / "out"
    ips.predict(model, [image], out_dir=out, heatmaps=False)  # the outputs of a first run
    before = _snapshot(out)
    assert {"predictions.csv", "predictions.jsonl", "good/scores.npz"} <= set(before)
    code = """
    from ips.cli import main

    limit_file_size(16)
    sys.exit(main(["predict", "--checkpoint", *sys.argv[1:], "--no-pictures", "-q"]))
    """
    args = (checkpoint, image, "--out", out, "--no-progress")
    # one input: the first file it cannot write stops the run (--fail-fast)
    proc = _child(code, *args, "--fail-fast")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"ips: error: {out / 'good' / 'scores.npz'}: cannot write it ({TOO_LARGE}); "
        "the previous file is kept"
    ]
    # without --fail-fast the input is reported as failed, then the table cannot be written
    proc = _child(code, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"ips: error: {out / 'predictions.csv'}: cannot write it ({TOO_LARGE}); "
        "the previous file is kept"
    )
    assert _snapshot(out) == before and _leftovers(out) == []


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mm.npz"
    return generate_megapixel_mnist(
        path, random_digits(), num_train=8, num_test=4, canvas_size=(150, 150), num_noise=2
    )


def _train_args(data: Path, run_dir: Path, epochs: int) -> list[str]:
    args = ["train", "--config", "megapixel_mnist_cpu", "--out", str(run_dir)]
    args += ["--no-progress", "-q", "--device", "cpu"]
    sets = [*TINY_MNIST_SETS, "train.batch_size=4", f"train.epochs={epochs}", f"data.path={data}"]
    for item in [*sets, "train.warmup_epochs=0.5", "data.val_fraction=0.25"]:
        args += ["--set", item]
    return args


def test_ips_train_whose_checkpoint_cannot_be_written_exits_2_and_keeps_last_pt(mnist, tmp_path):
    run_dir = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_args(mnist, run_dir, epochs=1)) == 0
    finally:
        torch.set_num_threads(threads)
    last = run_dir / "last.pt"
    before = last.read_bytes()
    code = """
    from ips.cli import main

    limit_file_size(int(sys.argv[1]))  # config.yaml and metrics.csv fit, a checkpoint not
    sys.exit(main(sys.argv[2:]))
    """
    proc = _child(code, len(before) // 2, *_train_args(mnist, run_dir, epochs=2), "--resume")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"ips: error: {last}: cannot write it ({TOO_LARGE}); the previous file is kept"
    ]
    assert last.read_bytes() == before
    assert ips.load_checkpoint(last)["epoch"] == 1
    assert _leftovers(run_dir) == []


# ---- a folder that may not be written ---------------------------------------------------------


def _modes_enforced(folder: Path) -> bool:
    """Whether a folder of mode 0o500 refuses new files here (root ignores modes)."""
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return True
    finally:
        folder.chmod(0o700)
    return False


def test_a_read_only_folder_is_a_write_error_naming_the_file(model, image, tmp_path, capsys):
    if not _modes_enforced(tmp_path / "probe"):
        pytest.skip("folder modes are not enforced for this user (root)")
    folder = tmp_path / "run"
    path = ips.save_checkpoint(folder / "last.pt", model, model.config, epoch=1)
    before = path.read_bytes()
    checkpoint = ips.save_checkpoint(tmp_path / "model.pt", model, model.config)
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError) as caught:
            ips.save_checkpoint(path, model, model.config, epoch=2)
        assert str(caught.value) == (
            f"{path}: cannot write it (Permission denied); the previous file is kept"
        )
        with pytest.raises(WriteError, match=r"config\.yaml: cannot write it \(Permission"):
            save_config(Config(), folder / "config.yaml")
        command = ["predict", "--checkpoint", str(checkpoint), str(image), "--out"]
        code = main([*command, str(folder / "out"), "--fail-fast", "--no-progress", "-q"])
        assert code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("ips: error: ")
        assert "cannot write it (Permission denied)" in err[0] and str(folder / "out") in err[0]
    finally:
        folder.chmod(0o700)
    assert path.read_bytes() == before and sorted(os.listdir(folder)) == ["last.pt"]
