"""Every user-facing command meets bad input with one line naming the file or field, exit 2.

A corpus of bad files, checkpoints and configs is generated once per module; each case runs
the real command line in-process and checks the exit status, that stderr is exactly one line
``ips: error: ...`` (no traceback) and that the line names what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ips
from conftest import TINY_MNIST_SETS, random_digits
from ips.cli import main
from ips.config import config_to_dict
from ips.data import generate_megapixel_mnist
from ips.sources.synthetic import write_synthetic_slide

TINY = dict(embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32, dropout=0.0, memory_size=4)
TINY_RUN = [  # small enough that a case which wrongly starts training still ends quickly
    *TINY_MNIST_SETS,
    "train.epochs=1",
    "train.batch_size=4",
]


def _save_model(path: Path, **overrides) -> Path:
    model = ips.create_model(**{**TINY, **overrides})
    return ips.save_checkpoint(path, model, model.config)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of good and bad inputs; names say which is which."""
    d = tmp_path_factory.mktemp("corpus")
    pixel = dict(in_channels=1, patch_size=8, chunk_size=4, tasks={"label": {"kind": "binary"}})
    _save_model(d / "grey.pt", **pixel)
    _save_model(d / "rgb.pt", **{**pixel, "in_channels": 3, "patch_size": 32, "chunk_size": 16})
    _save_model(d / "features.pt", encoder="features", feature_dim=4, chunk_size=4)
    mnist_tasks = {t: {"kind": "multiclass", "num_classes": 10} for t in ("majority", "max")}
    _save_model(d / "mnist.pt", in_channels=1, patch_size=30, chunk_size=8, tasks=mnist_tasks)

    # checkpoints that do not fit their own config
    payload = ips.load_checkpoint(d / "grey.pt")
    payload["config"]["model"]["embed_dim"] = 32
    torch.save(payload, d / "wider_config.pt")
    payload = ips.load_checkpoint(d / "grey.pt")
    payload["config"]["model"].update(encoder="features", feature_dim=4)
    torch.save(payload, d / "other_encoder.pt")
    payload = ips.load_checkpoint(d / "grey.pt")
    payload["config"]["model"]["depth"] = 3
    torch.save(payload, d / "unknown_config_key.pt")
    torch.save({"model": payload["model"]}, d / "untagged.pt")
    (d / "random_bytes.pt").write_bytes(np.random.default_rng(1).bytes(3000))
    (d / "empty.pt").write_bytes(b"")

    # images and slides
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(d / "tiny.png")
    (d / "random_bytes.png").write_bytes(rng.bytes(2000))
    (d / "random_bytes.tif").write_bytes(rng.bytes(2000))
    write_synthetic_slide(d / "slide.tif", width=256, height=256, tile_size=128, seed=0)
    data = (d / "slide.tif").read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 3])
    write_synthetic_slide(d / "blank.tif", width=256, height=256, tile_size=128, tissue_blobs=0)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "empty_mask.png")

    # feature bags
    features = rng.normal(size=(6, 4)).astype(np.float32)
    coords = np.stack([np.arange(6) * 8, np.zeros(6)], axis=1)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = features.copy()
        bad[3, 1] = value
        np.savez(d / f"{name}_features.npz", features=bad, coords=coords)
    np.save(d / "objects.npy", np.array([{"features": 1}], dtype=object), allow_pickle=True)

    # datasets and configs
    generate_megapixel_mnist(
        d / "mm.npz", random_digits(), num_train=8, num_test=4, canvas_size=(150, 150), num_noise=2
    )
    with np.load(d / "mm.npz") as npz:
        arrays = dict(npz)
    arrays["train_target_majority"] = arrays["train_target_majority"].copy()
    arrays["train_target_majority"][2] = 12  # ten classes: 0..9
    np.savez(d / "label_12.npz", **arrays)
    (d / "notes.npz").write_text("not an archive")
    (d / "broken.yaml").write_text("model: [embed_dim: 16\n")
    (d / "list.yaml").write_text("- model\n- train\n")
    return d


def _train(*sets: str, data: str = "@/mm.npz") -> list[str]:
    args = ["train", "--config", "megapixel_mnist_cpu", "--out", "@/run", "--no-progress", "-q"]
    for item in [*TINY_RUN, f"data.path={data}", *sets]:
        args += ["--set", item]
    return args


def _predict(checkpoint: str, *inputs: str, options: tuple[str, ...] = ()) -> list[str]:
    return [
        "predict",
        "--checkpoint",
        f"@/{checkpoint}",
        *(f"@/{i}" for i in inputs),
        "--out",
        "@/predictions",
        "--fail-fast",
        "--no-pictures",
        "--no-progress",
        "-q",
        *options,
    ]


