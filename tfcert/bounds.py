"""Certified radii and KL bounds (guarantees: docs/SOUNDNESS.md §2 and §3).

Every radius takes a lower bound ``p1_lower`` on the top-class probability and an upper
bound ``p2_upper`` on the runner-up probability (see :mod:`tfcert.stats`), and the noise
level σ, and returns the ℓ2 radius (float64 tensor) within which the smoothed classifier
provably keeps its prediction.  The functions

* accept numpy arrays, Python floats or tensors and broadcast them;
* take probabilities only: ``p1_lower`` and ``p2_upper`` in [0, 1] and σ finite and
  > 0; anything else (above 1, negative, NaN, ±inf) is a ``ValueError`` naming the
  argument when it is static, and a failing ``tf.debugging`` assertion
  (``InvalidArgumentError``) inside ``tf.function`` or a SavedModel, never a number;
* use core TensorFlow ops only, with fixed-iteration loops, so they run eagerly, inside
  ``tf.function`` with unknown batch size, and inside an exported SavedModel;
* return 0 where the certificate is empty (``p1_lower <= p2_upper`` as given, before
  the cap below), never NaN;
* never overestimate: inputs are made *more* conservative before use, never less.
  ``p1_lower`` is clipped to at most 1 − 2⁻⁵³ (the largest float64 below 1; a
  Clopper-Pearson lower bound is < 1 for any finite n), which keeps every radius finite
  (at most ≈ 8.6σ).  ``p2_upper`` is capped at ``1 − p1_lower`` (rounded up,
  :func:`tfcert.stats.complement_up`): the runner-up cannot hold more mass than the top
  class leaves, so this is valid whenever ``p1_lower`` is, and it only enlarges the
  radius of inconsistent inputs that still certify (``p1_lower > p2_upper``);
* are sound in float64 for the given (float) inputs, not only in exact arithmetic: the
  Rényi exponent is evaluated without cancellation and rounded down by a margin that
  covers its rounding error (:data:`_RENYI_ROUNDING`); the Cohen radius and the PixelDP
  condition and radius are rounded down by their error bound (:data:`_ROUNDING`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfcert import stats
from tfcert.stats import TensorLike, complement_up, to_float64

# Largest float64 below 1 and its complement 2**-53 (see the module docstring).
_MAX_P1 = float(np.nextafter(1.0, 0.0))
_MIN_P2_COHEN = 1.0 - _MAX_P1

# Rényi search over t = log(α − 1): a coarse grid locates the basin of the maximum, then
# each refinement spreads as many points over the two grid cells around the best point so
# far.  Over the simplex the optimum lies in t ∈ [-1.8, -0.6] (α ≈ 1.16–1.55) or at α → 1
# (p2 → 0, or p1 + p2 small); t = -40 is α − 1 ≈ 4e-18, i.e. the α → 1 limit in float64.
# Every refinement is one vectorised evaluation of the objective (no sequential steps: in
# a graph the op count, not the arithmetic, is the cost of a small batch).
_T_MIN, _T_MAX, _T_GRID = -40.0, 10.0, 64
# The two-cell bracket (width 1.6) shrinks by 63/2 per refinement: points 1.6 (2/63)^4 / 63
# ≈ 2.5e-8 apart in t after the fifth, where the quadratic maximum is flat to ~1e-16.
_REFINEMENTS = 5

# Relative rounding-down of the Rényi exponent (2**-40 ≈ 9.1e-13, i.e. 4.5e-13 on the
# radius).  A forward error analysis of _renyi_exponent bounds the float64 error of each
# evaluation by ≈ 50 ulp (≈ 1.1e-14) when log1p/expm1/atanh/sinh/exp/log are within 2 ulp:
# every step is either well conditioned (condition number <= 2 on its range) or a sum of
# terms of one sign.  Measured against 110-digit mpmath on 2,740 random inputs (near
# ties, tiny p2, p1 near 1, tiny p1 + p2, p1 + p2 = 1; α − 1 from e^-40 to e^10): at most
# 9.2e-16 (4 ulp).  The margin is 80x the analysis and 1000x the measurement; with it the
# radius (then σ·sqrt(2·exponent), two more roundings) never exceeds the exact supremum.
_RENYI_ROUNDING = 2.0 ** -40

# Rounding-error bound (relative, per term) of the Cohen and PixelDP radii: 2**-46 = 128
# ulp.  They take few float64 operations; the worst is tf.math.ndtri, measured at 5.4 ulp
# against 40-digit mpmath (tails down to 1e-16 included); exp, log, sqrt are within 1 ulp.
_ROUNDING = 2.0 ** -46

# Default PixelDP grid (STN Appendix A: "grid search to find ε and δ").
# ε ≤ 1 is the range where the Gaussian mechanism σ = sqrt(2 log(1.25/δ)) Δ/ε is
# (ε, δ)-DP (Dwork & Roth, Thm A.1); δ < 1/2 always, because the condition
# p1 > e^{2ε} p2 + (1 + e^ε) δ forces δ < p1 / 2.
PIXELDP_EPS_GRID = np.linspace(0.01, 1.0, 100)
PIXELDP_DELTA_GRID = np.geomspace(1e-12, 0.5, 241)


def _probabilities(p1_lower: TensorLike,
                   p2_upper: TensorLike) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """float64 ``(p1, p2, certified)`` broadcast together: the inputs checked to be
    probabilities (:func:`tfcert.stats.check_probability`), ``certified = p1_lower >
    p2_upper`` as given, then both made conservative (module docstring)."""
    p1 = stats.check_probability(p1_lower, "p1_lower")
    p2 = stats.check_probability(p2_upper, "p2_upper")
    p1, p2 = p1 + tf.zeros_like(p2), p2 + tf.zeros_like(p1)
    certified = p1 > p2  # before the cap below, which may lower p2 under p1
    p1 = tf.minimum(p1, _MAX_P1)
    return p1, tf.minimum(p2, complement_up(p1)), certified


def _noise_std(sigma: TensorLike) -> tf.Tensor:
    """``sigma`` as float64, checked to be finite and > 0 (:func:`tfcert.stats.checked`:
    at once when static, by an assertion in a graph): a σ <= 0 would turn every radius
    negative or NaN instead of refusing."""
    return stats.checked(to_float64(sigma), lambda s: (s > 0.0) & (s < np.inf),
                         "sigma must be finite and > 0")


def _certified(certified: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """``radius`` where the certificate is non-empty, else 0 (no NaN leaks)."""
    return tf.where(certified, radius, tf.zeros_like(radius))


class _RenyiTerms(NamedTuple):
    """Per-input quantities of the Theorem 2 exponent that do not depend on α.

    With ``d = (p1 − p2)/(p1 + p2)`` the generalized mean factors as
    ``M_{1−α}(p1, p2) = (p1 + p2)/2 · g`` with
    ``log g = ½ log(1 − d²) − log cosh((α − 1) atanh d)/(α − 1)``, a sum of two terms <= 0
    (no cancellation), and the divergence term of the exponent is
    ``1 − p1 − p2 + 2M = 1 − D`` with ``D = (p1 + p2)(1 − g) >= 0``.
    """

    p_sum: tf.Tensor       # p1 + p2
    log_sum: tf.Tensor     # log(p1 + p2)
    half_log: tf.Tensor    # ½ log(1 − d²)
    atanh: tf.Tensor       # atanh(d)
    log_rest: tf.Tensor    # log(1 − p1 − p2), the rest clamped at >= 0 (conservative)


def _renyi_terms(p1: tf.Tensor, p2: tf.Tensor) -> _RenyiTerms:
    """:class:`_RenyiTerms` to a few ulp: for d <= 1/2 from d itself (d is exact up to two
    roundings; p1 − p2 is exact near ties), for d > 1/2 from ``1 − d = 2 p2/(p1 + p2)``,
    which keeps the digits of a tiny p2."""
    p_sum = p1 + p2
    d = tf.math.divide_no_nan(p1 - p2, p_sum)
    log_one_minus_d = tf.math.log(tf.math.divide_no_nan(2.0 * p2, p_sum))
    log_one_plus_d = tf.math.log1p(d)
    near = d <= 0.5
    d_near = tf.minimum(d, 0.5)  # keeps the unused branches finite
    half_log = tf.where(near, 0.5 * tf.math.log1p(-tf.square(d_near)),
                        0.5 * (log_one_plus_d + log_one_minus_d))
    atanh = tf.where(near, tf.math.atanh(d_near), 0.5 * (log_one_plus_d - log_one_minus_d))
    rest = tf.maximum((1.0 - p1) - p2, 0.0)
    return _RenyiTerms(p_sum, tf.math.log(p_sum), half_log, atanh, tf.math.log(rest))


def _log_cosh(y: tf.Tensor) -> tf.Tensor:
    """``log cosh y`` for y >= 0 without overflow or cancellation."""
    small = tf.math.log1p(2.0 * tf.square(tf.sinh(0.5 * tf.minimum(y, 1.0))))
    large = y - math.log(2.0) + tf.math.log1p(tf.exp(-2.0 * y))
    return tf.where(y < 1.0, small, large)


def _renyi_exponent(t: tf.Tensor, terms: _RenyiTerms) -> tf.Tensor:
    """``−(1/α) log(1 − p1 − p2 + 2 M_{1−α}(p1, p2))`` at ``α = 1 + e^t`` (STN Theorem 2).

    Evaluated as ``−log1p(−D)/α`` while ``D <= 1/2`` (relative accuracy of D carries
    over: near ties D ~ (p1 − p2)² is tiny and ``1 − D`` would cancel), else as
    ``−log(rest + 2M)/α`` with ``log 2M = log(p1 + p2) + log g`` (accurate when 1 − D is
    small).  See :class:`_RenyiTerms`; g → 0 for p2 = 0, and g → √(p1 p2)/m (the geometric
    mean over m = (p1 + p2)/2) as α → 1.
    """
    gamma = tf.exp(t)
    log_g = terms.half_log - _log_cosh(gamma * terms.atanh) / gamma
    divergence = -terms.p_sum * tf.math.expm1(log_g)  # D
    near = -tf.math.log1p(-tf.minimum(divergence, 0.5))
    far = -_logaddexp(terms.log_rest, terms.log_sum + log_g)
    return tf.where(divergence <= 0.5, near, far) / (1.0 + gamma)


def _logaddexp(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """``log(e^x + e^y)`` for broadcastable x, y, not both −inf."""
    big = tf.maximum(x, y)
    return big + tf.math.log1p(tf.exp(tf.minimum(x, y) - big))


def _renyi_sup(p1: tf.Tensor, p2: tf.Tensor) -> tf.Tensor:
    """``sup_{α>1}`` of :func:`_renyi_exponent` (elementwise), by a grid refined
    :data:`_REFINEMENTS` times around its best point, rounded down by
    :data:`_RENYI_ROUNDING` (a lower bound of the exact supremum)."""
    terms = _RenyiTerms(*(v[..., None] for v in _renyi_terms(p1, p2)))
    fractions = tf.constant(np.linspace(0.0, 1.0, _T_GRID), tf.float64)
    low = tf.fill(tf.shape(p1), tf.constant(_T_MIN, tf.float64))
    high = tf.fill(tf.shape(p1), tf.constant(_T_MAX, tf.float64))
    best = tf.fill(tf.shape(p1), tf.constant(-np.inf, tf.float64))
    for _ in range(1 + _REFINEMENTS):
        t = low[..., None] + (high - low)[..., None] * fractions
        values = _renyi_exponent(t, terms)
        # Every evaluated α > 1 certifies its own value (Theorem 2 takes a sup), so the
        # best of them is a sound, at worst slightly low, estimate of the supremum once
        # the float rounding of the evaluation is taken off.
        best = tf.maximum(best, tf.reduce_max(values, axis=-1))
        at = tf.argmax(values, axis=-1)
        low, high = (_pick(t, tf.clip_by_value(at + shift, 0, _T_GRID - 1)) for shift in (-1, 1))
    return best * (1.0 - _RENYI_ROUNDING)


def _pick(t: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """``t[..., index]`` per element (the mask selects exactly one finite entry)."""
    mask = tf.one_hot(index, _T_GRID, on_value=True, off_value=False)
    return tf.reduce_sum(tf.where(mask, t, tf.zeros_like(t)), axis=-1)


def renyi_radius(p1_lower: TensorLike, p2_upper: TensorLike, sigma: TensorLike) -> tf.Tensor:
    """Rényi-divergence certified ℓ2 radius of STN (Li et al.) Theorem 2.

    ``L = sup_{α>1} sqrt(−(2σ²/α) log(1 − p1 − p2 + 2 M_{1−α}(p1, p2)))`` with the
    generalized mean ``M_β(a, b) = ((a^β + b^β)/2)^{1/β}`` (Lemma 1; Algorithm 1 step 6).
    The supremum is searched over all α > 1: a 64-point grid in
    ``t = log(α − 1) ∈ [−40, 10]``, refined five times by 64 points over the two cells
    around the best point so far.  The exponent is evaluated in a cancellation-free form (``_RenyiTerms``:
    ``1 − p1 − p2 + 2M = 1 − D`` with D computed directly, so near-ties keep their
    digits) and the supremum is rounded down by 2⁻⁴⁰ relative: the result is never above
    the exact radius of the given float64 inputs, and below it by at most 1e-12 relative
    (≈ 4.5e-13, the rounding-down; checked against 110-digit mpmath, including near-ties
    with radii down to 1e-12 σ).  The optimum is α ≈ 1.2–1.5 for typical inputs and
    α → 1 as p2 → 0, where ``L = σ sqrt(−2 log(1 − p1))``.

    The bound increases with p1 and decreases with p2, so a lower bound on p(1) and an
    upper bound on p(2) (STN Section 4, :func:`tfcert.stats.simultaneous_bounds`) give
    a sound radius.

    Args:
        p1_lower: lower confidence bound on the top-class probability p(1).
        p2_upper: upper confidence bound on the runner-up probability p(2).
        sigma: standard deviation of the Gaussian noise (pixel scale [0, 1]).

    Returns:
        float64 tensor of the broadcast shape; 0 where ``p1_lower <= p2_upper``.

    Raises:
        ValueError: a static ``p1_lower`` or ``p2_upper`` outside [0, 1] (or NaN), or a
            σ that is not finite and > 0; ``tf.errors.InvalidArgumentError`` for the
            same in a graph (module docstring).

    Example:

    >>> tfcert.bounds.renyi_radius(0.9, 0.1, 1.0)   # 1.031930
    """
    p1, p2, certified = _probabilities(p1_lower, p2_upper)
    sup = tf.maximum(_renyi_sup(p1, p2), 0.0)
    return _certified(certified, _noise_std(sigma) * tf.sqrt(2.0 * sup))


def cohen_radius(p1_lower: TensorLike, p2_upper: TensorLike, sigma: TensorLike) -> tf.Tensor:
    """Certified ℓ2 radius of Cohen et al. 2019: ``σ/2 (Φ⁻¹(p1) − Φ⁻¹(p2))``.

    Not in the two papers; offered for comparison on the same counts.  It is tighter
    than :func:`renyi_radius` (≈ 1.28σ vs 1.03σ at (0.9, 0.1)).  With Cohen's split
    bounds (``p2_upper = 1 − p1_lower``) it is ``σ Φ⁻¹(p1_lower)``.  Besides the common
    clipping of ``p1_lower`` (module docstring), ``p2_upper`` is raised to at least
    2⁻⁵³, which keeps Φ⁻¹ finite and can only lower the radius.  The difference of the
    two Φ⁻¹ values is lowered by ``2⁻⁴⁶ (|Φ⁻¹(p1)| + |Φ⁻¹(p2)|)``, a bound on its
    rounding error (it cancels near ties), so the result never exceeds the exact radius.

    Args and returns: as :func:`renyi_radius`.
    """
    p1, p2, certified = _probabilities(p1_lower, p2_upper)
    p2 = tf.maximum(p2, _MIN_P2_COHEN)
    z1, z2 = tf.math.ndtri(p1), tf.math.ndtri(p2)
    # Near ties the difference cancels: take off its absolute rounding error bound.
    gap = tf.maximum((z1 - z2) - _ROUNDING * (tf.abs(z1) + tf.abs(z2)), 0.0)
    return _certified(certified, 0.5 * _noise_std(sigma) * gap)


def pixeldp_radius(p1_lower: TensorLike, p2_upper: TensorLike, sigma: TensorLike,
                   eps_grid: np.ndarray = PIXELDP_EPS_GRID,
                   delta_grid: np.ndarray = PIXELDP_DELTA_GRID) -> tf.Tensor:
    """PixelDP (Lecuyer et al. 2019) certified ℓ2 radius, maximised over an (ε, δ) grid.

    Gaussian noise of standard deviation σ makes the classifier (ε, δ)-DP for ℓ2 changes
    up to ``L = σ ε / sqrt(2 log(1.25/δ))``, and the prediction is robust at that size if
    ``p1 > e^{2ε} p2 + (1 + e^ε) δ`` (STN Appendix A, with the δ term the STN text
    drops: docs/SOUNDNESS.md §2).  As STN does, the radius is maximised over a grid:
    for each ε the best δ is the largest grid value satisfying the condition (L grows
    with δ), found by binary search, so the maximum over the full grid is exact.  The
    condition's left margin and the radius are rounded down by their float64 error
    bound (:data:`_ROUNDING`), so a grid pair is used only if it satisfies the exact
    condition.

    Over STN's region of Fig. 4 (p1 >= p2, 0.2 <= p1 + p2 <= 1) it stays below
    :func:`renyi_radius` (by a factor >= 1.28 with the default grid); for
    p1 + p2 < 0.2 (many classes, tiny p1) a large δ can make it exceed Rényi.

    Args:
        p1_lower, p2_upper, sigma: as :func:`renyi_radius`.
        eps_grid: candidate ε values in (0, 1]; default 100 values 0.01, 0.02, ..., 1.
        delta_grid: candidate δ values in (0, 1); default 241 log-spaced values from
            1e-12 to 0.5 (δ >= p1/2 never satisfies the condition).

    Returns:
        float64 tensor of the broadcast shape; 0 where no grid pair certifies.
    """
    p1, p2, certified = _probabilities(p1_lower, p2_upper)
    eps = tf.constant(np.asarray(eps_grid, np.float64))
    deltas = tf.constant(np.sort(np.asarray(delta_grid, np.float64)))
    # Largest δ allowed by the condition, per (input, ε): δ must be strictly below it.
    # Numerator rounded down by its absolute error bound, denominator up.
    scaled_p2 = tf.exp(2.0 * eps) * p2[..., None]
    numerator = (p1[..., None] - scaled_p2) - _ROUNDING * (p1[..., None] + scaled_p2)
    delta_max = numerator / ((1.0 + tf.exp(eps)) * (1.0 + _ROUNDING))
    index = tf.reshape(tf.searchsorted(deltas[None], tf.reshape(delta_max, [1, -1]),
                                       side="left"), tf.shape(delta_max)) - 1
    delta = tf.gather(deltas, tf.maximum(index, 0))
    radius = eps / tf.sqrt(2.0 * tf.math.log(1.25 / delta)) * (1.0 - _ROUNDING)
    best = tf.reduce_max(tf.where(index >= 0, radius, tf.zeros_like(radius)), axis=-1)
    return _certified(certified, _noise_std(sigma) * best)


def gaussian_kl_bound(eps: TensorLike, num_pixels: TensorLike, channels: TensorLike,
                      sigma: TensorLike) -> tf.Tensor:
    """KL bound of Gaussian randomization under an ℓ∞ attack (Zhang & Liang eq. 4).

    ``D_KL(p_x̃ ‖ p_x̃') = Σ_i ‖x_i − x'_i‖² / (2σ²) <= n q ε² / (2σ²)`` for n pixels of
    q channels each, ℓ∞ perturbation ε and noise N(0, σ²I).  ε and σ on the
    same pixel scale ([0, 1]: 8/255 ≈ 0.031).

    Returns:
        float64 tensor of the broadcast shape.

    Raises:
        ValueError: ε not finite and >= 0, pixel or channel counts not whole numbers
            >= 1, σ not finite and > 0 (``InvalidArgumentError`` in a graph).

    Example:

    >>> tfcert.bounds.gaussian_kl_bound(0.1, 28 * 28, 1, 0.15)   # 784 · 0.01 / 0.045
    """
    eps = stats.checked(to_float64(eps), lambda e: (e >= 0.0) & (e < np.inf),
                        "eps must be finite and >= 0")
    n, q = (stats.checked(to_float64(v), lambda c: (c >= 1.0) & (c % 1.0 == 0.0),
                          f"{name} must be a whole number >= 1")
            for v, name in ((num_pixels, "num_pixels"), (channels, "channels")))
    sigma = _noise_std(sigma)
    return n * q * tf.square(eps) / (2.0 * tf.square(sigma))
