"""Anytime-valid one-sided confidence sequences for a Bernoulli probability.

A confidence sequence (CS) at level α is a sequence of bounds ``L_1, L_2, …`` such that
``P(∃ n: p < L_n) ≤ α``: the bound holds at *every* sample count simultaneously, so it
holds at any stopping time, however the time to stop is chosen (optional stopping).  A
fixed-n Clopper-Pearson bound only holds at an n fixed in advance.  Both sequences here
come from a nonnegative supermartingale ``E_n(p₀)`` (an "e-process") per candidate value
p₀ with ``E_0 = 1`` under ``p ≤ p₀``; by Ville's inequality ``P(∃ n: E_n(p) ≥ 1/α) ≤ α``,
so ``{p₀ : E_n(p₀) < 1/α}`` is a CS.  Upper bounds are lower bounds of the
complementary stream ``1 − X_i``.

References: H. Robbins, Statistical methods related to the law of the iterated
logarithm, Ann. Math. Statist. 1970 (mixture martingales); S. R. Howard, A. Ramdas,
J. McAuliffe, J. Sekhon, Time-uniform, nonparametric, nonasymptotic confidence
sequences, Ann. Statist. 2021 (one-sided beta-binomial mixtures); I. Waudby-Smith,
A. Ramdas, Estimating means of bounded random variables by betting, JRSS B 2023.

The votes arrive in *looks* (batches of draws): ``successes[..., j]`` of ``trials[j]``
draws in look j.  A bound computed after any look holds simultaneously over all looks.

* :func:`mixture_lower` — the one-sided beta-binomial mixture (Robbins 1970): the
  likelihood ratio of the data under q against p₀, averaged over the prior Beta(a, b)
  restricted to the one-sided alternative q > p₀ (and renormalised),
  ``E_n(p₀) = ∫_{q>p₀} Π_i Bern(x_i; q) / Bern(x_i; p₀) dBeta(q; a, b) / P_Beta(q > p₀)``.
  Each ratio is a supermartingale under any p ≤ p₀ (its expected factor is
  ``1 + (q − p₀)(p − p₀)/(p₀(1 − p₀)) ≤ 1``), so is the average.  It depends on the
  counts only, in closed form (conjugacy):
  ``log E = lbeta(S + a, F + b) − lbeta(a, b) − S log p₀ − F log(1 − p₀)
  + log I_{1−p₀}(F + b, S + a) − log I_{1−p₀}(b, a)`` (S successes, F failures).
* :func:`betting_lower` — the betting CS for bounded means (Waudby-Smith & Ramdas 2023,
  Sec. 4): the capital ``K_n(m) = Π_i (1 + λ_i(m)(x_i − m))`` of a gambler betting that
  the mean exceeds m, with the predictable plug-in bet ``λ_i = sqrt(2 log(1/α) /
  (σ̂²_{i−1} i log(1 + i)))`` (their PrPl rule, one-sided) truncated to ``c/m``.  Here the
  bet is constant within a look (computed from the looks before), which keeps it
  predictable and makes the capital a function of the per-look counts.

Inversion.  Both e-processes decrease in p₀ where the bound lies, so the CS is
``[L_n, 1]`` and a bisection whose lower end is always a *rejected* point (evaluated
``log E ≥ log(1/α) + margin``) returns a sound ``L_n`` (everything below it is rejected):

* betting: each factor ``1 + min(λ, c/m)(x − m)`` is non-increasing in m, for x = 0 and
  x = 1, so ``K_n`` is (Waudby-Smith & Ramdas, Sec. 4.3);
* mixture: on ``[0, S/n]``, ``d log E/dp₀ = h(p₀)(1 − 1/E) − (S − n p₀)/(p₀(1 − p₀))``
  with h the hazard rate ``π(p₀)/P_π(q > p₀)`` of the prior.  For a ≥ 1 the Beta prior's
  hazard increases (its density is log-concave, or non-decreasing if b < 1), and the
  second term's factor decreases, so E crosses 1/α only once, downwards: at an upward
  crossing y, ``h(y)(1 − α) ≥ (S − n y)/(y(1 − y))``; beyond y, as long as E ≥ 1/α,
  the derivative is then positive, so E would stay above 1/α up to S/n, where
  ``E ≤ 1`` (the likelihood peaks at S/n) — a contradiction.  The rejected set is an
  interval ``[0, L)``.

Floating point: rejection needs ``log E − log(1/α)`` to exceed the evaluation-error
bound of ``log E``: ``EVIDENCE_RELATIVE_ERROR`` times the sum of the magnitudes of its
terms (each ``lgamma``, ``xlogy``, ``log1p`` is accurate to a few ulps) plus
``EVIDENCE_ABSOLUTE_ERROR``, plus, for the mixture, the error model of ``tf.math.betainc``
of `tfcert.stats` (relative error below ``BETAINC_RELATIVE_ERROR · (a + b)``, so the
error of its log is below that too) for each of its two incomplete betas.  That model is
validated for ``a + b <= CENTRE_LEVEL_TRIALS`` at every CDF value, and the mixture
evaluates its posterior's CDF near its centre, so it takes n + a + b <= `MAX_MIXTURE_SIZE`
(2**19: n <= 524,286 draws for the uniform prior; the betting sequence has no such limit).  Measured against 40-digit
mpmath (tests/test_sequential.py), the float64 log E errs by at most a tenth of that bound.
``1 − p₀`` is rounded once before betainc; its effect (the posterior density times 2**-53)
is far below the betainc term.  All float64.

Context: Horváth et al. 2022 (Boosting Randomized Smoothing with Variance Reduced
Classifiers, ICLR) certify predetermined radii with adaptive sampling and report up to
55x fewer samples; :mod:`tfcert.sequential` uses these sequences the same way.

Everything here is core TensorFlow (``tf.math.lgamma``, ``xlogy``, ``xlog1py``,
``betainc``, ``log1p``) with the bounds inverted by `tfcert.bisection.bisect`
(``BISECTION_STEPS`` steps): the one implementation behind the Python API (eager or
compiled), early stopping and the exported serving signatures.  Static arguments are
checked at once (``ValueError``), tensors inside a graph by ``tf.debugging`` assertions
(`tfcert.stats.checked`).
"""

