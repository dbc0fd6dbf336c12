"""Carlini-Wagner ℓ2 attack (Carlini & Wagner 2017) with EOT (STN Section 6.2).

Minimises ``‖x' − x‖₂² + c · max(margin(x') + κ, 0)`` over ``x' = (tanh(w) + 1)/2`` (the
change of variables keeps x' in [0, 1]) with Adam, and binary-searches the constant c
per example.  ``margin`` is the Carlini-Wagner margin of the EOT log-mean-probabilities
(`tfcert.attacks.eot`), which for a deterministic model is the logit margin
``Z_y − max_{j≠y} Z_j`` of the paper.  κ = ``confidence``; the κ = 50 variant of
Zhang & Liang Section 5.2 is ``confidence=50``.  STN uses the EOT-averaged gradients of
Liu et al. 2019 ("the same form as the ensemble-over-randomization"): ``eot_samples``.

The whole search is one ``tf.function`` (nested ``tf.while_loop``s); the Adam update
(Kingma & Ba, the optimizer of the paper) is written out in the loop body because a
Keras optimizer cannot hold per-call, per-batch-shape state inside a traced loop.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcert.attacks.eot import (DEFENSE_STREAM, KeyedDefense, Seed, as_seed, check_finite,
                                eot_log_probs, example_keys, fold_rows, l2_norms, margin,
                                per_example)

_BETA_1, _BETA_2, _ADAM_EPSILON = 0.9, 0.999, 1e-8
_MAX_CONST = 1e10


def carlini_wagner_l2(model: keras.Model | KeyedDefense, x, y, confidence: float = 0.0,
                      initial_const: float = 1e-2, binary_search_steps: int = 5,
                      steps: int = 100, learning_rate: float = 5e-2,
                      eot_samples: int = 1, seed: Seed = None) -> tf.Tensor:
    """Untargeted Carlini-Wagner ℓ2 attack; returns the smallest successful x' per example.

    A candidate succeeds when its margin is below −κ (misclassified with confidence κ)
    under the EOT estimate of the step that evaluated it.  After each of the
    ``binary_search_steps`` rounds of ``steps`` Adam steps, c is halved towards the
    last failure where the round succeeded, else multiplied by 10 (or bisected once an
    upper bound is known), as in Carlini & Wagner's reference code.

    Args:
        model: Keras model giving logits, possibly randomized, or a
            `tfcert.attacks.KeyedDefense`.
        x: images ``[batch, ...]`` in [0, 1].
        y: true labels ``[batch]``.
        confidence: κ ≥ 0.
        initial_const: starting c.
        binary_search_steps: rounds of the search over c.
        steps: Adam steps per round.
        learning_rate: Adam learning rate.  The paper's 0.01 suits its 10,000 steps; with
            100 steps it cannot move pixels at 0 or 1 (where tanh saturates), hence 0.05.
        eot_samples: EOT draws per step (1 for a deterministic model).
        seed: int, ``[2]`` or per-example keys ``[batch, 2]`` of a `KeyedDefense`'s draws
            (the search itself is deterministic); ``None`` draws one.

    Returns:
        float32 images in [0, 1]: the successful candidate of smallest ℓ2 distance, or
        ``x`` itself where none was found.

    Raises:
        ValueError: for a non-finite (inf, NaN) ``confidence``, ``initial_const`` or
            ``learning_rate`` (naming it), or an argument out of its range.

    Example:

    >>> x_adv = tfcert.attacks.carlini_wagner_l2(model, x, y, confidence=50.0)
    >>> distances = tf.norm(tf.reshape(x_adv - x, [len(x), -1]), axis=1)
    """
    check_finite(confidence=confidence, initial_const=initial_const,
                 learning_rate=learning_rate)
    if (confidence < 0 or initial_const <= 0 or binary_search_steps < 1 or steps < 1
            or learning_rate <= 0 or eot_samples < 1):
        raise ValueError("carlini_wagner_l2 needs confidence >= 0, initial_const > 0, "
                         "learning_rate > 0 and binary_search_steps, steps, eot_samples >= 1")
    x = tf.cast(x, tf.float32)
    return tf.stop_gradient(_carlini_wagner_l2(
        model, x, tf.convert_to_tensor(y), tf.constant(confidence, tf.float32),
        tf.constant(initial_const, tf.float32), tf.constant(binary_search_steps, tf.int32),
        tf.constant(steps, tf.int32), tf.constant(learning_rate, tf.float32),
        tf.constant(eot_samples, tf.int32), as_seed(seed, x.shape[0])))


@tf.function(reduce_retracing=True)
def _carlini_wagner_l2(model, x, y, confidence, initial_const, binary_search_steps, steps,
                       learning_rate, eot_samples, seed):
    batch = tf.shape(x)[0]
    w0 = tf.atanh((2.0 * x - 1.0) * 0.999999)
    keys = fold_rows(example_keys(seed, batch), DEFENSE_STREAM)

    def round_(r, const, lower, upper, best_l2, best):
        found, best_l2, best = _minimise(model, x, y, w0, const, confidence, steps,
                                         learning_rate, eot_samples, best_l2, best, keys,
                                         r * steps)
        upper = tf.where(found, tf.minimum(upper, const), upper)
        lower = tf.where(found, lower, tf.maximum(lower, const))
        const = tf.where(upper < _MAX_CONST, (lower + upper) / 2.0,
                         tf.where(found, const, const * 10.0))
        return r + 1, const, lower, upper, best_l2, best

    state = [tf.constant(0), tf.fill([batch], initial_const), tf.zeros([batch]),
             tf.fill([batch], _MAX_CONST), tf.fill([batch], float("inf")), x]
    *_, best = tf.while_loop(lambda r, *_: r < binary_search_steps, round_, state)
    return best


def _minimise(model, x, y, w0, const, confidence, steps, learning_rate, eot_samples,
              best_l2, best, keys, first_draw):
    """One round of Adam steps at fixed c (EOT draws ``first_draw + t`` of ``keys``);
    returns (found [batch], best_l2, best)."""

    def step(t, w, m, v, found, best_l2, best):
        with tf.GradientTape() as tape:
            tape.watch(w)
            x_adv = (tf.tanh(w) + 1.0) / 2.0
            l2 = tf.square(l2_norms(x_adv - x))
            margins = margin(y, eot_log_probs(model, x_adv, eot_samples, keys, first_draw + t))
            total = tf.reduce_sum(l2 + const * tf.nn.relu(margins + confidence))
        grad = tape.gradient(total, w)
        success = margins + confidence < 0.0
        improved = success & (l2 < best_l2)
        best = tf.where(per_example(improved, x), x_adv, best)
        best_l2 = tf.where(improved, l2, best_l2)
        m = _BETA_1 * m + (1.0 - _BETA_1) * grad
        v = _BETA_2 * v + (1.0 - _BETA_2) * tf.square(grad)
        t = t + 1
        t_float = tf.cast(t, tf.float32)
        rate = learning_rate * tf.sqrt(1.0 - _BETA_2**t_float) / (1.0 - _BETA_1**t_float)
        w = w - rate * m / (tf.sqrt(v) + _ADAM_EPSILON)
        return t, w, m, v, found | success, best_l2, best

    zeros = tf.zeros_like(w0)
    state = [tf.constant(0), w0, zeros, zeros, tf.zeros_like(best_l2, tf.bool), best_l2, best]
    *_, found, best_l2, best = tf.while_loop(lambda t, *_: t < steps, step, state)
    return found, best_l2, best
