"""Expectation over transformation (EOT) and the attack losses shared by every attack.

A randomized defense f (a Keras model with a `GaussianNoise`, RandDisc or RandMix layer
in front) is attacked through its *expected* prediction (Athalye et al. 2018; STN
Section 6.2; Zhang & Liang Section 5): the batch is tiled ``samples`` times,
run through the model in **one** forward pass (the layers draw independent noise for
every copy), and the softmax **probabilities** are averaged before the log, as ART's
EOT and SmoothAdv do:

    log p̄(x) = log (1/S) Σ_s softmax(f(x + r_s)),

computed stably as ``logsumexp_s(log_softmax(f(x + r_s))) − log S``.  With S = 1 this is
``log_softmax(f(x))``, whose class differences are the logit differences, so the
Carlini-Wagner margin below equals the usual logit margin for a deterministic model.
Memory grows as ``samples × batch``: lower the batch size for many draws.

**Per-example randomness.**  Every attack turns its ``seed`` into one stateless key per
example (`example_keys`: a ``[batch, 2]`` seed as given, else the seed folded with each
example's position) and draws an example's randomness (random start, proposals) from its
own key only.  A `KeyedDefense` (``base(layer(x))``) takes those keys too: its draws for
example b at the attack's draw number t are ``layer(x_b copies, seed=fold_in(k_b, t))``,
so with keys derived from the examples' dataset indices (``tfcert-attack`` does this with
`tfcert.keys.draw_keys`) an example's adversarial image does not depend on the rest
of its batch, the batch size or the worker.  Any other model (e.g. ``keras.Sequential``
with a randomized layer) draws from its layers' ``SeedGenerator``s, which advance per call.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import keras
import tensorflow as tf

from tfcert.layers.base import RandomizedLayer

#: A custom attack loss: ``loss(y, log_probs) -> per-example loss [batch]`` that the attack
#: maximises; ``log_probs`` are the EOT log-mean-probabilities ``[batch, classes]``.
LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
Loss = Union[str, LossFn]
LOSSES = ("ce", "cw")

Seed = Union[int, tf.Tensor, None]
# Streams of an example's key (`example_keys`): the attack's own draws and the defense's.
ATTACK_STREAM, DEFENSE_STREAM = 0, 1


class KeyedDefense:
    """A defended classifier ``base(layer(x))`` whose random draws can be keyed per example.

    Called like a Keras model (``defense(x, training=False)``) it draws from the layer's
    own generator.  `group_logits` draws per example from stateless keys, which the
    attacks of `tfcert.attacks` use when given one (EOT, Athalye et al. 2018; the
    one-draw-per-query attacker of the boundary attack, STN Appendix D.2).

    Args:
        base: Keras model giving logits.
        layer: the defense's tfcert layer (randomized or a deterministic transformation),
            or None for the undefended model.

    Example:

    >>> defense = tfcert.attacks.KeyedDefense(base, tfcert.layers.GaussianNoise(0.25))
    >>> keys = tfcert.keys.draw_keys(tfcert.keys.run_key(0), 0, indices)
    >>> x_adv = tfcert.attacks.pgd(defense, x, y, 0.1, eot_samples=20, seed=keys)
    """

    def __init__(self, base: keras.Model, layer: keras.layers.Layer | None = None):
        self.base, self.layer = base, layer

    def __call__(self, x, training: bool = False) -> tf.Tensor:
        inputs = x if self.layer is None else self.layer(x)
        return self.base(inputs, training=training)

    def group_logits(self, groups: tf.Tensor, keys: tf.Tensor, draw) -> tf.Tensor:
        """Logits ``[batch, m, classes]`` of ``m`` inputs per example ``groups [batch, m,
        ...]``; example b's inputs go through one layer call seeded
        ``fold_in(keys[b], draw)`` (each input gets its own draw of that call)."""
        shape = tf.shape(groups)
        if isinstance(self.layer, RandomizedLayer):
            fold_in = tf.random.experimental.stateless_fold_in
            draw = tf.cast(draw, tf.int64)
            inputs = tf.map_fn(lambda g: self.layer(g[0], seed=fold_in(g[1], draw)),
                               (groups, tf.cast(keys, tf.int64)),
                               fn_output_signature=tf.TensorSpec(groups.shape[1:], groups.dtype))
            inputs = tf.reshape(inputs, tf.concat([[-1], shape[2:]], 0))
        else:
            inputs = tf.reshape(groups, tf.concat([[-1], shape[2:]], 0))
            inputs = inputs if self.layer is None else self.layer(inputs)
        logits = tf.cast(self.base(inputs, training=False), tf.float32)
        return tf.reshape(logits, [shape[0], shape[1], -1])


def example_keys(seed: tf.Tensor, batch) -> tf.Tensor:
    """One stateless key per example, int64 ``[batch, 2]``: a ``[batch, 2]`` seed as given,
    a ``[2]`` seed folded with each example's position in the batch."""
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 2:
        with tf.control_dependencies([tf.debugging.assert_equal(
                tf.shape(seed)[0], tf.cast(batch, tf.int32),
                message="per-example seeds [batch, 2] need one row per example")]):
            return tf.identity(seed)
    return fold_rows(tf.broadcast_to(seed, tf.stack([batch, 2])), tf.range(batch))


def fold_rows(keys: tf.Tensor, data) -> tf.Tensor:
    """``fold_in(keys[b], data[b])`` per row (``data``: a scalar or one int per row)."""
    keys = tf.cast(keys, tf.int64)
    data = tf.broadcast_to(tf.cast(data, tf.int64), tf.shape(keys)[:1])
    fold_in = tf.random.experimental.stateless_fold_in
    return tf.map_fn(lambda pair: fold_in(pair[0], pair[1]), (keys, data),
                     fn_output_signature=tf.TensorSpec([2], tf.int64))


