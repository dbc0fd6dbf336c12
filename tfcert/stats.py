"""Sound confidence bounds on the class probabilities of a smoothed classifier.

What they rest on: docs/SOUNDNESS.md §1.2 (precision) and §2 (level split).

STN (Li et al.), Section 4 "Confidence Interval and Sample Size": the certificate of
Theorem 2 needs a *lower* bound on the top-class probability p(1) and an *upper* bound on
the runner-up probability p(2).  They come from one-sided Clopper-Pearson intervals of
the vote counts, made simultaneous by a Bonferroni correction.

Both one-sided bounds are lower Beta quantiles at the level α itself, never at 1 − α
(which would lose the digits of a small α to rounding):
``lower(k, n, α) = Q_α(k, n − k + 1)`` and ``upper(k, n, α) = 1 − Q_α(n − k, k + 1)``,
where ``Q_α(a, b)`` is the x with ``I_x(a, b) = α`` (regularized incomplete beta); the
complement is rounded up (:func:`complement_up`).

Soundness of ``Q_α``.  A lower bound must not exceed the exact quantile.  Every bound
here is a point x at which ``tf.math.betainc`` (Cephes' ``incbet``, as ported to Eigen)
was *evaluated* below a slightly reduced level ``α' = α (1 − η)`` with
``η = BETAINC_RELATIVE_ERROR · (a + b)``; since the CDF increases in x, the exact
quantile lies above x as long as betainc's relative error at x is below η.  Measured
against scipy (Boost, itself checked against 50-digit mpmath) on ≈ 4·10⁵ random points
with a + b up to 10⁹ and CDF values from 10⁻¹³ to 1/4, that error stays below
76 · (a + b) · 2⁻⁵³ (it comes from the exponential of terms of size ≈ (a + b) log(a + b),
as Cephes' own accuracy table shows); η is 1024 · (a + b) · 2⁻⁵³, a factor ≥ 13 above
it.  This is an error model validated on CPU, not a proof; the test suite re-checks it
(``test_betainc_error_model_holds``).
Near the centre of the distribution (CDF ≈ 1/2) Eigen's continued fraction stops before
converging once a + b exceeds ≈ 2²⁰ (relative error 3·10⁻³ at a + b = 10⁷), so for
``a + b > CENTRE_LEVEL_TRIALS`` levels above ``CENTRE_LEVEL`` are replaced by it (a
conservative, looser bound; certificates use levels ≪ 1/4), and ``n > MAX_TRIALS`` is
refused (beyond it the centre errors reach the CDF value 1/4 itself).  The margin costs
≈ η · I/pdf in x: at most ≈ 2·10⁻¹⁰ for n ≤ 10⁷; for n ≤ 100 at most 6.8·10⁻¹³
(:func:`clopper_pearson`) and 4.5·10⁻¹³ (:func:`clopper_pearson_graph`), measured over
every k and 16 levels against mpmath (``scripts/clopper_pearson_gap.py``).

Two implementations share this construction:

* :func:`clopper_pearson` starts from ``tfp.math.betaincinv`` and keeps its answer only
  where betainc confirms it (evaluated in ``[α'(1 − η), α')``, i.e. sound and tight); the
  rest (TFP is off by up to 6·10⁻² at α <= 10⁻⁷, e.g. k = n = 319) is bisected;
* :func:`clopper_pearson_graph` bisects ``tf.math.betainc`` with a fixed number of
  steps.  It uses core TensorFlow ops only, so it runs inside ``tf.function`` with a
  dynamic batch size and inside an exported SavedModel that TF Serving loads without
  TFP.  :func:`simultaneous_bounds` and :func:`cohen_split_bounds`, the
  bounds the certificate uses, are built on it, as is :func:`binomial_test_pvalue`
  (Cohen et al.'s PREDICT).

All statistics are float64 (float32 Beta quantiles are off by percents in the tails).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfcert.bisection import STEPS, bisect

TensorLike = tf.Tensor | np.ndarray | float | int

# Bound on the relative error of tf.math.betainc(a, b, x), per unit of a + b, for CDF
# values up to CENTRE_LEVEL, or any value when a + b <= CENTRE_LEVEL_TRIALS (1024 · 2**-53;
# module docstring: measured maximum 76 · 2**-53).
BETAINC_RELATIVE_ERROR = 2.0 ** -43

# Above this a + b, levels are capped at CENTRE_LEVEL (module docstring).
CENTRE_LEVEL_TRIALS = 2 ** 19
CENTRE_LEVEL = 0.25

# Largest number of trials n accepted (module docstring); 2**27 ≈ 1.3e8.
MAX_TRIALS = 2 ** 27

# A lower-quantile solver (a, b, level) -> x, all of one shape, with betainc(a, b, x)
# evaluated below `level` (or x = 0).
_LowerQuantile = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def to_float64(value: TensorLike) -> tf.Tensor:
    """``value`` as a float64 tensor (Python floats are not rounded through float32)."""
    if tf.is_tensor(value):
        return tf.cast(value, tf.float64)
    return tf.constant(np.asarray(value, np.float64))


def complement_up(x: TensorLike) -> tf.Tensor:
    """``1 − x`` for x in [0, 1], rounded up: never below the exact ``1 − x``.

    ``u = fl(1 − x)`` is exact for x >= 1/2 (Sterbenz); otherwise u >= 1/2, so ``1 − u`` is
    exact and shows whether u was rounded down, in which case the next float above u
    (``u + 2⁻⁵³``, the spacing of [1/2, 1)) is returned.  Core TF only.
    """
    x = to_float64(x)
    u = 1.0 - x
    return tf.where(1.0 - u > x, u + 2.0 ** -53, u)


def as_counts(counts: TensorLike) -> tf.Tensor:
    """``counts`` as a tensor, integer dtypes widened to int64 before any sum or cast:
    uint8 / int16 counts would otherwise wrap around (n = 300 read as 44) and give
    bounds that certify where they must abstain."""
    counts = tf.convert_to_tensor(counts)
    return tf.cast(counts, tf.int64) if counts.dtype.is_integer else counts


def checked(value: tf.Tensor, condition: Callable[[object], object], message: str) -> tf.Tensor:
    """``value`` once ``condition(value)`` holds everywhere: checked at once where the value
    is static (``ValueError(message + what was given)``), else by a ``tf.debugging``
    assertion that fails the graph's run (``tf.errors.InvalidArgumentError(message)``:
    inside ``tf.function`` and an exported SavedModel, a request fails instead of
    returning a number).  ``condition`` uses operators only, so it reads numpy and
    tensors alike; NaN fails every comparison, hence every condition written as one."""
    static = tf.get_static_value(value)
    if static is not None:
        ok = np.asarray(condition(static), bool)
        if not np.all(ok):
            bad = np.asarray(static)[~np.broadcast_to(ok, np.shape(static))]
            raise ValueError(f"{message}, got {bad[:3].tolist()}"
                             f"{f' (and {bad.size - 3} more)' if bad.size > 3 else ''}")
        return value
    check = tf.debugging.Assert(tf.reduce_all(condition(value)), [message])
    with tf.control_dependencies([check]):
        return tf.identity(value)


def check_probability(value: TensorLike, name: str) -> tf.Tensor:
    """``value`` as float64, every entry a probability in [0, 1] (NaN and ±inf refused,
    see :func:`checked`); ``name`` is the argument named in the error."""
    return checked(to_float64(value), lambda p: (p >= 0.0) & (p <= 1.0),
                   f"{name} must be probabilities in [0, 1]")


def _level(alpha: TensorLike) -> tf.Tensor:
    """``alpha`` as float64, every entry in (0, 1) (:func:`checked`)."""
    return checked(to_float64(alpha), lambda a: (a > 0.0) & (a < 1.0), "alpha must lie in (0, 1)")


def per_image_level(alpha: TensorLike, counts_shape: tf.TensorShape) -> tf.Tensor:
    """``alpha`` (checked in (0, 1)) shaped to apply to counts of shape ``counts_shape``.

    The contract of every public function of this module: α is a scalar; or one level per
    image, ``[batch]`` or ``[batch, 1]`` (the leading axis of the counts), returned as
    ``[batch, 1, …, 1]``; or one level per bound, of the counts' own shape.  So ``[batch]``
    and ``[batch, 1]`` mean the same on every path (numpy broadcasting would apply a
    ``[batch]`` α along the class axis), and any other shape is a ``ValueError``.
    """
    alpha = _level(alpha)
    shape = alpha.shape
    if shape.rank == 0 or counts_shape.rank == 0:
        return alpha
    if shape.rank == 1 or (shape.rank == 2 and shape[1] == 1):  # one level per image
        if not shape[:1].is_compatible_with(counts_shape[:1]):
            raise ValueError(f"alpha has {shape[0]} levels for {counts_shape[0]} images "
                             "(a scalar, or one level per image)")
        return tf.reshape(alpha, [-1] + [1] * (counts_shape.rank - 1))
    if not shape.is_compatible_with(counts_shape):
        raise ValueError(f"alpha must be a scalar, one level per image ([batch] or [batch, 1]) "
                         f"or one per count (shape {counts_shape}), got shape {shape}")
    return alpha


def vote_counts(counts: TensorLike, name: str = "counts") -> tf.Tensor:
    """``counts`` as int64 ``[batch, classes]`` votes, checked: rank 2, non-negative
    integers (an integer-valued float array is accepted, a fractional or non-finite one
    refused: casting would truncate it silently)."""
    counts = tf.convert_to_tensor(counts)
    if counts.shape.rank != 2:
        raise ValueError(f"{name} must be votes of shape [batch, classes], got shape "
                         f"{counts.shape}")
    if not (counts.dtype.is_integer or counts.dtype.is_floating):
        raise ValueError(f"{name} must be integers, got dtype {counts.dtype.name}")
    if counts.dtype.is_floating:
        return tf.cast(checked(tf.cast(counts, tf.float64),
                               lambda c: (c % 1.0 == 0.0) & (c >= 0.0),
                               f"{name} must be non-negative integers"), tf.int64)
    return checked(tf.cast(counts, tf.int64), lambda c: c >= 0, f"{name} must be >= 0")


def class_indices(classes: TensorLike, num_classes: tf.Tensor | int,
                  name: str = "selected_class") -> tf.Tensor:
    """``classes`` as int64 ``[batch]``, checked to be integers in ``[0, num_classes)``."""
    classes = tf.convert_to_tensor(classes)
    if classes.shape.rank != 1:
        raise ValueError(f"{name} must be one class per image, shape [batch], got shape "
                         f"{classes.shape}")
    if not classes.dtype.is_integer:
        raise ValueError(f"{name} must be integer classes, got dtype {classes.dtype.name}")
    static = tf.get_static_value(num_classes)
    limit = tf.cast(num_classes, tf.int64) if static is None else int(static)
    return checked(tf.cast(classes, tf.int64), lambda c: (c >= 0) & (c < limit),
                   f"{name} must be classes in [0, {limit if static is not None else 'k'})")


def _broadcast(*tensors: tf.Tensor) -> list[tf.Tensor]:
    """``tensors`` broadcast to their common (dynamic) shape."""
    shape = functools.reduce(tf.broadcast_dynamic_shape, [tf.shape(t) for t in tensors])
    return [tf.broadcast_to(t, shape) for t in tensors]


def _safe_level(a: tf.Tensor, b: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """The level ``α' = α (1 − η)`` at which betainc is inverted (module docstring)."""
    size = a + b
    alpha = tf.where(size > CENTRE_LEVEL_TRIALS, tf.minimum(alpha, CENTRE_LEVEL), alpha)
    return alpha * (1.0 - BETAINC_RELATIVE_ERROR * size)


