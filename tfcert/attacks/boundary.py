"""Boundary attack (Brendel, Rauber & Bethge 2018): decision-based, gradient-free, ℓ2.

STN Appendix D.2 runs it as a sanity check against gradient masking.  It only
queries the predicted label.  Batched over examples and trials inside one
``tf.function``: every iteration draws ``trials`` proposals per example and classifies
them in two forward passes.  Each proposal is

1. an **orthogonal step**: a Gaussian direction, orthogonalised to the direction
   ``x − x_adv`` and scaled to ``spherical_step · d`` (d = ‖x − x_adv‖₂), then rescaled
   back onto the sphere of radius d around ``x``;
2. a **source step** towards ``x`` that shortens the distance by ``source_step · d``;

and the closest adversarial proposal (if closer) replaces ``x_adv``.  The step sizes adapt
per example from the success rates (> 0.5: × ``step_adaptation``; < 0.2: ÷), the
orthogonal one from the spherical proposals, the source one from the final proposals.
The start point is the first uniform-noise image that is misclassified, moved by binary
search along the line to ``x`` (foolbox's blended-uniform-noise initialisation).

ART 1.20's ``BoundaryAttack`` also runs on Keras 3 models, but it loops over examples
in Python (two eager calls per iteration per example), draws its start points from an
unseeded ``RandomState`` (not reproducible) and attacks the model's prediction rather
than the label; hence this batched, seeded version.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcert.attacks.eot import (ATTACK_STREAM, DEFENSE_STREAM, KeyedDefense, Seed, as_seed,
                                check_finite,
                                example_keys, fold_rows)

_BINARY_SEARCH_STEPS = 25


def boundary_attack(model: keras.Model | KeyedDefense, x, y, steps: int = 1000, trials: int = 20,
                    spherical_step: float = 0.01, source_step: float = 0.01,
                    step_adaptation: float = 1.5, init_attempts: int = 100,
                    seed: Seed = None) -> tf.Tensor:
    """Untargeted boundary attack; returns adversarial images of decreasing ℓ2 distance.

    For a deterministic model every returned image that differs from ``x`` is
    misclassified, and its distance to ``x`` never increases with ``steps``.  A
    randomized model is queried with one draw per proposal (a decision-based attacker
    sees one label per query), so its answers are noisy, as STN Appendix D.2 observes.

    Args:
        model: Keras model giving logits (only the argmax is used), possibly randomized,
            or a `tfcert.attacks.KeyedDefense` (one keyed draw per query).
        x: images ``[batch, ...]`` in [0, 1].
        y: true labels ``[batch]``; an example is adversarial when the prediction ≠ y.
        steps: iterations of the random walk.
        trials: proposals per example and iteration.
        spherical_step: initial relative size of the orthogonal step.
        source_step: initial relative size of the step towards ``x``.
        step_adaptation: factor (> 1) by which the step sizes grow or shrink.
        init_attempts: uniform-noise draws tried to find a start point.
        seed: int, stateless seed ``[2]`` or per-example keys ``[batch, 2]``; an
            example's start, proposals and (`KeyedDefense`) query draws come from its own
            key only.  ``None`` draws one.

    Returns:
        float32 images in [0, 1]: ``x`` itself where ``x`` is already misclassified or no
        misclassified noise image was found, else the final adversarial image.

    Example:

    >>> x_adv = tfcert.attacks.boundary_attack(model, x, y, steps=500, seed=0)
    >>> distance = np.linalg.norm((x_adv - x).numpy().reshape(len(x), -1), axis=1)
    >>> robust = (model(x_adv).numpy().argmax(1) == y) | (distance > eps)
    """
    if steps < 0 or trials < 1 or init_attempts < 1 or not step_adaptation > 1:
        raise ValueError("boundary_attack needs steps >= 0, trials >= 1, init_attempts >= 1 "
                         "and step_adaptation > 1")
    if not (spherical_step > 0 and source_step > 0):
        raise ValueError("spherical_step and source_step must be > 0")
    check_finite(spherical_step=spherical_step, source_step=source_step,
                 step_adaptation=step_adaptation)
    x = tf.cast(x, tf.float32)
    return tf.stop_gradient(_boundary_attack(
        model, x, tf.cast(y, tf.int64), tf.constant(steps, tf.int32),
        tf.constant(trials, tf.int32), tf.constant(spherical_step, tf.float32),
        tf.constant(source_step, tf.float32), tf.constant(step_adaptation, tf.float32),
        tf.constant(init_attempts, tf.int32), as_seed(seed, x.shape[0])))


@tf.function(reduce_retracing=True)
def _boundary_attack(model, x, y, steps, trials, spherical_step, source_step, adaptation,
                     init_attempts, seed):
    image_shape = tf.shape(x)[1:]
    flat = tf.reshape(x, [tf.shape(x)[0], -1])
    keys = fold_rows(example_keys(seed, tf.shape(x)[0]), ATTACK_STREAM)
    query_keys = fold_rows(example_keys(seed, tf.shape(x)[0]), DEFENSE_STREAM)

    def is_adversarial(candidates, draw):  # [batch, D] or [trials, batch, D] -> [..., batch]
        if isinstance(model, KeyedDefense):  # one keyed draw per query
            groups = candidates[:, None] if candidates.shape.rank == 2 else tf.transpose(
                candidates, [1, 0, 2])
            images = tf.reshape(groups, tf.concat([tf.shape(groups)[:2], image_shape], 0))
            labels = tf.argmax(model.group_logits(images, query_keys, draw), axis=-1)
            labels = labels[:, 0] if candidates.shape.rank == 2 else tf.transpose(labels)
            return labels != y
        images = tf.reshape(candidates, tf.concat([[-1], image_shape], 0))
        labels = tf.argmax(model(images, training=False), axis=-1)
        return tf.reshape(labels, tf.shape(candidates)[:-1]) != y

    start, found = _start_points(flat, is_adversarial, init_attempts, fold_rows(keys, 0))
    walk_keys = fold_rows(keys, 1)
    first_walk_draw = 1 + init_attempts + _BINARY_SEARCH_STEPS  # query draws of the start

    def step(t, adv, spherical, source):
        proposals, on_sphere = _proposals(flat, adv, spherical, source, trials,
                                          fold_rows(walk_keys, t))
        sphere_ok = is_adversarial(on_sphere, first_walk_draw + 2 * t)
        proposal_ok = is_adversarial(proposals, first_walk_draw + 2 * t + 1)
        distances = tf.where(proposal_ok, tf.norm(proposals - flat, axis=-1), float("inf"))
        best = tf.argmin(distances, axis=0, output_type=tf.int32)
        best_distance = tf.reduce_min(distances, axis=0)
        improved = found & (best_distance < tf.norm(adv - flat, axis=-1))
        chosen = tf.gather(tf.transpose(proposals, [1, 0, 2]), best, batch_dims=1)
        adv = tf.where(improved[:, None], chosen, adv)
        spherical = _adapt(spherical, sphere_ok, adaptation)
        source = _adapt(source, proposal_ok, adaptation)
        return t + 1, adv, spherical, source

    batch = tf.shape(flat)[:1]
    state = [tf.constant(0), start, tf.fill(batch, spherical_step), tf.fill(batch, source_step)]
    _, adv, _, _ = tf.while_loop(lambda t, *_: t < steps, step, state)
    return tf.reshape(adv, tf.shape(x))


def _start_points(flat, is_adversarial, attempts, keys):
    """First misclassified uniform-noise image, then binary search towards ``flat``.

    Attempt i of example b draws from ``fold_in(keys[b], i)`` (query draw 1 + i; the
    search's queries follow).  Returns (start [batch, D], found [batch]); examples
    already misclassified start at (and stay at) the original, and so do those with no
    misclassified noise image."""
    already = is_adversarial(flat, 0)
    fold_in = tf.random.experimental.stateless_fold_in

    def draw(i, noise, found):
        candidate = tf.map_fn(
            lambda key: tf.random.stateless_uniform(tf.shape(flat)[1:], fold_in(key, i)), keys,
            fn_output_signature=tf.TensorSpec(flat.shape[1:], tf.float32))
        new = ~found & is_adversarial(candidate, 1 + i)
        return i + 1, tf.where(new[:, None], candidate, noise), found | new

    _, noise, found = tf.while_loop(
        lambda i, _, found: (i < attempts) & ~tf.reduce_all(found), draw,
        [tf.constant(0), flat, already])

    def bisect(i, low, high):
        middle = (low + high) / 2.0
        ok = is_adversarial(flat + middle[:, None] * (noise - flat), 1 + attempts + i)
        return i + 1, tf.where(ok, low, middle), tf.where(ok, middle, high)

    ones = tf.ones(tf.shape(flat)[:1])
    _, _, high = tf.while_loop(lambda i, *_: i < _BINARY_SEARCH_STEPS, bisect,
                               [tf.constant(0), 0.0 * ones, ones])
    return flat + high[:, None] * (noise - flat), found & ~already


def _proposals(flat, adv, spherical, source, trials, keys):
    """Returns (proposals, spherical candidates), each [trials, batch, D] in [0, 1];
    example b's directions are drawn from ``keys[b]``."""
    towards = flat - adv
    distance = tf.maximum(tf.norm(towards, axis=-1, keepdims=True), 1e-12)
    unit = towards / distance
    eta = tf.map_fn(
        lambda key: tf.random.stateless_normal(tf.stack([trials, tf.shape(flat)[1]]), key), keys,
        fn_output_signature=tf.TensorSpec([None, flat.shape[1]], tf.float32))
    eta = tf.transpose(eta, [1, 0, 2])
    eta -= tf.reduce_sum(eta * unit, axis=-1, keepdims=True) * unit
    eta *= spherical[:, None] * distance / tf.maximum(tf.norm(eta, axis=-1, keepdims=True),
                                                      1e-12)
    on_sphere = flat + (eta - towards) / tf.sqrt(1.0 + tf.square(spherical))[:, None]
    on_sphere = tf.clip_by_value(on_sphere, 0.0, 1.0)
    back = flat - on_sphere
    back_norm = tf.maximum(tf.norm(back, axis=-1, keepdims=True), 1e-12)
    length = tf.nn.relu(source[:, None] * distance + back_norm - distance) / back_norm
    return tf.clip_by_value(on_sphere + length * back, 0.0, 1.0), on_sphere


def _adapt(step_size, successes, adaptation):
    rate = tf.reduce_mean(tf.cast(successes, tf.float32), axis=0)
    return tf.where(rate > 0.5, step_size * adaptation,
                    tf.where(rate < 0.2, step_size / adaptation, step_size))