from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf

from tfcert import stats
from tfcert.bisection import bisect

# Default Beta(a, b) prior of the mixture: uniform.  Tuned by simulating the votes of
# held-out test images (docs/PERFORMANCE.md, early stopping): mean samples per image at
# the benchmark's targets, Beta(1, 1) 367 (MNIST STN) and 386 (digits), Beta(1, 0.5),
# Beta(2, 1), Beta(1, 2) 371-374 and 399-406 (standard errors 6-16).
PRIOR = (1.0, 1.0)
# Default truncation c of the bets (Waudby-Smith & Ramdas suggest 1/2 or 3/4): same
# simulation, c = 1/2 vs 3/4: 448 vs 399 and 495 vs 489 samples (simultaneous), 264 vs
# 285 and 549 vs 628 (Cohen's statistics); neither wins, so the paper's 1/2.
BET_TRUNCATION = 0.5
# Bisection steps: the bracket [0, 1] halves each step; 2**-60 ≈ 1e-18 is below the
# float64 spacing of every bound >= 2**-10, and 1 − L (upper bounds) is resolved to 2**-53.
BISECTION_STEPS = 60
# Rejection margin (module docstring): lgamma, xlogy, log1p err by a few ulps (~1e-15
# relative); the tests check the float64 log E against mpmath to within a tenth of it.
EVIDENCE_RELATIVE_ERROR = 1e-11
EVIDENCE_ABSOLUTE_ERROR = 1e-9
# Largest n + a + b of the mixture (n draws, prior Beta(a, b)): the validated range of
# tf.math.betainc at the centre of a distribution (module docstring), 2**19.
MAX_MIXTURE_SIZE = stats.CENTRE_LEVEL_TRIALS


