"""Your own data: image folders, .npz files, a tfds dataset built here and arrays, read with one
syntax by certify, attack, train, export and the run API; bad input refused in one line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, run_in_process
from tfcert import data, results

SIZE = 16  # 16x16 RGB images: tiny but enough for two 3x3 convs


def rgb_images(count_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two easy classes of uint8 RGB images: reddish ("cat") and bluish ("dog") with noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 80, (2 * count_per_class, SIZE, SIZE, 3))
    base = np.repeat(np.array([[170, 40, 40], [40, 40, 170]]), count_per_class, axis=0)
    x = np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return x, np.repeat(np.arange(2), count_per_class)


def write_folder(root, x: np.ndarray, y: np.ndarray, names=("cat", "dog")) -> str:
    """PNGs ``root/<class>/<i>.png``; returns ``root``."""
    for i, (image, label) in enumerate(zip(x, y)):
        folder = os.path.join(root, names[label])
        os.makedirs(folder, exist_ok=True)
        tf.io.write_file(os.path.join(folder, f"{i:03d}.png"), tf.io.encode_png(image))
    return str(root)


@pytest.fixture(scope="module")
def arrays():
    return rgb_images(10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, arrays):
    return write_folder(tmp_path_factory.mktemp("images"), *arrays)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory, arrays):
    """A tiny Keras model trained "elsewhere" (plain Keras) on the folder's images in [0, 1]."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(arrays[0] / 255.0, arrays[1], epochs=20, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    model.save(path)
    return path


def certify(*args):
    from tfcert import runs

    return run_in_process(runs.certify, runs.CertifyConfig, args)


def attack(*args):
    from tfcert import runs

    return run_in_process(runs.attack, runs.AttackConfig, args)


def one_line_error(proc) -> str:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[-1]