def _clopper_pearson(counts: TensorLike, n: TensorLike, alpha: TensorLike,
                     lower_quantile: _LowerQuantile) -> tuple[tf.Tensor, tf.Tensor]:
    """One-sided Clopper-Pearson bounds as lower Beta quantiles (module docstring)."""
    k, n = as_counts(counts), as_counts(n)
    if k.dtype.is_integer and not n.dtype.is_integer:  # integer votes: a whole n, not truncated
        n = checked(tf.cast(n, tf.float64), lambda v: v % 1.0 == 0.0, "n must be an integer")
    alpha = per_image_level(alpha, tf.broadcast_static_shape(k.shape, n.shape))
    k, n = _broadcast(tf.cast(k, tf.float64), tf.cast(n, tf.float64))
    checks = [tf.debugging.assert_non_negative(k, message="counts must be >= 0"),
              tf.debugging.assert_less_equal(k, n, message="counts must be <= n"),
              tf.debugging.assert_less_equal(
                  n, tf.constant(MAX_TRIALS, tf.float64),
                  message="n must be <= MAX_TRIALS = 2**27 (tf.math.betainc is not validated "
                          "beyond)")]
    with tf.control_dependencies(checks):
        k, n, alpha = _broadcast(k, n, alpha)
    # Row 0: lower(k) = Q(k, n - k + 1); row 1: upper(k) = 1 - Q(n - k, k + 1).  Shape
    # parameters are clamped to >= 1 where the edge cases k = 0 / k = n apply, so that the
    # unused branch of tf.where stays finite.
    a = tf.stack([tf.maximum(k, 1.0), tf.maximum(n - k, 1.0)])
    b = tf.stack([n - k + 1.0, k + 1.0])
    x = lower_quantile(a, b, _safe_level(a, b, tf.stack([alpha, alpha])))
    lower = tf.where(k > 0, x[0], tf.zeros_like(x[0]))
    upper = tf.where(k < n, complement_up(x[1]), tf.ones_like(x[1]))
    return lower, upper


