"""Base classifiers.  Every model maps images in [0, 1] to **logits**.

- ``stn_mnist``: the MNIST model of STN Section 6 (Tramèr et al.'s model A):
  Conv(64, 5x5)-ReLU, Conv(64, 5x5)-ReLU, Dropout 0.25, Flatten, Dense 128-ReLU,
  Dropout 0.5, Dense k (≈45 M multiply-adds per 28x28 image).
- ``cifar_cnn``: STN's CIFAR-10 model has "seven convolutional layers along with
  MaxPooling" and nothing more is published; we use the VGG-style stack
  2x Conv(64) - pool - 2x Conv(128) - pool - 3x Conv(256) - pool, 3x3 'same' convs
  with ReLU, then Dense 256-ReLU, Dropout 0.5, Dense k.
- ``small_cnn``: a tiny CNN for 8x8 ``digits`` and fast tests.
- ``dncnn``: the DnCNN denoiser (Zhang et al. 2017) of denoised smoothing
  (:mod:`tfcert.denoising`): it maps a noisy image to a denoised image, not to logits;
  ``denoised(denoiser, classifier)`` chains the two into one classifier.
- ``app:<Name>``: any ``keras.applications`` model (e.g. ``app:ResNet50``) with its own
  ``preprocess_input`` inside the model, so it too takes [0, 1] images; ImageNet
  weights with ``weights="imagenet"`` (needs the weights file in the Keras cache).

Any other model that expects [0, 255] pixels or normalized inputs is wrapped by
``with_preprocessing(model, scale=255.0, mean=..., std=...)`` so that it takes [0, 1]
images too: noise is then added on the [0, 1] scale of σ and ε, never on another.

The logits are float32 under any Keras mixed-precision policy (the last layer computes
in float32), so losses, softmaxes and argmaxes keep float32 resolution.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
from keras import layers

from tfcert.layers.preprocessing import Preprocessing

MODEL_NAMES = ("stn_mnist", "cifar_cnn", "small_cnn", "app:<Name>")


def stn_mnist(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Model:
    """The STN MNIST CNN (Tramèr et al. 2017, model A) giving logits."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(64, 5, activation="relu"),
        layers.Conv2D(64, 5, activation="relu"),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(num_classes, dtype="float32"),
    ], name="stn_mnist")


