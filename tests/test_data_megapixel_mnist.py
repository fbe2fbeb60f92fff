import gzip
import logging
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MNIST_TINY
from ips.data.megapixel_mnist import TASKS, MegapixelMNIST, generate_megapixel_mnist
from ips.data.mnist import MnistDigits, load_mnist

CANVAS = (200, 200)
NUM_TRAIN, NUM_TEST = 20, 12


@pytest.fixture(scope="module")
def digits() -> MnistDigits:
    return load_mnist(MNIST_TINY)


@pytest.fixture(scope="module")
def dataset_file(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("megapixel") / "megapixel_mnist.npz"
    return generate_megapixel_mnist(
        out, digits, num_train=NUM_TRAIN, num_test=NUM_TEST, canvas_size=CANVAS, num_noise=15
    )


@pytest.fixture(scope="module")
def stored(dataset_file) -> dict[str, np.ndarray]:
    with np.load(dataset_file, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def digit_placements(stored, split, image):
    """(bitmap (28, 28), label, row, col) of the five digits of one stored image."""
    bitmaps = stored[f"{split}_digit_bitmaps"]
    ids = stored[f"{split}_digit_ids"][image]
    labels = stored[f"{split}_digit_labels"][image]
    positions = stored[f"{split}_digit_positions"][image].astype(int)
    return [
        (bitmaps[d], int(y), int(r), int(c))
        for d, y, (r, c) in zip(ids, labels, positions, strict=True)
    ]


# ------------------------------------------------------------------------------ labels and pixels


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_follow_from_the_stored_digits_and_the_digits_appear_in_the_image(
    digits, dataset_file, stored, split
):
    dataset = MegapixelMNIST(dataset_file, split)
    mnist_labels = getattr(digits, f"{split}_labels")
    mnist_index = stored[f"{split}_digit_mnist_index"]
    assert len(dataset) == (NUM_TRAIN if split == "train" else NUM_TEST)
    for i in range(len(dataset)):
        placements = digit_placements(stored, split, i)
        ids = stored[f"{split}_digit_ids"][i]
        labels = [label for _, label, _, _ in placements]
        # every digit drawn is an MNIST digit of this split carrying the stored label
        assert labels == mnist_labels[mnist_index[ids]].tolist()
        bitmaps = [bitmap for bitmap, _, _, _ in placements]
        assert np.array_equal(bitmaps, getattr(digits, f"{split}_images")[mnist_index[ids]])

        counts = Counter(labels)
        majority, votes = counts.most_common(1)[0]
        assert votes == 3 and len(labels) == 5
        top = min(placements, key=lambda p: (p[2], p[3]))[1]
        multi = np.zeros(10, dtype=np.float32)
        multi[labels] = 1

        targets = dataset.targets(i)
        assert set(targets) == set(TASKS)
        assert targets["majority"].item() == majority
        assert targets["max"].item() == max(labels)
        assert targets["top"].item() == top
        assert torch.equal(targets["multi"], torch.from_numpy(multi))

        image = dataset.render(i)
        for bitmap, _, row, col in placements:
            assert np.array_equal(image[row : row + 28, col : col + 28], bitmap)


def test_targets_of_an_item_equal_targets_without_rendering(dataset_file):
    dataset = MegapixelMNIST(dataset_file, "train")
    item = dataset[3]
    for task, value in dataset.targets(3).items():
        assert torch.equal(item["targets"][task], value)
        assert item["targets"][task].dtype == value.dtype
    assert item["targets"]["majority"].dtype == torch.long
    assert item["targets"]["majority"].shape == ()
    assert item["targets"]["multi"].dtype == torch.float32
    assert item["targets"]["multi"].shape == (10,)


def test_image_is_noise_under_digits_painted_by_maximum(dataset_file, stored):
    dataset = MegapixelMNIST(dataset_file, "train")
    templates = stored["noise_templates"]
    for i in range(4):
        expected = np.zeros(CANVAS, dtype=np.uint8)
        ids, positions = stored["train_noise_ids"][i], stored["train_noise_positions"][i]
        for template, (row, col) in zip(ids, positions.astype(int), strict=True):
            region = expected[row : row + 28, col : col + 28]
            region[...] = np.maximum(region, templates[template])
        for bitmap, _, row, col in digit_placements(stored, "train", i):
            expected[row : row + 28, col : col + 28] = bitmap
        assert np.array_equal(dataset.render(i), expected)


# ------------------------------------------------------------------------------ reproducibility


def test_same_seed_gives_identical_images_and_another_seed_different_ones(digits, tmp_path):
    def generate(name, seed):
        kwargs = dict(num_train=5, num_test=3, canvas_size=CANVAS, num_noise=10, seed=seed)
        return generate_megapixel_mnist(tmp_path / name, digits, **kwargs)

    first, again, other = generate("a.npz", 7), generate("b.npz", 7), generate("c.npz", 8)
    with np.load(first) as a, np.load(again) as b:
        assert a.files == b.files
        for key in a.files:
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    for split in ("train", "test"):
        one, two = MegapixelMNIST(first, split), MegapixelMNIST(again, split)
        three = MegapixelMNIST(other, split)
        for i in range(len(one)):
            assert np.array_equal(one.render(i), one.render(i))
            assert np.array_equal(one.render(i), two.render(i))
        assert any(not np.array_equal(one.render(i), three.render(i)) for i in range(len(one)))


# ------------------------------------------------------------------------------ digit sources


def test_train_and_test_images_use_digits_of_their_own_mnist_split_only(digits, stored):
    test_bytes = {image.tobytes() for image in digits.test_images}
    train_bytes = {image.tobytes() for image in digits.train_images}
    splits = [("train", digits.train_images, test_bytes), ("test", digits.test_images, train_bytes)]
    for split, own, other in splits:
        bitmaps = stored[f"{split}_digit_bitmaps"]
        index = stored[f"{split}_digit_mnist_index"]
        assert len(np.unique(index)) == len(index) == len(bitmaps)
        assert np.array_equal(bitmaps, own[index])
        assert not any(bitmap.tobytes() in other for bitmap in bitmaps)


# ------------------------------------------------------------------------------ layout


def test_digits_never_overlap_and_lie_inside_the_canvas(digits, tmp_path):
    # a crowded canvas makes overlaps likely if placement were wrong
    path = generate_megapixel_mnist(
        tmp_path / "crowded.npz", digits, num_train=300, num_test=1, canvas_size=(140, 140)
    )
    dataset = MegapixelMNIST(path, "train")
    for i in range(len(dataset)):
        boxes = dataset.digit_boxes(i)
        assert boxes.shape == (5, 4)
        assert (boxes[:, 2:] == 28).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + 28 <= 140).all()
        covered = np.zeros((140, 140), dtype=int)
        for row, col, height, width in boxes:
            covered[row : row + height, col : col + width] += 1
        assert covered.max() == 1


@pytest.mark.parametrize("num_noise", [0, 1, 40])
def test_noise_count_is_honoured(digits, tmp_path, num_noise):
    path = generate_megapixel_mnist(
        tmp_path / "noise.npz",
        digits,
        num_train=4,
        num_test=2,
        canvas_size=CANVAS,
        num_noise=num_noise,
    )
    with np.load(path) as npz:
        templates = npz["noise_templates"]
        for split, count in (("train", 4), ("test", 2)):
            assert npz[f"{split}_noise_ids"].shape == (count, num_noise)
            positions = npz[f"{split}_noise_positions"].astype(int)
            assert positions.shape == (count, num_noise, 2)
            assert (positions >= 0).all() and (positions + 28 <= np.array(CANVAS)).all()
    assert templates.shape == (50, 28, 28)
    strokes = templates[templates > 0]
    assert strokes.min() >= 204 and strokes.max() <= 255

    dataset = MegapixelMNIST(path, "train")
    for i in range(len(dataset)):
        outside_digits = np.ones(CANVAS, dtype=bool)
        for row, col, height, width in dataset.digit_boxes(i):
            outside_digits[row : row + height, col : col + width] = False
        noise_pixels = np.count_nonzero(dataset.render(i)[outside_digits])
        if num_noise == 0:
            assert noise_pixels == 0
        else:
            assert noise_pixels > 0


# ------------------------------------------------------------------------------ patches


@pytest.mark.parametrize("patch_size", [50, 30])
def test_patches_reassemble_into_the_rendered_image_in_raster_order(dataset_file, patch_size):
    dataset = MegapixelMNIST(dataset_file, "test", patch_size=patch_size)
    rows, cols = dataset.grid_shape
    assert (rows, cols) == (200 // patch_size, 200 // patch_size)  # the 20 px border is dropped
    assert dataset.num_patches == rows * cols
    item = dataset[2]
    patches = item["patches"]
    assert patches.dtype == torch.uint8
    assert patches.shape == (rows * cols, 1, patch_size, patch_size)
    assert item["index"] == 2
    grid = patches.numpy().reshape(rows, cols, patch_size, patch_size)
    image = grid.transpose(0, 2, 1, 3).reshape(rows * patch_size, cols * patch_size)
    assert np.array_equal(image, dataset.render(2)[: rows * patch_size, : cols * patch_size])


def test_strided_patches_are_the_windows_every_stride_pixels(dataset_file):
    dataset = MegapixelMNIST(dataset_file, "train", patch_size=50, stride=40)
    assert dataset.grid_shape == (4, 4)  # windows start at 0, 40, 80, 120
    patches = dataset[1]["patches"][:, 0].numpy()
    image = dataset.render(1)
    for n, patch in enumerate(patches):
        row, col = divmod(n, 4)
        assert np.array_equal(patch, image[row * 40 : row * 40 + 50, col * 40 : col * 40 + 50])


@pytest.mark.parametrize("stride", [None, 15])
def test_foreground_patches_are_exactly_those_holding_digit_pixels(dataset_file, stored, stride):
    dataset = MegapixelMNIST(dataset_file, "train", patch_size=25, stride=stride)
    step = stride or 25
    rows, cols = dataset.grid_shape
    for i in range(len(dataset)):
        digit_pixels = np.zeros(CANVAS, dtype=bool)
        for bitmap, _, row, col in digit_placements(stored, "train", i):
            digit_pixels[row : row + 28, col : col + 28] = bitmap > 0
        expected = [
            digit_pixels[r * step : r * step + 25, c * step : c * step + 25].any()
            for r in range(rows)
            for c in range(cols)
        ]
        foreground = dataset.foreground_patches(i)
        assert foreground.dtype == bool and foreground.shape == (dataset.num_patches,)
        assert foreground.tolist() == expected
        assert foreground.any()
        if stride is None:  # a 28 px box touches at most 2 x 2 disjoint patches of 25 px
            assert foreground.sum() <= 5 * 4


def test_indices_pick_a_subset_and_the_dataset_survives_pickling(dataset_file):
    full = MegapixelMNIST(dataset_file, "train")
    subset = MegapixelMNIST(dataset_file, "train", indices=[5, 0, 7])
    assert len(subset) == 3
    assert np.array_equal(subset.render(0), full.render(5))
    assert np.array_equal(subset.render(-1), full.render(7))
    assert all(torch.equal(subset.targets(1)[task], full.targets(0)[task]) for task in TASKS)
    with pytest.raises(IndexError):
        subset.render(3)
    restored = pickle.loads(pickle.dumps(subset))
    assert torch.equal(restored[2]["patches"], subset[2]["patches"])


def test_a_dataloader_batches_items(dataset_file):
    dataset = MegapixelMNIST(dataset_file, "train")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["patches"].shape == (4, 16, 1, 50, 50)
    assert batch["targets"]["multi"].shape == (4, 10)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_stored_file_is_compact(digits, tmp_path):
    path = generate_megapixel_mnist(tmp_path / "big.npz", digits, num_train=200, num_test=1)
    assert MegapixelMNIST(path).canvas_size == (1500, 1500)
    assert path.stat().st_size < 2_000_000


# ------------------------------------------------------------------------------ argument errors


def test_bad_arguments_raise_errors_naming_them(digits, dataset_file, tmp_path):
    with pytest.raises(ValueError, match="split"):
        MegapixelMNIST(dataset_file, "val")
    missing = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        MegapixelMNIST(missing)
    with pytest.raises(ValueError, match="patch_size"):
        MegapixelMNIST(dataset_file, patch_size=201)
    with pytest.raises(ValueError, match="indices"):
        MegapixelMNIST(dataset_file, "test", indices=[NUM_TEST])
    for kwargs, name in [
        (dict(canvas_size=(100, 100)), "canvas_size"),
        (dict(canvas_size=(20, 5000)), "canvas_size"),
        (dict(num_train=0), "num_train"),
        (dict(num_test=-1), "num_test"),
        (dict(num_noise=-1), "num_noise"),
    ]:
        with pytest.raises(ValueError, match=name):
            generate_megapixel_mnist(tmp_path / "x.npz", digits, **kwargs)
    assert not (tmp_path / "x.npz").exists()


# ------------------------------------------------------------------------------ load_mnist


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def small_digits(seed=0, train=30, test=10):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, train, dtype=np.uint8),
        rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, test, dtype=np.uint8),
    )