def check_prior(prior: tuple[float, float]) -> tuple[float, float]:
    """``prior`` as floats (a, b), checked: a >= 1, b > 0 (module docstring, inversion)."""
    a, b = (float(v) for v in prior)
    if not (a >= 1.0 and b > 0.0 and math.isfinite(a + b)):
        raise ValueError(f"the mixture prior Beta(a, b) needs a >= 1 (increasing hazard "
                         f"rate, module docstring) and b > 0, got {prior}")
    return a, b


def _checked_level(alpha: stats.TensorLike) -> tf.Tensor:
    """``alpha`` as a float64 scalar in (0, 1)."""
    alpha = stats.to_float64(alpha)
    if alpha.shape.rank != 0:
        raise ValueError(f"alpha must be a scalar in (0, 1), got shape {alpha.shape}")
    return stats.checked(alpha, lambda a: (a > 0.0) & (a < 1.0), "alpha must lie in (0, 1)")


def _checked_votes(successes: stats.TensorLike,
                   trials: stats.TensorLike) -> tuple[tf.Tensor, tf.Tensor]:
    """``(successes, trials)`` as float64, checked: ``0 <= successes <= trials < inf``."""
    s, n = stats.to_float64(successes), stats.to_float64(trials)
    s = stats.checked(s, lambda v: v >= 0.0, "successes must be >= 0")
    n = stats.checked(n, lambda v: v < math.inf, "trials must be finite")
    with tf.control_dependencies([stats.checked(n - s, lambda v: v >= 0.0,
                                                "trials - successes must be >= 0")]):
        return tf.identity(s), tf.identity(n)


def _checked_mixture_votes(successes: stats.TensorLike, trials: stats.TensorLike,
                           prior: tuple[float, float]) -> tuple[tf.Tensor, tf.Tensor]:
    """`_checked_votes`, and ``n + a + b <= MAX_MIXTURE_SIZE`` (module docstring)."""
    s, n = _checked_votes(successes, trials)
    limit = MAX_MIXTURE_SIZE - sum(prior)
    return s, stats.checked(n, lambda v: v <= limit,
                            f"the mixture takes n + a + b <= MAX_MIXTURE_SIZE = 2**19 draws "
                            f"and prior (n <= {limit:g}); use the betting sequence beyond")