def eot_log_probs(model: keras.Model | KeyedDefense, x: tf.Tensor, samples,
                  keys: tf.Tensor | None = None, draw=0) -> tf.Tensor:
    """Returns ``log (1/S) Σ_s softmax(model(x)_s)`` over ``S = samples`` forward draws.

    Args:
        model: Keras model (or callable taking ``training=``) mapping images to logits,
            possibly randomized, or a `KeyedDefense`.
        x: images ``[batch, ...]``.
        samples: number S of EOT draws (int or scalar int tensor), ≥ 1.
        keys: per-example keys ``[batch, 2]`` of a `KeyedDefense`'s draws (ignored by
            other models).
        draw: the draw number folded into ``keys`` (a new one for every call).

    Returns:
        float32 ``[batch, classes]`` log-probabilities of the mean prediction.
    """
    samples = tf.cast(samples, tf.int32)
    if keys is not None and isinstance(model, KeyedDefense):
        groups = tf.repeat(x[:, None], samples, axis=1)
        log_probs = tf.nn.log_softmax(model.group_logits(groups, keys, draw))
        return (tf.reduce_logsumexp(log_probs, axis=1)
                - tf.math.log(tf.cast(samples, tf.float32)))
    batch = tf.shape(x)[0]
    multiples = tf.concat([[samples], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
    logits = tf.cast(model(tf.tile(x, multiples), training=False), tf.float32)
    log_probs = tf.nn.log_softmax(tf.reshape(logits, [samples, batch, -1]))
    return tf.reduce_logsumexp(log_probs, axis=0) - tf.math.log(tf.cast(samples, tf.float32))


def margin(y: tf.Tensor, log_probs: tf.Tensor) -> tf.Tensor:
    """Carlini-Wagner margin ``z_y − max_{j≠y} z_j`` per example (< 0 ⇔ misclassified)."""
    y = tf.cast(y, tf.int32)
    true = tf.gather(log_probs, y, batch_dims=1)
    mask = tf.one_hot(y, tf.shape(log_probs)[-1], on_value=True, off_value=False)
    other = tf.reduce_max(tf.where(mask, tf.cast(-float("inf"), log_probs.dtype), log_probs), -1)
    return true - other


def per_example_loss(loss: Loss, y: tf.Tensor, log_probs: tf.Tensor,
                     confidence: tf.Tensor | float = 0.0) -> tf.Tensor:
    """The per-example loss an attack maximises.

    ``"ce"``: cross-entropy ``−log p̄_y``.  ``"cw"``: ``−max(margin + κ, 0)`` (Carlini &
    Wagner's f₆ as used by Madry et al.'s PGD with κ = ``confidence``; it stops growing
    once the wrong class leads by κ).  A callable is called as ``loss(y, log_probs)``.
    """
    check_loss(loss)
    if callable(loss):
        return loss(y, log_probs)
    if loss == "ce":
        return -tf.gather(log_probs, tf.cast(y, tf.int32), batch_dims=1)
    return -tf.nn.relu(margin(y, log_probs) + confidence)


def loss_and_gradient(model: keras.Model | KeyedDefense, x: tf.Tensor, y: tf.Tensor,
                      loss: Loss = "ce", eot_samples=1, confidence: tf.Tensor | float = 0.0,
                      keys: tf.Tensor | None = None, draw=0) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns the per-example EOT loss ``[batch]`` and its gradient with respect to ``x``
    (``keys``, ``draw``: as `eot_log_probs`)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        values = per_example_loss(loss, y, eot_log_probs(model, x, eot_samples, keys, draw),
                                  confidence)
        total = tf.reduce_sum(values)
    return values, tape.gradient(total, x)


def check_loss(loss: Loss) -> None:
    """Raises `ValueError` for a loss that is neither a callable nor one of `LOSSES`."""
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES} or pass a callable")


def check_finite(**arguments) -> None:
    """Raises `ValueError` naming the first argument that is a Python or NumPy number but
    not a finite one (inf or NaN; tensors are not checked)."""
    for name, value in arguments.items():
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def as_seed(seed: Seed, batch: int | None = None) -> tf.Tensor:
    """Returns a stateless seed (int64 ``[2]``, or ``[batch, 2]`` keys as given): ``[seed,
    0]`` for an int, the tensor as is, or a fresh random seed (a stateful op, new on every
    run of a graph) for ``None``.  With ``batch`` (the images' static batch size, if
    known), per-example keys of another length are a `ValueError`."""
    if seed is None:
        return tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int64)
    seed = tf.cast(seed, tf.int64)
    rows = seed.shape[0] if seed.shape.rank == 2 else None
    if seed.shape.rank not in (1, 2) or seed.shape[-1] not in (None, 2) or (
            batch is not None and rows is not None and rows != batch):
        raise ValueError(f"seed must be an int, a [2] seed or [batch, 2] per-example keys "
                         f"(batch {batch}), got shape {seed.shape}")
    return seed


def l2_norms(x: tf.Tensor) -> tf.Tensor:
    """Per-example ℓ2 norms ``[batch]`` of a batch of any rank."""
    return tf.norm(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)


def per_example(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes ``[batch]`` values to broadcast against ``like`` (``[batch, 1, 1, ...]``)."""
    shape = tf.concat([[-1], tf.ones([tf.rank(like) - 1], tf.int32)], axis=0)
    return tf.reshape(values, shape)
