"""Data loaders: offline shapes, ranges, splits, IDX reading and clear errors."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from tfcert import data


@pytest.mark.slow
def test_mnist_subset_split_is_fixed_stratified_and_in_range():
    x_train, y_train = data.load_arrays("mnist_subset", "train")
    x_test, y_test = data.load_arrays("mnist_subset", "test")
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() > 0.99
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    again, _ = data.load_arrays("mnist_subset", "test")
    np.testing.assert_array_equal(again, x_test)
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) < 5  # MNIST has a few duplicates


def test_digits_and_tf_data_pipeline():
    ds = data.load("digits", "train")
    image, label = next(iter(ds))
    assert image.shape == (8, 8, 1) and image.dtype == tf.float32 and label.dtype == tf.int64
    batch = next(iter(data.batched(ds, 32)))
    assert batch[0].shape == (32, 8, 8, 1)
    x, y = data.load_arrays("digits", "test")
    assert x.shape == (360, 8, 8, 1) and 0 <= x.min() and x.max() <= 1 and set(y) == set(range(10))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for split, (images, labels) in data.FASHION_MNIST_FILES.items():
        count = 6 if split == "train" else 4
        _write_idx(tmp_path / images, rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / labels, np.arange(count) % 10)
    return tmp_path


def test_fashion_mnist_reads_idx_files_from_data_dir(fake_fashion):
    x, y = data.load_arrays("fashion_mnist", "train", data_dir=str(fake_fashion))
    assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    np.testing.assert_array_equal(y, np.arange(6))
    image, _ = next(iter(data.load("fashion_mnist", "test", data_dir=str(fake_fashion))))
    assert image.shape == (28, 28, 1)


def test_truncated_idx_file_is_a_clear_error(fake_fashion):
    path = fake_fashion / data.FASHION_MNIST_FILES["train"][0]
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(data.DataUnavailableError, match="truncated"):
        data.load_arrays("fashion_mnist", "train", data_dir=str(fake_fashion))


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", ())
    with pytest.raises(data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(data.DataUnavailableError, match="--download"):
        data.load("cifar10", "test", data_dir=str(tmp_path))


def test_unknown_names_are_rejected():
    with pytest.raises(data.DataError, match="unknown --dataset=nope"):
        data.load("nope")
    with pytest.raises(data.DataError, match="unknown split"):
        data.load_arrays("digits", "validation")


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIRS[0]),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package():
    x, y = data.load_arrays("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and np.bincount(y).tolist() == [1000] * 10
