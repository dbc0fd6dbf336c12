"""Denoised smoothing: certify a pretrained classifier through a trained denoiser.

Salman et al. (NeurIPS 2020, "Denoised Smoothing: A Provable Defense for Pretrained
Classifiers") put a denoiser D in front of a classifier f that was trained on clean data
and smooth the composition f ∘ D under Gaussian noise: the certificate of randomized
smoothing (STN Theorem 2, Cohen et al.) holds for *any* base classifier, so it holds for
f ∘ D unchanged (`tfcert.models.denoised` builds it, `tfcert.SmoothedClassifier`
certifies it, `tfcert.export` serves it).  Only D is trained, f never changes.

`DenoiserModel` trains D with one of Salman et al.'s objectives (their Section 3.2):

* ``"mse"``: ``E ‖D(x + δ) − x‖²`` (mean over pixels), δ ~ N(0, σ²I): a plain Gaussian
  denoiser, no classifier needed;
* ``"stab"``: the stability objective, ``E CE(f(D(x + δ)), f(x))``: cross-entropy of the
  frozen classifier on the denoised image against the classifier's *own* label on the
  clean image (the argmax of f(x)), so no true labels are needed (their setting of a
  classifier available by queries or as a white box);
* ``"stab_mse"``: MSE pre-training for the first ``mse_steps`` optimizer steps, then the
  stability objective (their best "Stab+MSE": MSE initialisation, Stab fine-tuning).

The denoiser contract: a Keras model mapping a noisy image ``[batch, H, W, C]`` (on the
[0, 1] scale plus noise) to an image of the classifier's input shape.  A
noise-conditional denoiser that wants σ can close over it (σ is fixed per model).  A
diffusion model serves as a one-shot denoiser (Carlini et al., ICLR 2023) when wrapped
as such a model: scale ``x + δ`` to ``x_t = sqrt(ᾱ_t)(2(x + δ) − 1)`` with t chosen so
that ``(1 − ᾱ_t)/ᾱ_t = (2σ)²`` (the noise of the [−1, 1] scale), predict x̂₀ from x_t in
one step and map it back to [0, 1].
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfcert.layers.noise import GaussianNoise
from tfcert.training import _batch_mean

OBJECTIVES = ("mse", "stab", "stab_mse")


@keras.saving.register_keras_serializable(package="tfcert")
class DenoiserModel(keras.Model):
    """Trains a denoiser for a frozen classifier (Salman et al. 2020; module docstring).

    ``compile(optimizer=...)`` is enough (the objective is the model's own) and
    ``fit(x)`` trains the denoiser on clean images ``x`` in [0, 1]; labels, if given, are
    not used, nor are sample weights.  ``model(noisy)`` denoises.  Metrics: ``loss``,
    ``mse`` (always reported), and with a classifier ``stability_loss`` and
    ``agreement`` (fraction of noisy images whose denoised class is f's clean class).

    Args:
        denoiser: Keras model, noisy image → image of the same shape.
        sigma: std of the training noise on the [0, 1] pixel scale (the σ the smoothed
            classifier will use).
        objective: ``"mse"``, ``"stab"`` or ``"stab_mse"`` (module docstring).
        classifier: the classifier f (logits); needed by ``"stab"`` / ``"stab_mse"``.
            It is set non-trainable (``classifier.trainable = False``): never updated.
        mse_steps: ``"stab_mse"``: optimizer steps of MSE pre-training (> 0).
        seed: optional int for reproducible training noise.
        **kwargs: ``keras.Model`` arguments (``name``...).

    Example:

    >>> denoiser = tfcert.models.dncnn((28, 28, 1), depth=8, filters=32)
    >>> model = tfcert.DenoiserModel(denoiser, 0.5, "stab", classifier=clean_classifier)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(x_train, epochs=5, batch_size=128)
    >>> base = tfcert.models.denoised(denoiser, clean_classifier)
    """

    def __init__(self, denoiser: keras.Model, sigma: float, objective: str = "mse",
                 classifier: keras.Model | None = None, mse_steps: int = 0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
        if not (math.isfinite(float(sigma)) and float(sigma) > 0.0):
            raise ValueError(f"sigma must be finite and > 0, got {sigma}")
        if objective != "mse" and classifier is None:
            raise ValueError(f"objective {objective!r} needs the classifier")
        if objective == "stab_mse" and int(mse_steps) < 1:
            raise ValueError(f"objective 'stab_mse' needs mse_steps >= 1, got {mse_steps}")
        shape_in, shape_out = denoiser.input_shape[1:], denoiser.output_shape[1:]
        if tuple(shape_in) != tuple(shape_out):
            raise ValueError(f"the denoiser must return an image of its input's shape, got "
                             f"{denoiser.input_shape} -> {denoiser.output_shape}")
        self.denoiser, self.classifier = denoiser, classifier
        if classifier is not None:
            classifier.trainable = False
        self.sigma, self.objective = float(sigma), objective
        self.mse_steps, self.seed = int(mse_steps), seed
        self.noise = GaussianNoise(sigma, seed=seed, name="training_noise", dtype="float32")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in (
            ("loss", "mse") if classifier is None
            else ("loss", "mse", "stability_loss", "agreement"))}
        self.built = denoiser.built

    def compile(self, optimizer="adam", loss=None, **kwargs):
        """``keras.Model.compile`` with an optimizer only: the objective is the model's own
        (``objective=``), so a ``loss`` is refused rather than silently ignored."""
        if loss is not None:
            raise ValueError(f"DenoiserModel trains its own objective ({self.objective!r}); "
                             "compile it with an optimizer only, not a loss")
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config: dict) -> None:
        """Restores the compiled optimizer when a saved model is loaded (as
        ``keras.Model.compile_from_config``, which skips models with their own `compile`)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)  # so its saved state loads

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return list(self.trackers.values())

    def build(self, input_shape):
        if not self.denoiser.built:
            self.denoiser.build(input_shape)

    def call(self, inputs, training=False):
        return self.denoiser(inputs, training=training)

    def train_step(self, data):
        x = tf.cast(keras.utils.unpack_x_y_sample_weight(data)[0], tf.float32)
        with tf.GradientTape() as tape:
            values = self._objective(x, training=True)
            scaled = self.optimizer.scale_loss(values["loss"])
        weights = self.denoiser.trainable_weights
        self.optimizer.apply(tape.gradient(scaled, weights), weights)
        return self._update(values, tf.shape(x)[0])

    def test_step(self, data):
        """``evaluate`` reports the objective of ``fit`` on held-out images."""
        x = tf.cast(keras.utils.unpack_x_y_sample_weight(data)[0], tf.float32)
        return self._update(self._objective(x, training=False), tf.shape(x)[0])

    def _objective(self, x: tf.Tensor, training: bool) -> dict[str, tf.Tensor]:
        """The batch's losses (module docstring): ``loss``, ``mse`` and, with a
        classifier, ``stability_loss`` and ``agreement``."""
        restored = tf.cast(self.denoiser(self.noise(x), training=training), tf.float32)
        squares = tf.reduce_mean(tf.reshape(tf.square(restored - x), [tf.shape(x)[0], -1]),
                                 axis=1)
        values = {"mse": _batch_mean(squares)}
        if self.classifier is None:
            return {**values, "loss": values["mse"]}
        target = tf.argmax(self.classifier(x, training=False), axis=-1)
        logits = tf.cast(self.classifier(restored, training=False), tf.float32)
        values["stability_loss"] = _batch_mean(keras.losses.sparse_categorical_crossentropy(
            target, logits, from_logits=True))
        values["agreement"] = _batch_mean(tf.cast(tf.argmax(logits, axis=-1) == target,
                                                  tf.float32))
        if self.objective == "mse":
            values["loss"] = values["mse"]
        elif self.objective == "stab":
            values["loss"] = values["stability_loss"]
        else:  # stab_mse: MSE pre-training, then Stab fine-tuning
            pretraining = self.optimizer.iterations < self.mse_steps
            values["loss"] = tf.where(pretraining, values["mse"], values["stability_loss"])
        return values

    def _update(self, values: dict[str, tf.Tensor], batch: tf.Tensor) -> dict[str, tf.Tensor]:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name] * replicas, batch)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def get_config(self) -> dict:
        serialize = keras.saving.serialize_keras_object
        return {**super().get_config(), "denoiser": serialize(self.denoiser),
                "classifier": None if self.classifier is None else serialize(self.classifier),
                "sigma": self.sigma, "objective": self.objective,
                "mse_steps": self.mse_steps, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        for key in ("denoiser", "classifier"):
            if config[key] is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects)
        return cls(**config)
