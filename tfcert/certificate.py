"""The certificate of STN Algorithm 1 (steps 4–6) from vote counts, and Cohen et al.'s
PREDICT test: each written once, in core TensorFlow ops (docs/SOUNDNESS.md §2).

Every path calls these functions: `SmoothedClassifier.certify` / `predict` (eagerly),
`tfcert.sequential` at each look (compiled), and the exported serving signatures (inside
the SavedModel's graph).

* `count_bounds`: counts → (p1_lower, p2_upper, top) under the ``"simultaneous"`` (STN
  Section 4) or ``"cohen"`` statistics (`tfcert.stats`);
* `certify_bounds`: bounds → prediction (−1 where p1_lower <= p2_upper: abstain) and
  the requested radii (`RADII`, 0 where abstaining);
* `certify_counts`: the two together, as a dict of tensors;
* `predict_counts`: PREDICT's two-sided binomial test of the top class against the
  runner-up.

`certificate_from_counts` / `certificate_from_bounds` wrap them into a numpy
`Certificate`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfcert import bounds, stats

RADII = {"renyi": bounds.renyi_radius, "cohen": bounds.cohen_radius,
         "pixeldp": bounds.pixeldp_radius}
STATISTICS = ("simultaneous", "cohen")
ABSTAIN = -1


@dataclasses.dataclass
class Certificate:
    """Per-image result of `SmoothedClassifier.certify` (numpy arrays, batch first).

    Attributes:
        prediction: int64 class, −1 where the classifier abstains.
        radius: float64 certified ℓ2 radius of the first requested bound (0 if abstain).
        radii: every requested bound's radius, by name.
        counts: int64 [batch, num_classes] votes the bounds were computed from.
        p1_lower: lower confidence bound of the top class probability.
        p2_upper: upper confidence bound of the runner-up probability.
        num_samples: int64 [batch], noisy draws spent on each image (the votes in
            ``counts`` plus the selection samples under Cohen's statistics); they
            differ between images under early stopping (:mod:`tfcert.sequential`).
    """

    prediction: np.ndarray
    radius: np.ndarray
    radii: dict[str, np.ndarray]
    counts: np.ndarray
    p1_lower: np.ndarray
    p2_upper: np.ndarray
    num_samples: np.ndarray


def bound_names(bound: str | Sequence[str]) -> list[str]:
    """``bound`` as a checked, non-empty list of radius names (keys of `RADII`)."""
    names = [bound] if isinstance(bound, str) else list(bound)
    unknown = [b for b in names if b not in RADII]
    if not names or unknown:
        raise ValueError(f"unknown bound(s) {unknown or names}; choose from {sorted(RADII)}")
    return names


def check_statistics(statistics: str) -> str:
    """``statistics`` checked to be one of `STATISTICS`."""
    if statistics not in STATISTICS:
        raise ValueError(f"unknown statistics {statistics!r}; choose from {STATISTICS}")
    return statistics


def count_bounds(counts: stats.TensorLike, alpha: stats.TensorLike,
                 statistics: str = "simultaneous",
                 selected: stats.TensorLike | None = None
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(p1_lower, p2_upper, top)`` of the votes (STN Algorithm 1 steps 4–5).

    ``"simultaneous"``: the top class and Bonferroni bounds over the k classes of the same
    counts (`tfcert.stats.simultaneous_bounds`); ``"cohen"``: the ``selected`` class
    (chosen on separate selection draws) with its one-sided bound at level α
    (`tfcert.stats.cohen_split_bounds`).  Inputs as `certificate_from_counts`.
    """
    if check_statistics(statistics) == "simultaneous":
        return stats.simultaneous_bounds(counts, alpha)
    if selected is None:
        raise ValueError("statistics='cohen' needs the classes selected on separate samples")
    p1_lower, p2_upper = stats.cohen_split_bounds(counts, selected, alpha)  # checks both
    return p1_lower, p2_upper, tf.cast(selected, tf.int64)


def certify_bounds(p1_lower: tf.Tensor, p2_upper: tf.Tensor, top: tf.Tensor,
                   sigma: stats.TensorLike,
                   names: Sequence[str]) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """The prediction (``top``, or `ABSTAIN` where ``p1_lower <= p2_upper``) and each radius
    of ``names`` (`RADII`, 0 where abstaining) at noise level ``sigma`` (STN step 6)."""
    prediction = tf.where(p1_lower > p2_upper, tf.cast(top, tf.int64),
                          tf.constant(ABSTAIN, tf.int64))
    return prediction, {name: RADII[name](p1_lower, p2_upper, sigma) for name in names}


def certify_counts(counts: stats.TensorLike, alpha: stats.TensorLike, sigma: stats.TensorLike,
                   names: Sequence[str], statistics: str = "simultaneous",
                   selected: stats.TensorLike | None = None) -> dict[str, tf.Tensor]:
    """`count_bounds` then `certify_bounds`: ``prediction``, ``p1_lower``, ``p2_upper`` and
    one entry per radius name (core TF: eager, ``tf.function`` or a SavedModel)."""
    p1_lower, p2_upper, top = count_bounds(counts, alpha, statistics, selected)
    prediction, radii = certify_bounds(p1_lower, p2_upper, top, sigma, names)
    return {"prediction": prediction, "p1_lower": p1_lower, "p2_upper": p2_upper, **radii}


def select_counts(counts: stats.TensorLike) -> tf.Tensor:
    """Cohen et al.'s selection step: int64 [batch], the class with the most of each
    image's selection votes ``[batch, k]`` (first on ties), the class Cohen's statistics
    bound.  Core TF: `SmoothedClassifier.select` and the export's ``certify_target`` call it."""
    return tf.argmax(stats.vote_counts(counts), axis=-1, output_type=tf.int64)


def predict_counts(counts: stats.TensorLike,
                   alpha: stats.TensorLike) -> tuple[tf.Tensor, tf.Tensor]:
    """Cohen et al.'s PREDICT on votes ``[batch, k]``: ``(prediction, p_value)``.

    The top class (first on ties) where the two-sided exact binomial test of its count
    against the runner-up's (`tfcert.stats.binomial_test_pvalue`) rejects equality at
    level ``alpha`` (a scalar or one per image), else `ABSTAIN`.  The returned class
    differs from the smoothed classifier's with probability at most ``alpha``.
    """
    counts = stats.vote_counts(counts)
    level = stats.per_image_level(alpha, counts.shape[:1])
    top = tf.argmax(counts, axis=-1, output_type=tf.int64)
    is_top = tf.one_hot(top, tf.shape(counts)[-1], on_value=True, off_value=False)
    first = tf.reduce_max(counts, axis=-1)
    second = tf.reduce_max(tf.where(is_top, tf.zeros_like(counts), counts), axis=-1)
    p_value = stats.binomial_test_pvalue(first, first + second)
    return tf.where(p_value <= level, top, tf.constant(ABSTAIN, tf.int64)), p_value


def certificate_from_counts(counts: np.ndarray, alpha: float | np.ndarray, sigma: float,
                            bound: str | Sequence[str] = "renyi",
                            statistics: str = "simultaneous",
                            selected: np.ndarray | None = None,
                            num_samples: np.ndarray | int | None = None) -> Certificate:
    """STN Algorithm 1 steps 4–6 on vote counts (`count_bounds`, `certify_bounds`).

    Args:
        counts: ``[batch, k]`` votes, non-negative integers (n = their row sum; an
            integer-valued float array is accepted, a fractional one refused).
        alpha: failure probability of each image's certificate, in (0, 1): a scalar, or
            one per image (``[batch]`` or ``[batch, 1]``).
        sigma: noise σ of the radii, finite and > 0.
        bound: radius name(s) of `RADII`; ``radius`` is the first one's.
        statistics: ``"simultaneous"`` (top class from ``counts``, bounds simultaneous
            over the k classes) or ``"cohen"`` (``selected`` class from separate
            selection samples, one-sided bound at level α).
        selected: int [batch] classes in [0, k) chosen on the selection samples
            (``"cohen"`` only).
        num_samples: draws per image recorded in the certificate, whole numbers >= the
            row sums, a scalar or [batch] (default: the row sums).

    Raises:
        ValueError: any argument outside this contract, naming it (`tfcert.stats`).
    """
    names = bound_names(bound)
    counts = np.array(stats.vote_counts(counts), np.int64)  # the certificate owns a copy
    p1_lower, p2_upper, top = count_bounds(counts, alpha, statistics, selected)
    return certificate_from_bounds(counts, top, p1_lower, p2_upper, sigma, names,
                                   _draws_spent(counts, num_samples))


def certificate_from_bounds(counts: np.ndarray, top: stats.TensorLike,
                            p1_lower: stats.TensorLike, p2_upper: stats.TensorLike,
                            sigma: float, names: Sequence[str],
                            num_samples: np.ndarray) -> Certificate:
    """The `Certificate` of bounds already computed from ``counts`` (`certify_bounds`,
    compiled: an eager Rényi search costs ~0.1 s a call)."""
    prediction, radii = _compiled_certify_bounds(
        *(tf.constant(np.asarray(v, dtype)) for v, dtype in
          ((p1_lower, np.float64), (p2_upper, np.float64), (top, np.int64))),
        float(sigma), tuple(names))
    radii = {name: np.array(radii[name], np.float64) for name in names}  # writable copies
    return Certificate(prediction=np.array(prediction, np.int64), radius=radii[names[0]],
                       radii=radii, counts=np.array(counts, np.int64),
                       p1_lower=np.array(p1_lower, np.float64),
                       p2_upper=np.array(p2_upper, np.float64),
                       num_samples=np.array(num_samples, np.int64))


def compiled_radius(name: str, p1_lower: stats.TensorLike, p2_upper: stats.TensorLike,
                    sigma: float) -> np.ndarray:
    """float64 numpy radius ``name`` of the bounds (`certify_bounds`, compiled)."""
    p1_lower = np.asarray(p1_lower, np.float64)
    _, radii = _compiled_certify_bounds(tf.constant(p1_lower),
                                        tf.constant(np.asarray(p2_upper, np.float64)),
                                        tf.zeros(p1_lower.shape, tf.int64), float(sigma), (name,))
    return np.asarray(radii[name], np.float64)


_compiled_certify_bounds = tf.function(certify_bounds, reduce_retracing=True)


def _draws_spent(counts: np.ndarray, num_samples: np.ndarray | int | None) -> np.ndarray:
    """int64 [batch] draws per image: ``num_samples`` checked (whole, >= the votes), or the
    row sums of ``counts``."""
    votes = counts.sum(axis=1)
    if num_samples is None:
        return votes
    used = np.asarray(num_samples)
    if used.ndim > 1 or used.ndim == 1 and used.shape != votes.shape:
        raise ValueError(f"num_samples must be a scalar or one per image ({len(votes)}), got "
                         f"shape {used.shape}")
    if not (np.issubdtype(used.dtype, np.number) and np.all(np.isfinite(used))
            and np.all(used % 1 == 0)):
        raise ValueError(f"num_samples must be whole numbers, got {num_samples}")
    if np.any(used < votes):
        raise ValueError(f"num_samples must be >= the votes counted per image, got "
                         f"{num_samples} for {votes.tolist()[:3]} votes")
    return np.broadcast_to(used.astype(np.int64), votes.shape).copy()