def _eval(checkpoint: str, *options: str) -> list[str]:
    return ["eval", "--checkpoint", f"@/{checkpoint}", "--no-progress", "-q", *options]


CASES = [
    # missing files
    pytest.param(_predict("grey.pt", "nowhere.png"), ["nowhere.png"], id="missing-image"),
    pytest.param(_predict("nowhere.pt", "grey.png"), ["nowhere.pt"], id="missing-checkpoint"),
    pytest.param(_eval("nowhere.pt"), ["nowhere.pt"], id="missing-checkpoint-eval"),
    pytest.param(
        ["train", "--config", "@/nowhere.yaml", "--out", "@/run"],
        ["nowhere.yaml"],
        id="missing-config",
    ),
    pytest.param(_train(data="@/nowhere.npz"), ["data.path", "nowhere.npz"], id="missing-data"),
    pytest.param(
        _train("train.init_from=@/nowhere.pt"),
        ["train.init_from", "nowhere.pt"],
        id="missing-init-checkpoint",
    ),
    pytest.param(
        _train("train.init_from=@/grey.pt"),
        ["train.init_from", "grey.pt", "do not fit"],
        id="init-checkpoint-of-another-model",
    ),
    pytest.param(
        _eval("mnist.pt", "--data", "@/nowhere.npz"), ["nowhere.npz"], id="missing-data-eval"
    ),
    # unreadable, corrupt or truncated files
    pytest.param(_predict("grey.pt", "random_bytes.png"), ["random_bytes.png"], id="corrupt-png"),
    pytest.param(_predict("rgb.pt", "random_bytes.tif"), ["random_bytes.tif"], id="corrupt-tif"),
    pytest.param(
        _predict("rgb.pt", "truncated.tif"), ["truncated.tif", "truncated"], id="truncated-tif"
    ),
    pytest.param(_train(data="@/notes.npz"), ["notes.npz", "zip"], id="dataset-not-an-npz"),
    pytest.param(
        ["train", "--config", "@/broken.yaml", "--out", "@/run"], ["broken.yaml"], id="bad-yaml"
    ),
    pytest.param(
        ["train", "--config", "@/list.yaml", "--out", "@/run"], ["list.yaml"], id="yaml-list"
    ),
    # channels and sizes
    pytest.param(
        _predict("grey.pt", "rgb.png"), ["rgb.png", "model.in_channels"], id="rgb-image-grey-model"
    ),
    pytest.param(
        _train("model.in_channels=3"),
        ["model.in_channels", "1-channel"],
        id="rgb-model-grey-dataset",
    ),
    pytest.param(
        _predict("grey.pt", "tiny.png"), ["tiny.png", "patch_size"], id="image-smaller-than-patch"
    ),
    pytest.param(
        _train("model.patch_size=400"), ["mm.npz", "patch_size"], id="dataset-smaller-than-patch"
    ),
    # selection settings
    pytest.param(
        _train("selection.memory_size=0"), ["selection.memory_size"], id="memory-size-zero"
    ),
    pytest.param(_train("selection.chunk_size=0"), ["selection.chunk_size"], id="chunk-size-zero"),
    pytest.param(
        _train("selection.chunk_size=-5"), ["selection.chunk_size"], id="chunk-size-negative"
    ),
    pytest.param(
        _predict("grey.pt", "grey.png", options=("--memory-size", "0")),
        ["memory_size"],
        id="memory-size-zero-predict",
    ),
    # config keys and types
    pytest.param(_train("model.depth=3"), ["model.depth", "unknown key"], id="unknown-key"),
    pytest.param(
        _train("selection.memory_sise=8"),
        ["selection.memory_sise", "memory_size"],
        id="mistyped-key",
    ),
    pytest.param(_train("optimizer.lr=0.1"), ["optimizer", "section"], id="unknown-section"),
    pytest.param(_train("train.lr=fast"), ["train.lr", "'fast'"], id="wrong-type-number"),
    pytest.param(_train("train.epochs=2.5"), ["train.epochs", "2.5"], id="wrong-type-integer"),
    pytest.param(
        _train("train.deterministic=maybe"), ["train.deterministic"], id="wrong-type-boolean"
    ),
    pytest.param(_train("data.on_error=ignore"), ["data.on_error"], id="unknown-policy"),
    # labels
    pytest.param(
        _train(data="@/label_12.npz"),
        ["label_12.npz", "train_target_majority", "12"],
        id="label-out-of-range",
    ),
    pytest.param(
        _train("model.tasks={majority: {kind: multiclass, num_classes: 5}}"),
        ["model.tasks.majority", "10", "5"],
        id="fewer-classes-than-labels",
    ),
    pytest.param(
        _train("model.tasks={tumour: {kind: binary}}"),
        ["model.tasks.tumour"],
        id="task-the-dataset-lacks",
    ),
    # feature bags
    pytest.param(
        _predict("features.pt", "nan_features.npz"), ["nan_features.npz", "NaN"], id="nan-features"
    ),
    pytest.param(
        _predict("features.pt", "inf_features.npz"), ["inf_features.npz", "inf"], id="inf-features"
    ),
    pytest.param(
        _predict("features.pt", "objects.npy"), ["objects.npy", "pickle"], id="pickled-bag"
    ),
    # tissue
    pytest.param(
        _predict("rgb.pt", "blank.tif", options=("--tissue", "otsu")),
        ["blank.tif", "tissue"],
        id="empty-tissue-otsu",
    ),
    pytest.param(
        _predict("rgb.pt", "slide.tif", options=("--tissue", "@/empty_mask.png")),
        ["slide.tif", "empty_mask.png"],
        id="empty-tissue-mask",
    ),
    # checkpoints
    pytest.param(
        _eval("wider_config.pt", "--data", "@/mm.npz"),
        ["wider_config.pt", "shape"],
        id="weights-do-not-fit-config-eval",
    ),
    pytest.param(
        _predict("wider_config.pt", "grey.png"),
        ["wider_config.pt", "shape"],
        id="weights-do-not-fit-config-predict",
    ),
    pytest.param(
        _predict("other_encoder.pt", "grey.png"),
        ["other_encoder.pt", "'features'"],
        id="checkpoint-of-another-encoder",
    ),
    pytest.param(
        _eval("features.pt", "--data", "@/mm.npz"),
        ["model.encoder", "features"],
        id="feature-model-on-pixel-dataset",
    ),
    pytest.param(
        _eval("unknown_config_key.pt"),
        ["unknown_config_key.pt", "model.depth"],
        id="checkpoint-config-unknown-key",
    ),
    pytest.param(_eval("random_bytes.pt"), ["random_bytes.pt"], id="random-bytes-checkpoint"),
    pytest.param(
        _predict("random_bytes.pt", "grey.png"),
        ["random_bytes.pt"],
        id="random-bytes-checkpoint-predict",
    ),
    pytest.param(_eval("grey.png"), ["grey.png"], id="image-as-checkpoint"),
    pytest.param(_eval("empty.pt"), ["empty.pt", "empty"], id="empty-checkpoint"),
    pytest.param(_eval("untagged.pt"), ["untagged.pt", "ips checkpoint"], id="untagged-checkpoint"),
    # command-line values
    pytest.param(
        ["make-slide", "--out", "@/s.tif", "--width", "0", "--height", "64", "-q"],
        ["--width"],
        id="slide-width-zero",
    ),
]


