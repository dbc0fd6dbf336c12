"""A folder of RGB images of two classes and a Keras model trained on it "elsewhere", offline.

    python examples/make_image_folder.py --output_dir=my_data

writes ``my_data/images/{digit_0,digit_1}/*.png``: scikit-learn's 8x8 digits 0 and 1 (shipped
with scikit-learn, no download), upscaled to 16x16 and colourised with a random tint
per image, and ``my_data/classifier.keras``: a small CNN trained on them with plain
Keras (no tfcert), with Gaussian noise augmentation, on [0, 255] pixels as many
models are, so it is certified behind ``tfcert.models.with_preprocessing``.  The
README's "Your own data" section starts from these two.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

CLASSES = ("digit_0", "digit_1")  # sorted as Keras orders the subfolders: label i


def make_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits 0 and 1 as uint8 RGB 16x16 images with a random tint each, and their labels.

    Args:
        seed: the tints' random seed.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < len(CLASSES)
    gray = np.kron(digits.images[keep] / 16.0, np.ones((2, 2)))  # 8x8 -> 16x16
    tint = np.random.default_rng(seed).uniform(0.4, 1.0, (len(gray), 1, 1, 3))
    return (gray[..., None] * tint * 255).round().astype(np.uint8), digits.target[keep]


def write_folder(images: np.ndarray, labels: np.ndarray, folder: str) -> None:
    """``folder/<class name>/<i>.png`` for every image.

    Args:
        images: uint8 RGB images [N, H, W, 3].
        labels: their classes, indices into `CLASSES`.
        folder: where to write.
    """
    import tensorflow as tf

    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, CLASSES[label]), exist_ok=True)
        tf.io.write_file(os.path.join(folder, CLASSES[label], f"{i:04d}.png"),
                         tf.io.encode_png(image))


def train_classifier(images: np.ndarray, labels: np.ndarray, path: str) -> None:
    """A small CNN of [0, 255] pixels giving logits, trained with plain Keras under noise
    of σ = 0.25 on the [0, 1] scale (after its own rescaling), saved to ``path``.

    Args:
        images: uint8 RGB images [N, H, W, 3].
        labels: their classes.
        path: the ``.keras`` file to write.
    """
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(images.shape[1:]),
        keras.layers.Rescaling(1 / 255),
        keras.layers.GaussianNoise(0.25),  # training only, as Keras' layer is
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(len(CLASSES)),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(images.astype("float32"), labels, epochs=15, batch_size=32, verbose=0)
    model.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="my_data")
    out = parser.parse_args().output_dir
    images, labels = make_images()
    write_folder(images, labels, os.path.join(out, "images"))
    train_classifier(images, labels, os.path.join(out, "classifier.keras"))
    print(f"{len(images)} images in {out}/images/{{{','.join(CLASSES)}}}/, "
          f"a Keras model of [0, 255] pixels in {out}/classifier.keras")


if __name__ == "__main__":
    main()