def test_folder_gives_the_png_pixels_on_the_unit_scale_in_class_order(folder, arrays):
    split = data.read(f"dir:{folder}")
    x, y = zip(*split.dataset.as_numpy_iterator())
    # PNG is lossless and a resize to the same size is the identity, so the pixels come back
    # exactly: uint8 / 255 in float32 (same division on both sides).
    np.testing.assert_array_equal(np.stack(x), (arrays[0] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(y, arrays[1])
    assert split.info == data.DatasetInfo((SIZE, SIZE, 3), 2, None, ("cat", "dog"))
    assert split.identity["class_names"] == ["cat", "dog"]
    assert len(split.identity["data_sha256"]) == 64
    assert data.info(f"dir:{folder}") == split.info


def test_npz_uint8_and_float_and_arrays_are_the_same_data(tmp_path, arrays):
    x, y = arrays
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    np.savez(tmp_path / "f.npz", x=(x / 255.0).astype(np.float32), y=y,
             class_names=np.array(["cat", "dog"]))
    u8, f = data.read(f"npz:{tmp_path}/u8.npz"), data.read(f"npz:{tmp_path}/f.npz")
    images = np.stack([image for image, _ in u8.dataset.as_numpy_iterator()])
    assert images.dtype == np.float32 and images.max() <= 1.0 and images.max() > 0.6
    np.testing.assert_array_equal(images, (x / 255.0).astype(np.float32))  # scaled once
    assert u8.identity["data_sha256"] == f.identity["data_sha256"]  # same pixels, same data
    assert f.info.class_names == ("cat", "dog") and u8.info.class_names is None
    memory = data.in_memory(tf.data.Dataset.from_tensor_slices((x, y)).batch(7))
    assert memory.sha256 == u8.identity["data_sha256"] and str(memory).startswith("arrays:")


@pytest.mark.parametrize("make, message", [
    (lambda d: os.makedirs(d), "has no class subfolders"),
    (lambda d: os.makedirs(d / "cat"), "holds no images"),
    (lambda d: (write_folder(d, *rgb_images(1)), (d / "dog" / "bad.png").write_bytes(b"no")),
     "bad.png does not decode as an image"),
    (lambda d: (write_folder(d, *rgb_images(1)), tf.io.write_file(
        str(d / "dog" / "gray.png"), tf.io.encode_png(np.zeros((SIZE, SIZE, 1), np.uint8)))),
     "gray.png has 1 channels but"),
    (lambda d: (write_folder(d, *rgb_images(1)), tf.io.write_file(
        str(d / "dog" / "small.png"), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))),
     "small.png is 8x8 but .* is 16x16: pass --image_size=H,W"),
])
def test_bad_folders_are_one_line_errors_naming_the_file(tmp_path, make, message):
    make(tmp_path / "d")
    with pytest.raises(data.DataError, match=message):
        data.read(f"dir:{tmp_path / 'd'}")


def test_image_size_resizes_a_folder_of_mixed_sizes(tmp_path):
    root = write_folder(tmp_path, *rgb_images(1))
    tf.io.write_file(str(tmp_path / "dog" / "small.png"),
                     tf.io.encode_png(np.full((8, 8, 3), 255, np.uint8)))
    split = data.read(f"dir:{root}", image_size=("12", "12"))
    images = np.stack([image for image, _ in split.dataset.as_numpy_iterator()])
    assert images.shape == (3, 12, 12, 3) and split.info.image_shape == (12, 12, 3)
    # bilinear resizing mixes pixel values, never leaves [0, 1]; white stays white up to
    # float32 rounding of the interpolation weights (≈ 1e-7)
    assert images.min() >= 0 and np.allclose(images[-1], 1.0, atol=1e-6)


@pytest.mark.parametrize("arrays_of, message", [
    (lambda x, y: {"x": x}, "has no array 'y'"),
    (lambda x, y: {"x": x.astype(np.int32), "y": y}, "x must be uint8 in \\[0, 255\\] or float"),
    (lambda x, y: {"x": x.astype(np.float32), "y": y}, "float x must be in \\[0, 1\\]"),
    (lambda x, y: {"x": np.full(x.shape, np.nan, np.float32), "y": y}, "NaN or Inf"),
    (lambda x, y: {"x": x, "y": y.astype(np.float32)}, "y must be integer labels"),
    (lambda x, y: {"x": x, "y": y[:-1]}, "y must be integer labels \\[2\\]"),
])
def test_bad_npz_files_are_one_line_errors(tmp_path, arrays_of, message):
    x, y = rgb_images(1)
    np.savez(tmp_path / "bad.npz", **arrays_of(x, y))
    with pytest.raises(data.DataError, match=message):
        data.read(f"npz:{tmp_path}/bad.npz")


@pytest.mark.slow  # seven runs: ≈ 8 s
def test_certify_and_attack_a_folder_end_to_end_and_refuse_changed_data(
        folder, rgb_model, tmp_path):
    out = tmp_path / "certify"
    args = [f"--model={rgb_model}", f"--dataset=dir:{folder}", "--sigma=0.25",
            "--num_samples=100", "--num_examples=6", "--stride=3", f"--output_dir={out}"]
    done = certify(*args)
    assert done.returncode == 0, done.stderr
    rows = results.read_tsv(str(out / "certify.tsv"))
    assert [r["index"] for r in rows] == ["0", "3", "6", "9", "12", "15"]
    assert [r["label"] for r in rows] == ["0"] * 4 + ["1"] * 2  # cat = 0, dog = 1
    assert all(sum(map(int, r["counts"].split(","))) == 100 for r in rows)
    assert (out / "certified_accuracy.png").exists() and (out / "summary.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["cat", "dog"] and len(config["data_sha256"]) == 64

    moved = tmp_path / "moved"  # the same images elsewhere are the same data
    subprocess.run(["cp", "-r", folder, str(moved)], check=True)
    assert certify(*args[:1], f"--dataset=dir:{moved}", *args[2:]).returncode == 1  # path
    again = certify(*args)
    assert again.returncode == 0 and results.read_tsv(str(out / "certify.tsv")) == rows

    original = (out / "config.json").read_text()
    changed = write_folder(tmp_path / "changed", *rgb_images(10, seed=1))
    refused = certify(*args[:1], f"--dataset=dir:{changed}", *args[2:])
    assert "--data_sha256" in one_line_error(refused)
    (moved / "cat" / "000.png").write_bytes((moved / "cat" / "001.png").read_bytes())
    other = certify(*args[:1], f"--dataset=dir:{moved}", *args[2:-1], f"--output_dir={out}2")
    assert other.returncode == 0
    resumed = certify(*args[:1], f"--dataset=dir:{moved}", *args[2:-1], f"--output_dir={out}2")
    assert resumed.returncode == 0
    tf.io.write_file(str(moved / "cat" / "000.png"), tf.io.encode_png(rgb_images(1, 5)[0][0]))
    edited = certify(*args[:1], f"--dataset=dir:{moved}", *args[2:-1], f"--output_dir={out}2")
    assert "--data_sha256" in one_line_error(edited)
    assert (out / "config.json").read_text() == original

    attacked = attack(f"--model={rgb_model}", f"--dataset=dir:{folder}", "--eps=0.01,0.5",
                      "--steps=5", "--num_examples=4", f"--output_dir={tmp_path / 'attack'}")
    assert attacked.returncode == 0, attacked.stderr
    rows = results.read_tsv(str(tmp_path / "attack" / "attack.tsv"))
    assert len(rows) == 8 and (tmp_path / "attack" / "robust_accuracy.png").exists()


def test_a_model_that_does_not_fit_the_folder_is_refused_before_any_output(
        folder, rgb_model, tmp_path):
    small = write_folder(tmp_path / "small", (rgb_images(1)[0][:, :8, :8]), np.arange(2))
    three = write_folder(tmp_path / "three", *rgb_images(1), names=("a", "b"))
    os.makedirs(tmp_path / "three" / "c")  # a third class, without images
    for dataset, message in [(f"dir:{small}", "takes images of shape .16, 16, 3.*--image_size"),
                             (f"dir:{three}", "gives 2 outputs, but .* has 3 classes")]:
        out = tmp_path / "out"
        proc = certify(f"--model={rgb_model}", f"--dataset={dataset}", "--sigma=0.25",
                       f"--output_dir={out}")
        assert re.search(message, one_line_error(proc))
        assert not (out / "config.json").exists()
    resized = certify(f"--model={rgb_model}", f"--dataset=dir:{small}", "--image_size=16,16",
                      "--sigma=0.25", "--num_samples=20", f"--output_dir={tmp_path / 'ok'}")
    assert resized.returncode == 0, resized.stderr


def test_run_api_takes_arrays_and_resumes_them(arrays, rgb_model, tmp_path):
    from tfcert import runs

    x, y = arrays
    config = dict(model=rgb_model, sigma=0.25, num_samples=50, num_examples=4,
                  output_dir=str(tmp_path / "run"))
    rows = runs.certify(runs.CertifyConfig(dataset=(x, y), **config))
    assert [r["label"] for r in rows] == ["0"] * 4
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["dataset"].startswith("arrays:") and "data_sha256" in recorded
    assert runs.certify(runs.CertifyConfig(dataset=(x / 255.0, y), **config)) == rows
    with pytest.raises(results.RunConfigMismatchError, match="data_sha256"):
        runs.certify(runs.CertifyConfig(dataset=(255 - x, y), **config))
    with pytest.raises(ValueError, match="--engine=beam needs data its workers can read"):
        runs.CertifyConfig(dataset=(x, y), engine="beam", **config)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, arrays):
    """A tfds dataset ``tiny_shapes`` prepared here from generated examples (no network)."""
    import tensorflow_datasets as tfds

    x, y = arrays

    class TinyShapes(tfds.core.GeneratorBasedBuilder):  # registered as "tiny_shapes"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                    "label": tfds.features.ClassLabel(names=["cat", "dog"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(0, 20, 2)),
                    "test": self._generate_examples(range(1, 20, 2))}

        def _generate_examples(self, indices):
            for i in indices:
                yield i, {"image": x[i], "label": int(y[i])}

    root = str(tmp_path_factory.mktemp("tfds"))
    TinyShapes(data_dir=root).download_and_prepare()
    return root