def _fill(args: list[str], corpus: Path) -> list[str]:
    return [a.replace("@", str(corpus)) for a in args]


def assert_one_line_error(code: int, stderr: str, named: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ips: error: "), lines[0]
    for text in named:
        assert text in lines[0], f"{text!r} not named in: {lines[0]}"


@pytest.mark.parametrize(("args", "named"), CASES)
def test_bad_input_exits_2_with_one_line_naming_the_file_or_field(corpus, capsys, args, named):
    code = main(_fill(args, corpus))
    assert_one_line_error(code, capsys.readouterr().err, named)


def test_bad_input_fails_before_any_output_is_written(corpus, tmp_path):
    good, missing = str(corpus / "grey.png"), str(tmp_path / "nowhere.png")
    out = tmp_path / "predictions"
    args = ["predict", "--checkpoint", str(corpus / "grey.pt"), good, missing, "--out", str(out)]
    assert main([*args, "--fail-fast", "--no-pictures", "-q"]) == 2
    assert not out.exists()  # the good input before the missing one was not predicted first
    run = tmp_path / "run"
    assert main(_fill(_train("selection.memory_size=0"), corpus) + ["--out", str(run)]) == 2
    assert not run.exists()


def test_debug_shows_the_traceback_instead(corpus):
    with pytest.raises(ValueError, match="selection.memory_size"):
        main(_fill(_train("selection.memory_size=0"), corpus) + ["--debug"])


def test_checkpoints_store_their_config_as_plain_data(corpus):
    payload = ips.load_checkpoint(corpus / "grey.pt")  # weights_only: tensors and plain data

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    assert plain(payload["config"])
    assert (
        payload["config"]["model"]
        == config_to_dict(ips.load_model(corpus / "grey.pt").config)["model"]
    )
