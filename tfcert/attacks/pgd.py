"""Projected gradient descent (Madry et al. 2018) with EOT, ℓ∞ and ℓ2.

Zhang & Liang Section 2 (PGD update, eq. 1) and Section 5: 40 steps × 20 EOT draws on
MNIST, 10 steps × 100 draws on ImageNet; STN Section 6.2: 10 draws.  The attack runs
as one ``tf.while_loop`` inside a ``tf.function`` (traced once per model, input shape
and loss), so it is as fast in a script as inside a ``train_step``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcert.attacks.eot import (ATTACK_STREAM, DEFENSE_STREAM, KeyedDefense, Loss, Seed, as_seed,
                                check_finite, check_loss, example_keys, fold_rows, l2_norms,
                                loss_and_gradient, per_example)

NORMS = ("inf", "2")


def pgd(model: keras.Model | KeyedDefense, x, y, eps: float, norm: str = "inf", steps: int = 40,
        step_size: float | None = None, eot_samples: int = 1, random_start: bool = True,
        loss: Loss = "ce", confidence: float = 50.0, seed: Seed = None) -> tf.Tensor:
    """Untargeted PGD attack in the ℓ∞ or ℓ2 ball of radius ``eps`` around ``x``.

    Each step ascends the EOT loss (`tfcert.attacks.eot`; softmax probabilities averaged
    over ``eot_samples`` draws before the log): ℓ∞ steps are ``step_size · sign(∇)``, ℓ2
    steps ``step_size · ∇/‖∇‖₂``; every iterate is projected onto the ε-ball and clipped
    to the pixel box [0, 1].  Returns the **last** iterate (as Madry et al. and Zhang &
    Liang do), which always satisfies both constraints.

    Args:
        model: Keras model giving logits, possibly randomized (e.g.
            ``keras.Sequential([tfcert.layers.GaussianNoise(σ), base])``), or a
            `tfcert.attacks.KeyedDefense` (its EOT draws keyed per example by ``seed``);
            attacked in inference mode.
        x: images ``[batch, ...]`` in [0, 1].
        y: true labels ``[batch]`` (or the targets a custom ``loss`` expects, e.g. the
            clean probabilities for TRADES).
        eps: radius of the ball, on the [0, 1] pixel scale (8/255 ≈ 0.031); finite, >= 0.
        norm: ``"inf"`` or ``"2"``.
        steps: number of PGD steps.
        step_size: step length (finite); default ``2.5 · eps / steps`` (Madry et al.).
        eot_samples: EOT draws per step (1 for a deterministic model).
        random_start: start from a uniform point of the ℓ∞ ball (ℓ2: a random direction
            at a uniform radius) instead of ``x``.
        loss: ``"ce"`` (cross-entropy), ``"cw"`` (Carlini-Wagner margin with
            ``confidence``) or a callable ``loss(y, log_probs) -> [batch]`` to maximise.
        confidence: κ of the ``"cw"`` loss (50 in Madry et al. and Zhang & Liang §5.2).
        seed: int, stateless seed ``[2]`` or per-example keys ``[batch, 2]``
            (`tfcert.attacks.eot.example_keys`) for the random start and a `KeyedDefense`'s
            draws; an example's randomness comes from its own key only.  ``None`` draws one.

    Returns:
        float32 adversarial images, same shape as ``x``.

    Raises:
        ValueError: naming the argument, for a non-finite (inf, NaN) ``eps``, ``step_size``
            or ``confidence``, a negative ``eps``, an unknown ``norm`` or ``loss``.

    Example:

    >>> defense = keras.Sequential([tfcert.layers.GaussianNoise(0.25), base_model])
    >>> x_adv = tfcert.attacks.pgd(defense, x, y, eps=0.1, steps=40, eot_samples=20)
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    check_loss(loss)
    check_finite(eps=eps, step_size=step_size, confidence=confidence)
    if not eps >= 0 or steps < 0 or eot_samples < 1:
        raise ValueError(f"need eps >= 0, steps >= 0 and eot_samples >= 1, got "
                         f"{eps}, {steps}, {eot_samples}")
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x = tf.cast(x, tf.float32)
    return tf.stop_gradient(_pgd(
        model, tf.stop_gradient(x), tf.stop_gradient(tf.convert_to_tensor(y)),
        tf.constant(eps, tf.float32), tf.constant(step_size, tf.float32),
        tf.constant(steps, tf.int32), tf.constant(eot_samples, tf.int32),
        tf.constant(confidence, tf.float32), as_seed(seed, x.shape[0]), norm, loss, random_start))


@tf.function(reduce_retracing=True)
def _pgd(model, x, y, eps, step_size, steps, eot_samples, confidence, seed, norm, loss,
         random_start):
    keys = example_keys(seed, tf.shape(x)[0])
    start = _random_point(x, eps, norm, fold_rows(keys, ATTACK_STREAM)) if random_start else x
    defense_keys = fold_rows(keys, DEFENSE_STREAM)

    def step(i, x_adv):
        _, grad = loss_and_gradient(model, x_adv, y, loss, eot_samples, confidence,
                                    defense_keys, i)
        return i + 1, project(x, x_adv + step_size * _ascent_direction(grad, norm), eps, norm)

    _, x_adv = tf.while_loop(lambda i, _: i < steps, step, [tf.constant(0), start])
    return x_adv


def project(x: tf.Tensor, x_adv: tf.Tensor, eps, norm: str) -> tf.Tensor:
    """Projects ``x_adv`` onto the ℓ_norm ball of radius ``eps`` around ``x``, then onto
    [0, 1] (clipping never leaves the ball, since ``x`` is in the box)."""
    delta = x_adv - x
    if norm == "inf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        delta *= per_example(tf.minimum(1.0, eps / tf.maximum(l2_norms(delta), 1e-12)), delta)
    return tf.clip_by_value(x + delta, 0.0, 1.0)


def _ascent_direction(grad: tf.Tensor, norm: str) -> tf.Tensor:
    if norm == "inf":
        return tf.sign(grad)
    return grad / per_example(tf.maximum(l2_norms(grad), 1e-12), grad)


def _random_point(x: tf.Tensor, eps, norm: str, keys: tf.Tensor) -> tf.Tensor:
    """A uniform point of the ℓ∞ ball (ℓ2: a uniform radius along a Gaussian direction)
    around each example, drawn from the example's key ``keys[b]``."""

    def offset(pair):
        image, key = pair
        if norm == "inf":
            return tf.random.stateless_uniform(tf.shape(image), key, -eps, eps)
        direction = tf.random.stateless_normal(tf.shape(image), key)
        radius = eps * tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(key, 1))
        return direction * radius / tf.maximum(tf.norm(direction), 1e-12)

    delta = tf.map_fn(offset, (x, keys), fn_output_signature=tf.TensorSpec(x.shape[1:], x.dtype))
    return tf.clip_by_value(x + delta, 0.0, 1.0)
