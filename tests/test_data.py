"""Datasets: IDX reading, the shipped Fashion-MNIST subset, image folders with bad files, build_dataset errors."""

import gzip
import logging

import numpy as np
import pytest
from PIL import Image

from engine.data import (
    FASHION_MNIST_CLASSES,
    IdxDataset,
    ImageFolderDataset,
    build_dataset,
    embedded_dataset,
    read_idx,
    write_idx,
)
from engine.data.datasets import FASHION_MNIST_SYSTEM_DIR


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_dataset_samples_are_rgb_with_labels(tmp_path):
    images = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "y.gz", np.array([3, 0, 1, 3], dtype=np.uint8))
    dataset = IdxDataset(tmp_path / "x.gz", tmp_path / "y.gz")
    image, label = dataset[3]
    assert len(dataset) == 4 and label == 3 and dataset.classes == ["0", "1", "2", "3"]
    assert image.dtype == np.uint8 and image.shape == (6, 5, 3)  # RGB [H, W, 3], grey repeated
    np.testing.assert_array_equal(np.asarray(image)[..., 1], images[3])


def test_idx_bad_magic_is_a_clear_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(12))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_idx_size_mismatches_are_clear_errors(tmp_path):
    raw = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(7)  # header says 10 bytes, 7 present
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "short.gz")
    write_idx(tmp_path / "x", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "y", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        IdxDataset(tmp_path / "x", tmp_path / "y")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


def test_embedded_fashion_mnist():
    train, test = embedded_dataset("fashion_mnist", "train"), build_dataset("embedded:fashion_mnist", "test")
    assert (len(train), len(test)) == (6000, 1000)
    assert train.classes == list(FASHION_MNIST_CLASSES) and len(train.classes) == 10
    assert set(train.targets) == set(range(10))
    image, label = train[0]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and label == 9  # the first train image: ankle boot
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        build_dataset("embedded:cifar10")


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_full_fashion_mnist_from_debian_package():
    full = build_dataset("fashion_mnist_full", "test")
    assert len(full) == 10000 and full.classes == list(FASHION_MNIST_CLASSES)
    subset = embedded_dataset("fashion_mnist", "test")
    np.testing.assert_array_equal(full.images[:1000], subset.images)  # the shipped subset is the first 1000


def test_idx_directory_as_data_path(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    assert len(build_dataset(tmp_path, "test")) == 2
    with pytest.raises(FileNotFoundError, match="no IDX files for split 'train'"):
        build_dataset(tmp_path, "train")


def _save_image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def _class_folder(root):
    """root/{cat,dog}: 3 cats, 2 dogs, plus a corrupt .jpg and a .txt file among the cats."""
    for i in range(3):
        _save_image(root / "cat" / f"c{i}.png", (200, 10 * i, 0))
    for i in range(2):
        _save_image(root / "dog" / f"d{i}.JPG", (0, 0, 200))  # upper-case extension, lossy: compare loosely
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored: hidden")


def test_image_folder_skips_corrupt_and_non_image_files(tmp_path, caplog):
    _class_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(tmp_path, check_headers=True)
    assert dataset.classes == ["cat", "dog"]
    assert [p.rsplit("/", 1)[1] for p, _ in dataset.samples] == ["c0.png", "c1.png", "c2.png", "d0.JPG", "d1.JPG"]
    assert dataset.targets == [0, 0, 0, 1, 1]  # the bad files did not shift any label
    assert dataset.num_skipped == 1 and dataset.skipped_files[0].endswith("broken.jpg")
    assert [p.rsplit("/", 1)[1] for p in dataset.ignored_files] == ["notes.txt"]
    assert "skipped 1 file" in caplog.text
    image, label = dataset[4]
    assert label == 1 and image.shape[2] == 3 and np.abs(image[0, 0].astype(int) - (0, 0, 200)).max() < 5


def test_image_that_fails_to_decode_late_is_replaced_by_same_class(tmp_path, caplog):
    _class_folder(tmp_path)
    truncated = tmp_path / "cat" / "c1.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])  # header intact, pixel data cut
    dataset = ImageFolderDataset(tmp_path, check_headers=True)
    assert len(dataset) == 5  # passes the header check
    with caplog.at_level(logging.WARNING):
        image, label = dataset[1]
    assert label == 0 and tuple(image[0, 0]) == (200, 20, 0)  # c2.png, the next cat
    assert dataset.num_skipped == 2 and "cannot decode" in caplog.text


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        _save_image(tmp_path / f"img{i}.png", (i, i, i))
    (tmp_path / "readme.md").write_text("x")
    dataset = build_dataset(tmp_path, "train")
    assert len(dataset) == 3 and dataset.classes == [] and dataset.targets == [-1, -1, -1]
    assert dataset[2][1] == -1


def test_split_subfolders(tmp_path):
    _save_image(tmp_path / "train" / "a" / "0.png", (1, 1, 1))
    _save_image(tmp_path / "val" / "a" / "0.png", (2, 2, 2))
    _save_image(tmp_path / "val" / "b" / "0.png", (3, 3, 3))
    assert len(build_dataset(tmp_path, "train")) == 1
    assert build_dataset(tmp_path, "test").classes == ["a", "b"]


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no readable image"):
        build_dataset(tmp_path)  # empty folder
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no readable image"):
        build_dataset(tmp_path)  # only non-image files
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder 'empty_class' holds no readable image"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no test or val subfolder"):
        build_dataset(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be"):
        build_dataset("embedded:fashion_mnist", "validation")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_decode_gives_pils_pixels(tmp_path, mode):
    """simplejpeg for RGB and grey JPEGs, PIL for CMYK ones: the same pixels as PIL's decode to RGB, bit for bit."""
    from engine.data.pixels import decode_image, encoded_size

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    path = tmp_path / f"image_{mode}.jpg"
    Image.fromarray(pixels).convert(mode).save(path, quality=90)
    expected = np.asarray(Image.open(path).convert("RGB"))
    decoded = decode_image(path)
    assert decoded.shape == (37, 53, 3) and decoded.dtype == np.uint8 and np.array_equal(decoded, expected)
    assert encoded_size(path.read_bytes()) == (53, 37)