def cifar_cnn(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """Seven 3x3 conv layers with max pooling (STN's CIFAR-10 model, see module doc)."""
    stack: list[keras.layers.Layer] = [keras.Input(input_shape)]
    for filters, convs in ((64, 2), (128, 2), (256, 3)):
        stack += [layers.Conv2D(filters, 3, padding="same", activation="relu") for _ in range(convs)]
        stack.append(layers.MaxPooling2D())
    stack += [layers.Flatten(), layers.Dense(256, activation="relu"), layers.Dropout(0.5),
              layers.Dense(num_classes, dtype="float32")]
    return keras.Sequential(stack, name="cifar_cnn")


def small_cnn(input_shape=(8, 8, 1), num_classes: int = 10) -> keras.Model:
    """A tiny CNN (two 3x3 convs, one dense layer) for 8x8 digits and tests."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(num_classes, dtype="float32"),
    ], name="small_cnn")


def dncnn(input_shape=(28, 28, 1), depth: int = 17, filters: int = 64) -> keras.Model:
    """DnCNN (Zhang et al. 2017, "Beyond a Gaussian Denoiser"): residual learning of the
    noise.  Conv(filters, 3x3)-ReLU, ``depth − 2`` x [Conv(filters, 3x3)-BatchNorm-ReLU],
    Conv(C, 3x3) predicts the noise v̂ of the input y, and the output is ``y − v̂`` (the
    denoised image, float32).  The paper's 17 layers of 64 filters suit 40x40 to
    ImageNet crops; on 28x28 MNIST or 32x32 CIFAR images a shallower, narrower net
    (e.g. depth 8, 32 filters) trains in minutes on a CPU.

    Args:
        input_shape: (H, W, C); any H, W work (fully convolutional, 'same' padding).
        depth: number of conv layers, >= 2.
        filters: feature maps of the hidden layers.

    Example:

    >>> denoiser = tfcert.models.dncnn((28, 28, 1), depth=8, filters=32)
    """
    if int(depth) < 2 or int(filters) < 1:
        raise ValueError(f"dncnn needs depth >= 2 and filters >= 1, got {depth}, {filters}")
    noisy = keras.Input(input_shape)
    h = layers.Conv2D(filters, 3, padding="same", activation="relu")(noisy)
    for _ in range(int(depth) - 2):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = layers.Activation("relu")(layers.BatchNormalization()(h))
    noise = layers.Conv2D(input_shape[-1], 3, padding="same", dtype="float32")(h)
    denoised = layers.Subtract(dtype="float32")([noisy, noise])
    return keras.Model(noisy, denoised, name="dncnn")


def denoised(denoiser: keras.Model, classifier: keras.Model) -> keras.Model:
    """``classifier ∘ denoiser`` as one Keras model (images in [0, 1] to logits): the base
    model of denoised smoothing, to wrap in `tfcert.SmoothedClassifier` (Salman et al.
    2020).  The denoiser's output must have the classifier's input shape.

    Example:

    >>> base = tfcert.models.denoised(denoiser, classifier)
    >>> sc = tfcert.SmoothedClassifier(base, 10, tfcert.layers.GaussianNoise(0.5))
    """
    shape, wanted = tuple(denoiser.output_shape[1:]), tuple(classifier.input_shape[1:])
    if len(shape) != len(wanted) or any(a is not None and b is not None and a != b
                                        for a, b in zip(shape, wanted)):
        raise ValueError(f"the denoiser's output {denoiser.output_shape} does not fit the "
                         f"classifier's input {classifier.input_shape}")
    images = keras.Input(denoiser.input_shape[1:])
    return keras.Model(images, classifier(denoiser(images)), name="denoised_classifier")


def with_denoiser(classifier: keras.Model, denoiser: keras.Model | None) -> keras.Model:
    """``classifier``, or `denoised` ``(denoiser, classifier)`` when a denoiser is given."""
    return classifier if denoiser is None else denoised(denoiser, classifier)


def keras_application(name: str, input_shape, num_classes: int,
                      weights: str | None = None) -> keras.Model:
    """Wraps ``keras.applications.<name>`` so it takes [0, 1] images and returns logits."""
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor):
        raise ValueError(f"keras.applications has no model {name!r}")
    module = _application_module(name)
    backbone = constructor(include_top=True, weights=weights, input_shape=tuple(input_shape),
                           classes=num_classes, classifier_activation=None)
    model = with_preprocessing(backbone, 255.0, preprocess=module.preprocess_input,
                               name=f"app_{name}")
    if keras.mixed_precision.global_policy().compute_dtype != "float32":
        # The backbone's classifier computes in the policy's 16-bit dtype: cast its
        # logits back, so that losses and argmaxes see float32 (Keras' mixed-precision
        # advice); under float32 the layer would be a no-op, so it is left out.
        outputs = layers.Activation("linear", dtype="float32", name="logits")(model.outputs[0])
        model = keras.Model(model.inputs, outputs, name=model.name)
    return model


def with_preprocessing(model: keras.Model, scale: float = 255.0,
                       mean: float | Sequence[float] | None = None,
                       std: float | Sequence[float] | None = None,
                       preprocess: Callable | None = None, name: str | None = None) -> keras.Model:
    """``model`` behind `tfcert.layers.Preprocessing`: a model that takes [0, 1] images
    (tfcert's scale, that of σ and ε) from one that expects ``(scale · x − mean) / std``.

    Args:
        model: a Keras model of images at its own scale (e.g. [0, 255] pixels).
        scale: its pixel range over [0, 1] (255.0 for [0, 255]; 1.0 for [0, 1]).
        mean: subtracted after scaling, a number or one per channel (None: nothing).
        std: divides after that, a number or one per channel (None: nothing).
        preprocess: a function of Keras ops applied last (e.g. a ``keras.applications``
            module's ``preprocess_input``).
        name: the wrapped model's name (default: ``model``'s with ``_preprocessed``).

    Example:

    >>> imagenet_style = tfcert.models.with_preprocessing(
    ...     model, scale=255.0, mean=[123.7, 116.3, 103.5], std=[58.4, 57.1, 57.4])
    """
    inputs = keras.Input(model.input_shape[1:])
    scaled = Preprocessing(scale, mean, std)(inputs)
    outputs = model(scaled if preprocess is None else preprocess(scaled))
    return keras.Model(inputs, outputs, name=name or f"{model.name}_preprocessed")


def _application_module(name: str):
    for module_name in dir(keras.applications):
        module = getattr(keras.applications, module_name)
        if getattr(module, name, None) is getattr(keras.applications, name) and hasattr(
                module, "preprocess_input"):
            return module
    raise ValueError(f"no preprocess_input found for keras.applications.{name}")


_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "stn_mnist": stn_mnist, "cifar_cnn": cifar_cnn, "small_cnn": small_cnn}


def build(name: str, input_shape, num_classes: int) -> keras.Model:
    """Builds the base classifier ``name`` (see module doc) for the given input shape."""
    if name.startswith("app:"):
        return keras_application(name[4:], input_shape, num_classes)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](tuple(input_shape), num_classes)