def test_a_tfds_dataset_with_split_slices(tfds_dir, arrays, rgb_model, tmp_path):
    split = data.read("tiny_shapes", "test[:40%]", tfds_dir)
    assert split.info.image_shape == (SIZE, SIZE, 3) and split.info.class_names == ("cat", "dog")
    assert split.identity["data_source"] == "tfds:tiny_shapes/1.0.0"
    x = np.stack([image for image, _ in split.dataset.as_numpy_iterator()])
    assert x.shape == (4, SIZE, SIZE, 3)
    expected = (arrays[0][1:20:2] / 255.0).astype(np.float32)
    # every image is one of the test split's, on the unit scale: tfds' PNGs are lossless, and
    # tfds images go through tf.image.convert_image_dtype (x · float32(1/255), the named tfds
    # datasets' conversion) rather than x / 255: at most an ulp apart (6e-8 below 1)
    assert all(min(np.abs(image - e).max() for e in expected) < 1e-6 for image in x)
    with pytest.raises(data.DataError, match="unknown split 'nope' of tiny_shapes"):
        data.read("tiny_shapes", "nope", tfds_dir)
    with pytest.raises(data.DataError, match="unknown --dataset=no_such_tfds_name"):
        data.read("no_such_tfds_name")
    done = certify(f"--model={rgb_model}", "--dataset=tiny_shapes", f"--data_dir={tfds_dir}",
                   "--split=test[:40%]", "--sigma=0.25", "--num_samples=20",
                   f"--output_dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert len(results.read_tsv(str(tmp_path / "run" / "certify.tsv"))) == 4


def test_train_on_a_folder_holds_out_its_validation_split(folder, tmp_path):
    from tfcert import runs

    config = dict(dataset=f"dir:{folder}", model="small_cnn", method="gaussian", sigma=0.25,
                  epochs=1, batch_size=8, output_dir=str(tmp_path / "train"))
    with pytest.raises(ValueError, match="is one split: pass --validation_split"):
        runs.train(runs.TrainConfig(**config))
    assert not (tmp_path / "train" / "config.json").exists()
    metrics = runs.train(runs.TrainConfig(validation_split=0.2, **config))
    assert 0 <= metrics["clean_accuracy"] <= 1
    recorded = json.loads((tmp_path / "train" / "config.json").read_text())
    assert recorded["class_names"] == ["cat", "dog"]


def test_with_preprocessing_wraps_a_model_of_another_scale(tmp_path, arrays):
    import keras

    from tfcert import models

    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]
    wrapped = models.with_preprocessing(inner, scale=255.0, mean=mean, std=std)
    x = arrays[0][:4]
    expected = inner((x - np.array(mean)) / np.array(std)).numpy()
    # float32 arithmetic in a different order ((x/255)·255 vs x): ≈ 1e-5 relative error
    np.testing.assert_allclose(wrapped(x / 255.0).numpy(), expected, rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "wrapped.keras")
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x / 255.0).numpy(), wrapped(x / 255.0).numpy())
    with pytest.raises(ValueError, match="std must not be 0"):
        models.with_preprocessing(inner, std=0.0)


@pytest.mark.slow  # a new Python importing TensorFlow and exporting: ≈ 15 s
def test_export_reads_the_folder_for_geometry_and_class_names(folder, rgb_model, tmp_path):
    import keras

    from tfcert import models

    wrapped = str(tmp_path / "wrapped.keras")  # loaded by a new Python: Preprocessing registered
    models.with_preprocessing(keras.models.load_model(rgb_model), scale=1.0).save(wrapped)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "export"), f"--model={wrapped}", "--sigma=0.25",
         f"--dataset=dir:{folder}", "--num_samples=50", f"--base_dir={tmp_path}",
         "--name=own"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "own" / "1" / "assets" / "tfcert_config.json").read_text())
    assert config["metadata"]["class_names"] == ["cat", "dog"]
    assert config["image_shape"] == [SIZE, SIZE, 3] and config["num_classes"] == 2