def _rejected(log_evidence: tf.Tensor, error: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """Whether ``log E >= log(1/α)`` holds beyond the evaluation ``error`` of ``log E``
    (module docstring) and the threshold's own (added here)."""
    threshold = -tf.math.log(alpha)
    margin = error + EVIDENCE_RELATIVE_ERROR * threshold
    return log_evidence >= threshold + margin


def _magnitude(terms: list[tf.Tensor]) -> tf.Tensor:
    """The summed absolute value of the finite ``terms`` (the scale of their rounding)."""
    return sum(tf.where(tf.math.is_finite(t), tf.abs(t), tf.zeros_like(t)) for t in terms)


def _evidence_error(magnitude: tf.Tensor) -> tf.Tensor:
    """``EVIDENCE_RELATIVE_ERROR · magnitude + EVIDENCE_ABSOLUTE_ERROR``."""
    return EVIDENCE_RELATIVE_ERROR * magnitude + EVIDENCE_ABSOLUTE_ERROR


# ------------------------------------------------------------------ beta-binomial mixture
def mixture_log_evidence(successes: stats.TensorLike, trials: stats.TensorLike,
                         p: stats.TensorLike,
                         prior: tuple[float, float] = PRIOR) -> tuple[tf.Tensor, tf.Tensor]:
    """``log E_n(p)`` of the one-sided beta-binomial mixture (module docstring), float64.

    Args:
        successes, trials: S and n (broadcastable; real values allowed), 0 <= S <= n,
            n + a + b <= `MAX_MIXTURE_SIZE`.
        p: the candidate probabilities p₀ in (0, 1).
        prior: (a, b) of the Beta prior.

    Returns:
        ``(log_evidence, error)``: the value and a bound on its float64 evaluation error
        (module docstring); the value is −inf where p lies above all the posterior mass
        (never rejected).
    """
    prior = check_prior(prior)
    s, n = _checked_mixture_votes(successes, trials, prior)
    return _mixture_log_evidence(s, n, prior)(stats.to_float64(p))


def _mixture_log_evidence(s: tf.Tensor, n: tf.Tensor, prior: tuple[float, float]
                          ) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """`mixture_log_evidence` of checked votes, as a function of p₀ (the terms that do not
    depend on p₀, the log-beta ratio, are computed once, outside any bisection)."""
    a, b = prior
    f = n - s
    fixed = [tf.math.lgamma(s + a), tf.math.lgamma(f + b), -tf.math.lgamma(n + a + b),
             tf.constant(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b), tf.float64)]
    fixed_value, fixed_magnitude = sum(fixed), _magnitude(fixed)
    betainc_error = stats.BETAINC_RELATIVE_ERROR * (n + 2.0 * (a + b))

    def log_evidence(p: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        q = 1.0 - p
        terms = [-tf.math.xlogy(s, p), -tf.math.xlog1py(f, -p),
                 tf.math.log(tf.math.betainc(f + b, s + a, q)),
                 -tf.math.log(tf.math.betainc(tf.constant(b, tf.float64),
                                              tf.constant(a, tf.float64), q))]
        error = _evidence_error(fixed_magnitude + _magnitude(terms)) + betainc_error
        return fixed_value + sum(terms), error

    return log_evidence


def mixture_lower(successes: stats.TensorLike, trials: stats.TensorLike,
                  alpha: stats.TensorLike, prior: tuple[float, float] = PRIOR,
                  steps: int = BISECTION_STEPS) -> tf.Tensor:
    """One-sided beta-binomial mixture confidence sequence (Robbins 1970): a lower bound
    on p that holds simultaneously for every n with probability ≥ 1 − ``alpha``.

    ``L_n = inf {p₀ : E_n(p₀) < 1/α}`` for the prior Beta(a, b) restricted to the
    alternative q > p₀ (module docstring), found by a sound bisection on ``[0, S/n]``.

    Args:
        successes: S, votes for the class (any shape; may be real in projections),
            in [0, n].
        trials: n, broadcastable against ``successes``, with n + a + b <=
            `MAX_MIXTURE_SIZE`.
        alpha: level, a scalar in (0, 1).
        prior: (a, b), a ≥ 1; default `PRIOR`.
        steps: bisection halvings (fewer: sound, up to ``2**-steps · S/n`` looser).

    Returns:
        float64 lower bounds of the broadcast shape (0 where S = 0).

    Raises:
        ValueError: static arguments outside this contract (naming them);
            ``tf.errors.InvalidArgumentError`` for tensors inside a graph.
    """
    prior = check_prior(prior)
    alpha = _checked_level(alpha)
    s, n = _checked_mixture_votes(successes, trials, prior)
    s, n = s + tf.zeros_like(n), n + tf.zeros_like(s)
    high = tf.math.divide_no_nan(s, n)

    log_evidence = _mixture_log_evidence(s, n, prior)

    def rejects(p):
        return _rejected(*log_evidence(p), alpha)

    low, _ = bisect(rejects, tf.zeros_like(high), high, steps)
    return low


# ------------------------------------------------------------------------------- betting
def betting_bets(successes: stats.TensorLike, trials: stats.TensorLike,
                 alpha: stats.TensorLike) -> tf.Tensor:
    """Predictable plug-in bets λ_j of each look (Waudby-Smith & Ramdas 2023, PrPl).

    Look j bets ``sqrt(2 log(1/α) / (σ̂² t log(1 + t)))`` on each of its draws, with
    ``t = n_{j−1} + 1`` (the number of its first draw) and the running estimates of the
    looks before: ``μ̂ = (1/2 + S)/(t_prev + 1)``, ``σ̂² = (1/4 + Σ (x_i − μ̂)²)/(t_prev + 1)``
    (each look's deviations taken from the estimate after it).

    Args:
        successes: [..., J] successes per look.
        trials: [J] draws per look (the same for every stream).
        alpha: level of the sequence (enters the bet size).

    Returns:
        float64 [..., J] bets (before the ``c/m`` truncation).
    """
    s, n = stats.to_float64(successes), stats.to_float64(trials)
    drawn = tf.cumsum(n)
    before = drawn - n  # draws before each look
    mean_after = (0.5 + tf.cumsum(s, axis=-1)) / (drawn + 1.0)
    squares = s * (1.0 - mean_after) ** 2 + (n - s) * mean_after ** 2
    variance = (0.25 + tf.cumsum(squares, axis=-1, exclusive=True)) / (before + 1.0)
    t = before + 1.0
    return tf.sqrt(2.0 * tf.math.log(1.0 / stats.to_float64(alpha))
                   / (variance * t * tf.math.log1p(t)))


def betting_log_capital(successes: stats.TensorLike, trials: stats.TensorLike,
                        m: stats.TensorLike, alpha: stats.TensorLike,
                        truncation: float = BET_TRUNCATION) -> tuple[tf.Tensor, tf.Tensor]:
    """``log K_n(m)`` of the one-sided betting CS after the last look, and its error bound.

    Args:
        successes: [..., J] successes per look; trials: [J] draws per look.
        m: [...] candidate means in (0, 1].
        alpha: level (bet size); truncation: c in (0, 1), bets at most ``c/m``.

    Returns:
        ``(log_capital, error)`` of shape [...], as `mixture_log_evidence`.
    """
    s = stats.to_float64(successes)
    return _log_capital(s, stats.to_float64(trials) - s, betting_bets(s, trials, alpha),
                        stats.to_float64(m), truncation)


def _log_capital(s: tf.Tensor, f: tf.Tensor, bets: tf.Tensor, m: tf.Tensor,
                 truncation: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`betting_log_capital` from the successes, failures and bets per look."""
    m = m[..., None]
    bets = tf.minimum(bets, truncation / m)
    wins, losses = s * tf.math.log1p(bets * (1.0 - m)), f * tf.math.log1p(-bets * m)
    return (tf.reduce_sum(wins + losses, axis=-1),
            _evidence_error(tf.reduce_sum(wins - losses, axis=-1)))


def betting_lower(successes: stats.TensorLike, trials: stats.TensorLike,
                  alpha: stats.TensorLike, truncation: float = BET_TRUNCATION,
                  steps: int = BISECTION_STEPS) -> tf.Tensor:
    """One-sided betting confidence sequence (Waudby-Smith & Ramdas 2023): a lower bound
    on the mean that holds simultaneously after every look with probability ≥ 1 − α.

    Args:
        successes: [..., J] successes per look (the order of the looks matters), each in
            [0, its look's draws].
        trials: [J] draws per look, finite.
        alpha: level, a scalar in (0, 1).
        truncation: c in (0, 1) of the bets ``min(λ, c/m)``; default `BET_TRUNCATION`.
        steps: bisection halvings (fewer: sound, up to ``2**-steps`` looser).

    Returns:
        float64 [...] lower bounds after the last look.

    Raises:
        As `mixture_lower`.
    """
    if not 0.0 < truncation < 1.0:
        raise ValueError(f"truncation must be in (0, 1), got {truncation}")
    alpha = _checked_level(alpha)
    s, n = _checked_votes(successes, trials)
    f, bets = n - s, betting_bets(s, n, alpha)  # the bets do not depend on m

    def rejects(m):  # m > 0: the bisection of [0, 1] never evaluates 0
        return _rejected(*_log_capital(s, f, bets, m, truncation), alpha)

    ones = tf.ones(tf.shape(s)[:-1], tf.float64)
    low, _ = bisect(rejects, tf.zeros_like(ones), ones, steps)
    return low