def test_load_mnist_splits_the_x_y_npz_into_60000_train_and_10000_test(tmp_path):
    # the layout of the full MNIST file, with every row told apart by its first two pixels
    rows = np.arange(70000)
    x = np.zeros((70000, 28, 28), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = rows % 256, rows // 256
    y = (rows * 7 % 10).astype(np.uint8)
    path = tmp_path / "mnist.npz"
    np.savez(path, x=x, y=y)
    digits = load_mnist(path)
    assert digits.train_images.shape == (60000, 28, 28)
    assert digits.test_images.shape == (10000, 28, 28)
    assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int64
    assert np.array_equal(digits.train_images, x[:60000])
    assert np.array_equal(digits.test_images, x[60000:])
    assert np.array_equal(digits.train_labels, y[:60000])
    assert np.array_equal(digits.test_labels, y[60000:])
    assert str(path) in digits.source
    np.savez(path, x=x[1:], y=y[1:])
    with pytest.raises(ValueError, match=r"mnist\.npz.*70000 rows"):
        load_mnist(path)


def test_the_shipped_tiny_mnist_holds_30_train_and_10_test_digits_of_every_class():
    digits = load_mnist(MNIST_TINY)
    assert np.bincount(digits.train_labels).tolist() == [30] * 10
    assert np.bincount(digits.test_labels).tolist() == [10] * 10
    train = {image.tobytes() for image in digits.train_images}
    assert len(train) == 300 and not any(image.tobytes() in train for image in digits.test_images)
    assert all(image.max() > 0 for image in digits.train_images)  # real digits, no blanks


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_mnist_reads_a_folder_of_plain_and_gzipped_idx_files(tmp_path, layout):
    x_train, y_train, x_test, y_test = small_digits()
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", x_train, compress=True)
    write_idx(folder / "train-labels-idx1-ubyte", y_train, compress=False)
    write_idx(folder / "t10k-images-idx3-ubyte", x_test, compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", y_test, compress=True)
    digits = load_mnist(tmp_path)
    assert np.array_equal(digits.train_images, x_train)
    assert np.array_equal(digits.train_labels, y_train)
    assert np.array_equal(digits.test_images, x_test)
    assert np.array_equal(digits.test_labels, y_test)
    assert digits.train_labels.dtype == np.int64


def test_load_mnist_takes_the_path_from_the_environment(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = small_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    monkeypatch.setenv("IPS_MNIST", str(path))
    assert np.array_equal(load_mnist(download=False).test_images, x_test)


def test_load_mnist_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_mnist(missing)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="wrong.npz"):
        load_mnist(wrong)
    bad_shape = tmp_path / "bad_shape.npz"
    x_train, y_train, x_test, y_test = small_digits()
    np.savez(bad_shape, x_train=x_train[:, :27], y_train=y_train, x_test=x_test, y_test=y_test)
    with pytest.raises(ValueError, match="bad_shape.npz"):
        load_mnist(bad_shape)
    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, x_train=x_train, y_train=y_train + 10, x_test=x_test, y_test=y_test)
    with pytest.raises(ValueError, match="bad_labels.npz.*0..9"):
        load_mnist(bad_labels)


def test_load_mnist_uses_the_cache_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.delenv("IPS_MNIST", raising=False)
    monkeypatch.setenv("IPS_CACHE", str(tmp_path))
    x_train, y_train, x_test, y_test = small_digits(seed=3)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert np.array_equal(load_mnist(download=False).train_images, x_train)


def test_load_mnist_falls_back_to_scikit_learn_digits_with_a_warning(tmp_path, monkeypatch, caplog):
    pytest.importorskip("sklearn")
    monkeypatch.delenv("IPS_MNIST", raising=False)
    monkeypatch.delenv("IPS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ips.data.mnist"):
        digits = load_mnist(download=False)
    assert any("IPS_MNIST" in record.getMessage() for record in caplog.records)
    assert "scikit-learn" in digits.source
    assert len(digits.train_images) + len(digits.test_images) == 1797
    splits = [(digits.train_images, digits.train_labels), (digits.test_images, digits.test_labels)]
    for images, labels in splits:
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert images.max() == 255
        assert not images[:, :4].any() and not images[:, :, -4:].any()  # MNIST-like margin
        assert set(labels.tolist()) == set(range(10))
    assert not list(tmp_path.iterdir())  # nothing written without a download