def _bisection_lower_quantile(a: tf.Tensor, b: tf.Tensor, level: tf.Tensor,
                              steps: int = STEPS) -> tf.Tensor:
    """The lower end of a bisection of [0, 1] (`tfcert.bisection.bisect`, ``steps``
    halvings) for the point where ``betainc(a, b, x) < level`` stops holding: a point
    evaluated below ``level`` (or 0), since the CDF increases in x.  Core TF."""
    lower, _ = bisect(lambda x: tf.math.betainc(a, b, x) < level, tf.zeros_like(level),
                      tf.ones_like(level), steps)
    return lower


def _checked_tfp_lower_quantile(a: tf.Tensor, b: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """``tfp.math.betaincinv`` where betainc confirms it, bisection elsewhere.

    TFP is asked for the quantile at ``level (1 − η/2)`` and its answer x kept where
    ``level (1 − η) <= betainc(a, b, x) < level``: sound as any evaluated point below
    ``level``, and within a relative η of it in level.  NaN or inaccurate answers fail
    the check and are bisected (:func:`_bisection_lower_quantile`).
    """
    eta = BETAINC_RELATIVE_ERROR * (a + b)
    x = tfp.math.betaincinv(a, b, level * (1.0 - 0.5 * eta))
    cdf = tf.math.betainc(a, b, tf.clip_by_value(x, 0.0, 1.0))
    rejected = tf.where(~((cdf < level) & (cdf >= level * (1.0 - eta))))
    bisected = _bisection_lower_quantile(tf.gather_nd(a, rejected), tf.gather_nd(b, rejected),
                                         tf.gather_nd(level, rejected))
    return tf.tensor_scatter_nd_update(x, rejected, bisected)


def clopper_pearson(counts: TensorLike, n: TensorLike,
                    alpha: TensorLike) -> tuple[tf.Tensor, tf.Tensor]:
    """One-sided Clopper-Pearson bounds on a binomial proportion, each at level ``alpha``.

    ``lower(k, n, a) = Beta(k, n-k+1).quantile(a)`` (0 if k = 0) and
    ``upper(k, n, a) = Beta(k+1, n-k).quantile(1-a)`` (1 if k = n), so that
    ``P(p < lower) <= alpha`` and ``P(p > upper) <= alpha`` separately.  The upper bound is
    computed as ``1 − Beta(n-k, k+1).quantile(a)``.  Quantiles start from
    ``tfp.math.betaincinv`` (float64), checked with ``tf.math.betainc`` and bisected where
    the check fails; every bound is on the safe side of the exact one under the error
    bound of the module docstring, and within ≈ 1e-10 of it for n <= 1e7.  For graphs
    that must run without TFP use :func:`clopper_pearson_graph` (same guarantee).

    Args:
        counts: successes k >= 0 (any shape; integers, or real values for projected
            counts, e.g. of early stopping).
        n: number of trials, broadcastable against ``counts``, >= ``counts``, at most
            :data:`MAX_TRIALS`; a whole number when ``counts`` are integers.
        alpha: level(s) in (0, 1): a scalar; one per image, ``[batch]`` or
            ``[batch, 1]`` (the leading axis of the broadcast counts); or one per
            count, of the counts' shape (:func:`per_image_level`).  For n >= 2**19,
            levels above :data:`CENTRE_LEVEL` are evaluated at it (conservative).

    Raises:
        ValueError: a static ``alpha`` outside (0, 1) or of another shape, or a
            fractional ``n`` for integer counts (naming it);
        tf.errors.InvalidArgumentError: negative counts, counts above ``n`` or ``n``
            above :data:`MAX_TRIALS` (``tf.debugging`` assertions, eagerly as in a graph),
            and any of the above for a tensor whose value is known only in a graph.

    Returns:
        ``(lower, upper)`` float64 tensors of the broadcast shape.

    Example:

    >>> lo, up = tfcert.stats.clopper_pearson([0, 50, 100], 100, 0.05)
    """
    return _clopper_pearson(counts, n, alpha, _checked_tfp_lower_quantile)


def clopper_pearson_graph(counts: TensorLike, n: TensorLike, alpha: TensorLike,
                          steps: int = STEPS) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`clopper_pearson` with core TensorFlow ops only (exportable, no TFP).

    Bisection on ``tf.math.betainc`` with ``steps`` fixed halvings (default
    `tfcert.bisection.STEPS`; a ``tf.while_loop``, so any batch shape works inside
    ``tf.function``), at the reduced level of the module docstring; the lower quantile
    is the bracket's lower end (fewer steps: sound, up to 2**-steps looser).

    Args and returns: as :func:`clopper_pearson`.
    """
    return _clopper_pearson(counts, n, alpha,
                            functools.partial(_bisection_lower_quantile, steps=steps))


def simultaneous_bounds(counts: TensorLike,
                        alpha: TensorLike) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Bounds on p(1) and p(2) that hold simultaneously over all classes (core TF).

    STN Section 4 bounds p(1) from below and p(2) from above with one-sided
    Clopper-Pearson intervals and a Bonferroni correction.  The top class is chosen
    from the same counts, so (docs/SOUNDNESS.md §2) every class ``j`` gets the interval
    ``[lower_j, upper_j]`` of level ``alpha / k``, i.e. each one-sided bound at level
    ``alpha / (2k)``: the union bound over those 2k events makes all k intervals hold
    together with probability >= 1 - alpha, whichever class ends up on top.  Then

    * ``top = argmax_j counts_j`` (first index on ties),
    * ``p1_lower = lower_top``,
    * ``p2_upper = min(max_{j != top} upper_j, 1 - p1_lower)`` (the runner-up cannot
      exceed what the top class leaves; valid on the same event; rounded up).

    A tie gives ``p1_lower < p2_upper``: the certificate is empty (abstain).

    Args:
        counts: ``[batch, k]`` vote counts, non-negative integers (an integer-valued
            float array is accepted; :func:`vote_counts`); n is their row sum.
        alpha: total level in (0, 1): a scalar, or one per image (``[batch]`` or
            ``[batch, 1]``, :func:`per_image_level`).

    Returns:
        ``(p1_lower, p2_upper, top)``: float64 ``[batch]``, float64 ``[batch]``,
        int64 ``[batch]``.
    """
    counts = vote_counts(counts)
    num_classes = tf.cast(tf.shape(counts)[-1], tf.float64)
    n = tf.reduce_sum(counts, axis=-1, keepdims=True)
    level = per_image_level(alpha, counts.shape)  # [batch] -> [batch, 1]: all k classes
    lower, upper = clopper_pearson_graph(counts, n, level / (2.0 * num_classes))
    return top_class_bounds(counts, lower, upper)


def top_class_bounds(counts: TensorLike, lower: tf.Tensor,
                     upper: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(p1_lower, p2_upper, top)`` of :func:`simultaneous_bounds` from per-class bounds
    ``lower``, ``upper`` (``[batch, k]``, each at level α/(2k)) of the ``counts``:
    ``top = argmax counts`` (first index on ties), its lower bound, and the largest
    upper bound of the other classes capped at ``1 − p1_lower`` (rounded up)."""
    counts = tf.convert_to_tensor(counts)
    top = tf.argmax(counts, axis=-1, output_type=tf.int64)
    is_top = tf.one_hot(top, tf.shape(counts)[-1], on_value=True, off_value=False)
    p1_lower = tf.reduce_sum(tf.where(is_top, lower, tf.zeros_like(lower)), axis=-1)
    p2_upper = tf.reduce_max(tf.where(is_top, tf.zeros_like(upper), upper), axis=-1)
    return p1_lower, tf.minimum(p2_upper, complement_up(p1_lower)), top


def cohen_split_bounds(counts_estimation: TensorLike, selected_class: TensorLike,
                       alpha: TensorLike) -> tuple[tf.Tensor, tf.Tensor]:
    """Bounds for a class chosen on separate selection samples (Cohen et al. 2019).

    The class is picked from n0 selection samples; ``counts_estimation`` are the votes
    of n *fresh* samples, so a single one-sided Clopper-Pearson lower bound at level
    ``alpha`` on the selected class suffices, and ``p2_upper = 1 - p1_lower`` (rounded
    up; docs/SOUNDNESS.md §2).  Core TF only.

    Args:
        counts_estimation: ``[batch, k]`` votes of the estimation samples
            (:func:`vote_counts`).
        selected_class: int ``[batch]`` class chosen on the selection samples, each in
            ``[0, k)``.
        alpha: level in (0, 1): a scalar, or one per image (``[batch]`` or
            ``[batch, 1]``).

    Returns:
        ``(p1_lower, p2_upper)``, float64 ``[batch]`` each.
    """
    counts = vote_counts(counts_estimation, "counts_estimation")
    num_classes = counts.shape[-1] if counts.shape[-1] is not None else tf.shape(counts)[-1]
    selected_class = class_indices(selected_class, num_classes)
    if not selected_class.shape[:1].is_compatible_with(counts.shape[:1]):
        raise ValueError(f"selected_class has {selected_class.shape[0]} classes for "
                         f"{counts.shape[0]} images")
    selected = tf.gather(counts, selected_class, axis=-1, batch_dims=1)
    p1_lower, _ = clopper_pearson_graph(selected, tf.reduce_sum(counts, axis=-1), alpha)
    return p1_lower, complement_up(p1_lower)


def binomial_test_pvalue(successes: TensorLike, trials: TensorLike) -> tf.Tensor:
    """Two-sided exact binomial test of ``p = 1/2`` (Cohen et al.'s PREDICT), core TF.

    For the symmetric null the p-value is ``min(1, 2 P(X >= max(k, n - k)))`` with
    ``X ~ Binomial(n, 1/2)`` and ``P(X >= m) = I_{1/2}(m, n - m + 1)`` (regularized
    incomplete beta; 1 for m = 0), which equals ``scipy.stats.binomtest(k, n).pvalue``.
    The tail is rounded up by the betainc error bound ``η`` of the module docstring, so
    a test at level α <= ``CENTRE_LEVEL`` never rejects more often than α (for n up to
    :data:`MAX_TRIALS`; tails near 1/2 with n > 2**19 may be off by percents, which only
    moves p-values far above such α).

    Args:
        successes: counts k >= 0 of the top class, whole numbers (any shape).
        trials: n = k + (count of the runner-up), whole numbers >= k, broadcastable.

    Returns:
        float64 p-values of the broadcast shape (1 where n = 0).
    """
    k, n = _broadcast(to_float64(successes), to_float64(trials))
    k = checked(k, lambda v: (v >= 0.0) & (v % 1.0 == 0.0), "successes must be integers >= 0")
    n = checked(n, lambda v: (v % 1.0 == 0.0) & (v <= MAX_TRIALS),
                "trials must be integers <= MAX_TRIALS = 2**27")
    m = tf.maximum(k, checked(n - k, lambda v: v >= 0.0, "trials - successes must be >= 0"))
    a, b, half = _broadcast(tf.maximum(m, 1.0), n - m + 1.0, tf.constant(0.5, tf.float64))
    tail = tf.math.betainc(a, b, half) * (1.0 + BETAINC_RELATIVE_ERROR * (a + b))
    return tf.minimum(2.0 * tf.where(m > 0, tail, tf.ones_like(tail)), 1.0)  # graph-safe order
