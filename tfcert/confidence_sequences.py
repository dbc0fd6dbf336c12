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

Floating point: rejection needs ``log E − log(1/α)`` to exceed a margin of
``EVIDENCE_RELATIVE_ERROR`` times the sum of the magnitudes of the terms plus
``EVIDENCE_ABSOLUTE_ERROR``, far above the float64 error of scipy's betaln, xlogy and
betainc (Boost; checked against mpmath in tests/test_sequential.py).  All float64.

Context: Horváth et al. 2022 (Boosting Randomized Smoothing with Variance Reduced
Classifiers, ICLR) certify predetermined radii with adaptive sampling and report up to
55x fewer samples; :mod:`tfcert.sequential` uses these sequences the same way.

Every function here maps op for op onto core TensorFlow (``tf.math.lbeta``,
``tf.math.xlogy``, ``tf.math.xlog1py``, ``tf.math.betainc``, ``tf.math.log1p``), and the
bounds are inverted by `tfcert.bisection.bisect` (``BISECTION_STEPS`` steps), so an
exported serving signature can compute the same bounds in-graph.
"""

from __future__ import annotations

import numpy as np
from scipy import special

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
# Rejection margin (module docstring): scipy's betaln, xlogy and betainc (Boost) err by
# ~1e-15 relative, up to ~1e-13 for betainc with large shapes; the tests check the
# float64 log E against mpmath (n <= 5,000) to within a tenth of this margin.
EVIDENCE_RELATIVE_ERROR = 1e-11
EVIDENCE_ABSOLUTE_ERROR = 1e-9


def _as_float64(*arrays) -> list[np.ndarray]:
    """``arrays`` broadcast together, as float64."""
    return [np.asarray(a, np.float64) for a in np.broadcast_arrays(*arrays)]


def _check_votes(successes, trials, alpha: float) -> None:
    """The contract of the lower bounds: ``alpha`` a scalar in (0, 1), ``0 <= successes
    <= trials`` (finite, broadcast together); a ``ValueError`` naming what is off."""
    if np.ndim(alpha) != 0 or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a scalar in (0, 1), got {alpha}")
    s, n = _as_float64(successes, trials)
    if not np.all((s >= 0.0) & (s <= n) & (n < np.inf)):
        raise ValueError("successes must lie in [0, trials] and trials be finite")


def check_prior(prior: tuple[float, float]) -> tuple[float, float]:
    """``prior`` as floats (a, b), checked: a >= 1, b > 0 (module docstring, inversion)."""
    a, b = (float(v) for v in prior)
    if not (a >= 1.0 and b > 0.0 and np.isfinite(a + b)):
        raise ValueError(f"the mixture prior Beta(a, b) needs a >= 1 (increasing hazard "
                         f"rate, module docstring) and b > 0, got {prior}")
    return a, b


def _rejected(log_evidence: np.ndarray, magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """Whether ``log E >= log(1/α)`` holds beyond the evaluation error (module docstring)."""
    margin = EVIDENCE_RELATIVE_ERROR * (magnitude + abs(np.log(alpha))) + EVIDENCE_ABSOLUTE_ERROR
    return log_evidence >= np.log(1.0 / alpha) + margin


def _bisect(rejects, high: np.ndarray) -> np.ndarray:
    """The lower end of a bisection of ``[0, high]`` (`tfcert.bisection.bisect`, eagerly):
    a point where ``rejects`` (non-increasing in p: true, then false) held, or 0."""
    low, _ = bisect(rejects, np.zeros_like(high), high, BISECTION_STEPS)
    return low.numpy()


# ------------------------------------------------------------------ beta-binomial mixture
def mixture_log_evidence(successes, trials, p,
                         prior: tuple[float, float] = PRIOR) -> tuple[np.ndarray, np.ndarray]:
    """``log E_n(p)`` of the one-sided beta-binomial mixture (module docstring), float64.

    Args:
        successes, trials: S and n (broadcastable; real values allowed).
        p: the candidate probabilities p₀ in (0, 1).
        prior: (a, b) of the Beta prior.

    Returns:
        ``(log_evidence, magnitude)``: the value and the sum of the absolute values of its
        terms (the scale of its rounding error).
    """
    a, b = check_prior(prior)
    s, n, p = _as_float64(successes, trials, p)
    f = n - s
    q = 1.0 - p
    terms = [special.betaln(s + a, f + b), -special.betaln(a, b), -special.xlogy(s, p),
             -special.xlog1py(f, -p), np.log(special.betainc(f + b, s + a, q)),
             -np.log(special.betainc(b, a, q))]
    total = sum(terms)  # -inf where p lies above all the posterior mass: not rejected
    magnitude = sum(np.where(np.isfinite(t), np.abs(t), 0.0) for t in terms)
    return total, magnitude


def mixture_lower(successes, trials, alpha: float,
                  prior: tuple[float, float] = PRIOR) -> np.ndarray:
    """One-sided beta-binomial mixture confidence sequence (Robbins 1970): a lower bound
    on p that holds simultaneously for every n with probability ≥ 1 − ``alpha``.

    ``L_n = inf {p₀ : E_n(p₀) < 1/α}`` for the prior Beta(a, b) restricted to the
    alternative q > p₀ (module docstring), found by a sound bisection on ``[0, S/n]``.

    Args:
        successes: S, votes for the class (any shape; may be real in projections),
            in [0, n].
        trials: n, broadcastable against ``successes``, finite.
        alpha: level, a scalar in (0, 1) (a ``ValueError`` otherwise, as for the
            votes).
        prior: (a, b), a ≥ 1; default `PRIOR`.

    Returns:
        float64 lower bounds of the broadcast shape (0 where S = 0).
    """
    prior = check_prior(prior)
    _check_votes(successes, trials, alpha)
    s, n = _as_float64(successes, trials)

    def rejects(p):
        return _rejected(*mixture_log_evidence(s, n, p, prior), alpha)

    return _bisect(rejects, np.divide(s, n, out=np.zeros_like(s), where=n > 0))


# ------------------------------------------------------------------------------- betting
def betting_bets(successes, trials, alpha: float) -> np.ndarray:
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
    s = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    before = np.concatenate([[0.0], np.cumsum(n)[:-1]])  # draws before each look
    mean_after = (0.5 + np.cumsum(s, axis=-1)) / (np.cumsum(n) + 1.0)
    squares = s * (1.0 - mean_after) ** 2 + (n - s) * mean_after ** 2
    sum_before = np.concatenate([np.zeros_like(s[..., :1]), np.cumsum(squares, axis=-1)[..., :-1]],
                                axis=-1)
    variance = (0.25 + sum_before) / (before + 1.0)
    t = before + 1.0
    return np.sqrt(2.0 * np.log(1.0 / alpha) / (variance * t * np.log1p(t)))


def betting_log_capital(successes, trials, m, alpha: float,
                        truncation: float = BET_TRUNCATION) -> tuple[np.ndarray, np.ndarray]:
    """``log K_n(m)`` of the one-sided betting CS after the last look, and its magnitude.

    Args:
        successes: [..., J] successes per look; trials: [J] draws per look.
        m: [...] candidate means in (0, 1].
        alpha: level (bet size); truncation: c in (0, 1), bets at most ``c/m``.

    Returns:
        ``(log_capital, magnitude)`` of shape [...], as `mixture_log_evidence`.
    """
    s = np.asarray(successes, np.float64)
    f = np.asarray(trials, np.float64) - s
    m = np.asarray(m, np.float64)[..., None]
    bets = np.minimum(betting_bets(s, trials, alpha), truncation / m)
    wins, losses = s * np.log1p(bets * (1.0 - m)), f * np.log1p(-bets * m)
    return (wins + losses).sum(axis=-1), (wins - losses).sum(axis=-1)


def betting_lower(successes, trials, alpha: float,
                  truncation: float = BET_TRUNCATION) -> np.ndarray:
    """One-sided betting confidence sequence (Waudby-Smith & Ramdas 2023): a lower bound
    on the mean that holds simultaneously after every look with probability ≥ 1 − α.

    Args:
        successes: [..., J] successes per look (the order of the looks matters), each in
            [0, its look's draws].
        trials: [J] draws per look, finite.
        alpha: level, a scalar in (0, 1) (a ``ValueError`` otherwise, as for the votes).
        truncation: c in (0, 1) of the bets ``min(λ, c/m)``; default `BET_TRUNCATION`.

    Returns:
        float64 [...] lower bounds after the last look.
    """
    if not 0.0 < truncation < 1.0:
        raise ValueError(f"truncation must be in (0, 1), got {truncation}")
    _check_votes(successes, trials, alpha)
    s = np.asarray(successes, np.float64)

    def rejects(m):  # m > 0: the bisection of [0, 1] never evaluates 0
        return _rejected(*betting_log_capital(s, trials, m, alpha, truncation), alpha)

    return _bisect(rejects, np.ones(s.shape[:-1]))
