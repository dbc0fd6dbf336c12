"""Certification with early stopping (sequential sampling): anytime-valid certificates.

A fixed-n certificate (`SmoothedClassifier.certify`) spends n noisy draws on every
image, although most images are decided long before: an image whose votes are all for
one class is certified at a moderate radius after a few dozen draws, and an image whose
runner-up is close will never reach the radius.  `certify_sequential` looks at the
votes of every undecided image after each batch of draws ("look"), stops each image as
soon as it is decided, and keeps sampling the others, batched together.

Bounds (``StoppingRule.method``):

* ``"mixture"`` (default): the one-sided beta-binomial mixture confidence sequence of
  :func:`tfcert.confidence_sequences.mixture_lower` (Robbins 1970);
* ``"betting"``: the betting confidence sequence of
  :func:`tfcert.confidence_sequences.betting_lower` (Waudby-Smith & Ramdas 2023);
* ``"checkpoints"``: Clopper-Pearson bounds at geometric checkpoints with a Bonferroni
  split of α over them (the last checkpoint gets ``final_share · α``, the others share
  the rest equally).

A confidence sequence (CS) holds at every sample count simultaneously, so the looks can
be frequent: after the first look (``first_look`` draws per image) each look adds draws
until ``growth`` times the current count (1.1: at most 10% overshoot past the count
where an image could have stopped).  The checkpoints' levels shrink with their number,
so they are few (growth 2).

Certificates at a look, from all votes so far (as `SmoothedClassifier.certify`):

* statistics ``"simultaneous"``: every class j gets a lower and an upper bound, each at
  level ``α_look / (2k)`` (Bonferroni over the k classes and the two sides, as
  `tfcert.stats.simultaneous_bounds`); p1_lower is the top class's lower bound, p2_upper
  the largest upper bound of the others, capped at ``1 − p1_lower``;
* statistics ``"cohen"``: the class selected on separate draws gets a lower bound at
  level α_look and ``p2_upper = 1 − p1_lower``;

with ``α_look = (1 − final_share) α`` for the CS methods and the checkpoint's share α_j
for checkpoints.  With a CS, the last look (``max_samples`` draws) also computes the
fixed-n Clopper-Pearson bounds at level ``final_share · α`` (split the same way) and
keeps the better bound of each pair, so the images that need every draw keep nearly
their fixed-n certificate (a CS is wider than a fixed-n bound at its n).

Stopping rules (`StoppingRule`), from the votes only:

* *target*: stop once certified with radius >= the image's ``target_radius`` (first
  requested bound; an array gives one target per image);
* *futility*: stop once the target is out of reach: the *reachable radius* is below it.
  The reachable radius is the radius of the last look's certificate (at
  ``max_samples``) if the remaining draws came at optimistic frequencies (the top class
  at its upper bound, the runner-up at its lower bound, both at level
  ``futility_level``, from the method's own bounds);
* *budget* (``min_gain``): stop once the reachable radius exceeds the current radius by
  at most ``min_gain`` (more draws cannot buy more than that).

Soundness.  For the CS methods every bound holds at every look at once with probability
≥ 1 − (1 − final_share) α (per class and side at level α_look/(2k), union over the 2k of
them; one bound under Cohen's statistics), and the last look's Clopper-Pearson bounds
with probability ≥ 1 − final_share · α, so all of them hold together with probability
≥ 1 − α, and the certificate of the look where an image stops is valid whatever the
stopping rule (Ville's inequality: optional stopping).  For the
checkpoints, checkpoint j's certificate is wrong with probability ≤ α_j whatever the
stopping rule does (stopping only hides later draws), and Σ α_j = α.  The stopping
rules decide only *when* to stop, never what is certified: their levels never enter α;
a wrong futility stop only forgoes a certificate.  Radii above the target are not
pursued, so the certified-accuracy curve above the target is lower than a fixed-n run's.

One look, written once: `look` (core TF) certifies the votes so far (`look_bounds`, then
`tfcert.certificate.certify_bounds`) and applies the stopping rules (`reachable_radius`).
`run_sequential` calls it compiled after each look; the exported ``certify_target``
signatures call it inside their ``tf.while_loop`` (`tfcert.export`), with the looks and
levels of `StoppingRule.plan` baked into the export.

Cost of a look: one sampling call for all the active images, then float64 bisections
(`tfcert.bisection.bisect`) over the distinct vote rows: one for the certificate's bounds
and, for the images not yet at their target, two for the futility rule (the optimistic
rates, then the projected final bounds), and the radius searches.  The votes of every
look are kept (``[images, looks, k]`` int64: the betting bets depend on them).

Example:

>>> rule = tfcert.sequential.StoppingRule(target_radius=0.5)
>>> cert = tfcert.sequential.certify_sequential(sc, x_test[:100], 10_000, rule, alpha=0.001)
>>> cert.prediction, cert.radius, cert.num_samples  # draws spent per image
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Protocol, Sequence

import numpy as np
import tensorflow as tf
from scipy import special

from tfcert import confidence_sequences as cs
from tfcert import stats
from tfcert.bisection import bisect
from tfcert.certificate import (ABSTAIN, RADII, Certificate, bound_names, certificate_from_counts,
                                certify_bounds, check_statistics)
from tfcert.keys import run_key

# Default share of α of the last look's Clopper-Pearson bounds with a confidence sequence:
# the images that need every sample keep (nearly) their fixed-n certificate, for ~5% more
# samples (tuned on held-out images, docs/PERFORMANCE.md, early stopping).
FINAL_SHARE = 0.1

# Bisection halvings of the futility rule's bounds (rates and projections): it decides only
# when an image stops, so 2**-20 (a reachable radius lower by ~1e-6 relative at most)
# is plenty, for a third of the cost of the certificate's 60 (docs/PERFORMANCE.md).
FUTILITY_STEPS = 20

METHODS = ("mixture", "betting", "checkpoints")
DEFAULT_METHOD = "mixture"
# (first look, growth, final share) of each method (module docstring; docs/PERFORMANCE.md).
SCHEDULES = {"mixture": (32, 1.1, FINAL_SHARE), "betting": (32, 1.1, FINAL_SHARE),
             "checkpoints": (100, 2.0, 0.5)}


class Smoothed(Protocol):
    """What `certify_sequential` uses of a `tfcert.smoothing.SmoothedClassifier`."""

    num_classes: int

    @property
    def sigma(self) -> float: ...

    def sample_counts(self, x, num_samples: int, batch_size: int | None = None, seed=None,
                      indices=None, first_draw: int = 0) -> np.ndarray: ...

    def select(self, x, num_selection_samples: int, batch_size: int | None = None, seed=None,
               indices=None) -> np.ndarray: ...


# draw(images, first_draw, num_new) -> int [len(images), k] votes of the draws numbered
# first_draw … first_draw + num_new − 1 of each of `images` (indices into the batch): every
# call asks for draws no earlier call has seen.
Draw = Callable[[np.ndarray, int, int], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class StoppingRule:
    """How the votes are bounded, when they are looked at, and when an image stops.

    Args:
        target_radius: stop an image once certified at this ℓ2 radius (0: as soon as
            it is certified at all) or once that is out of reach; a number or an array
            broadcastable to the images.  ``None``: no target (``min_gain`` only).
        method: ``"mixture"``, ``"betting"`` or ``"checkpoints"`` (module docstring).
        min_gain: budget mode: stop an image once more draws (up to ``max_samples``)
            cannot raise its radius by more than this (``None``: off).
        first_look: draws per image at the first look (default: `SCHEDULES`).
        growth: each look brings the draws per image to at least ``growth`` times the
            previous look's (> 1; default: `SCHEDULES`).
        final_share: fraction of α spent on a Clopper-Pearson certificate at the last
            look (default: `SCHEDULES`).  Checkpoints: the last checkpoint's share, in
            (0, 1) (all of α with a single checkpoint); confidence sequences: in [0, 1),
            the sequence runs at level ``(1 − final_share) α`` and the last look keeps
            the better of its bounds and the Clopper-Pearson ones.
        futility_level: level of the optimistic bounds of the futility and budget rules
            (in (0, 1)): larger stops hopeless images sooner but forgoes more borderline
            certificates; it never changes what is certified.  The default 0.1 was tuned
            on held-out images (docs/PERFORMANCE.md).
        prior: (a, b) of the mixture's Beta prior (a >= 1; `tfcert.confidence_sequences`).
        bet_truncation: c in (0, 1) of the betting method's bets ``min(λ, c/m)``.
    """

    target_radius: float | np.ndarray | None = None
    method: str = DEFAULT_METHOD
    min_gain: float | None = None
    first_look: int | None = None
    growth: float | None = None
    final_share: float | None = None
    futility_level: float = 0.1
    prior: tuple[float, float] = cs.PRIOR
    bet_truncation: float = cs.BET_TRUNCATION

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.target_radius is None and self.min_gain is None:
            raise ValueError("give a target_radius, a min_gain (budget mode) or both")
        target = np.asarray(0.0 if self.target_radius is None else self.target_radius, float)
        if not np.all((target >= 0.0) & np.isfinite(target)):
            raise ValueError(f"target_radius must be finite and >= 0, got {self.target_radius}")
        if self.min_gain is not None and not 0.0 <= self.min_gain < math.inf:
            raise ValueError(f"min_gain must be a finite number >= 0, got {self.min_gain}")
        first, growth, share = self.schedule
        if int(first) < 1:
            raise ValueError(f"first_look must be >= 1, got {first}")
        if not growth > 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not (0.0 < share < 1.0 or (share == 0.0 and self.method != "checkpoints")):
            raise ValueError(f"final_share must be in (0, 1) ([0, 1) for the confidence "
                             f"sequences): the earlier looks need a share of α, got {share}")
        if not 0.0 < self.futility_level < 1.0:
            raise ValueError(f"futility_level must be in (0, 1), got {self.futility_level}")
        cs.check_prior(self.prior)
        if not 0.0 < self.bet_truncation < 1.0:
            raise ValueError(f"bet_truncation must be in (0, 1), got {self.bet_truncation}")

    @property
    def schedule(self) -> tuple[int, float, float]:
        """(first look, growth, final share), the method's defaults where not given."""
        first, growth, share = SCHEDULES[self.method]
        return (first if self.first_look is None else int(self.first_look),
                growth if self.growth is None else float(self.growth),
                share if self.final_share is None else float(self.final_share))

    def targets(self, num_images: int) -> np.ndarray:
        """float64 [num_images] target radii (+inf without a target)."""
        target = math.inf if self.target_radius is None else self.target_radius
        return np.broadcast_to(np.asarray(target, np.float64), (num_images,)).copy()

    def looks(self, max_samples: int) -> np.ndarray:
        """int64 draws per image at each look, ``n_1 < … < n_J = max_samples``."""
        if int(max_samples) < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        first, growth, _ = self.schedule
        points = [min(first, int(max_samples))]
        while points[-1] < max_samples:
            points.append(min(max(math.ceil(growth * points[-1]), points[-1] + 1),
                              int(max_samples)))
        return np.array(points, np.int64)

    def levels(self, alpha: float, num_looks: int) -> np.ndarray:
        """float64 level α_j of each look's bounds: ``(1 − final_share) α`` for the
        confidence sequences, the Bonferroni shares (summing to α) for the checkpoints."""
        share = self.schedule[2]
        if self.method != "checkpoints":
            return np.full(num_looks, (1.0 - share) * alpha, np.float64)
        if num_looks == 1:
            return np.array([alpha], np.float64)
        early = (1.0 - share) * alpha / (num_looks - 1)
        return np.array([early] * (num_looks - 1) + [share * alpha], np.float64)

    def final_level(self, alpha: float) -> float:
        """Level of the extra Clopper-Pearson bounds of the last look: ``final_share · α``
        for the confidence sequences, 0 (none) for the checkpoints (whose last
        checkpoint already is one)."""
        return 0.0 if self.method == "checkpoints" else self.schedule[2] * alpha

    def lower(self, successes: stats.TensorLike, trials: stats.TensorLike,
              level: stats.TensorLike, final_level: stats.TensorLike = 0.0,
              steps: int = cs.BISECTION_STEPS) -> tf.Tensor:
        """float64 [rows] lower bounds of the method from ``successes`` [rows, J] per look
        of ``trials`` [J] draws (real values allowed: projections), at ``level``; where
        ``final_level`` > 0, the larger of it and the Clopper-Pearson bound at that level.
        ``steps``: bisection halvings (the futility rule's estimates take fewer).

        Core TF (eager, compiled or in a SavedModel); each bound is computed once per
        distinct row of the inputs that the method depends on.
        """
        successes, trials = stats.to_float64(successes), stats.to_float64(trials)
        totals, total = tf.reduce_sum(successes, axis=-1), tf.reduce_sum(trials)

        def clopper_pearson(at: tf.Tensor) -> tf.Tensor:
            return _per_distinct(
                lambda s: stats.clopper_pearson_graph(s, total, at, steps)[0], totals)

        if self.method == "betting":
            lower = _per_distinct(
                lambda rows: cs.betting_lower(rows, trials, level, self.bet_truncation, steps),
                successes)
        elif self.method == "mixture":
            lower = _per_distinct(
                lambda s: cs.mixture_lower(s, total, level, self.prior, steps), totals)
        else:
            lower = clopper_pearson(level)
        final_level = stats.to_float64(final_level)
        if tf.get_static_value(final_level) == 0.0:
            return lower
        return tf.cond(final_level > 0.0,
                       lambda: tf.maximum(lower, clopper_pearson(final_level)), lambda: lower)

    def upper(self, successes: stats.TensorLike, trials: stats.TensorLike,
              level: stats.TensorLike, final_level: stats.TensorLike = 0.0,
              steps: int = cs.BISECTION_STEPS) -> tf.Tensor:
        """Upper bounds: one minus the lower bounds of the complementary votes, rounded up."""
        complement = stats.to_float64(trials) - stats.to_float64(successes)
        return stats.complement_up(self.lower(complement, trials, level, final_level, steps))

    def plan(self, max_samples: int, alpha: float) -> "Plan":
        """The looks of a run of at most ``max_samples`` draws per image at level ``alpha``."""
        looks = self.looks(max_samples)
        return Plan(tuple(int(n) for n in looks),
                    tuple(float(a) for a in self.levels(alpha, len(looks))),
                    float(self.final_level(alpha)))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The looks of one run (`StoppingRule.plan`), the same for the Python API and an
    export (which records them in its config asset).

    Attributes:
        looks: draws per image at each look, ``n_1 < … < n_J``.
        levels: level α_j of each look's bounds.
        final_level: level of the last look's extra Clopper-Pearson bounds (0: none).
    """

    looks: tuple[int, ...]
    levels: tuple[float, ...]
    final_level: float

    @property
    def trials(self) -> np.ndarray:
        """int64 [J] draws added by each look."""
        return np.diff(np.array(self.looks, np.int64), prepend=0)


def _per_distinct(bound: Callable[[tf.Tensor], tf.Tensor], values: tf.Tensor) -> tf.Tensor:
    """``bound(values)`` computed once per distinct entry (1-D ``values``) or row (2-D)."""
    if values.shape.rank == 1:
        distinct, index = tf.unique(values)
    else:
        distinct, index = tf.raw_ops.UniqueV2(x=values, axis=tf.constant([0], tf.int64))
    return tf.gather(bound(distinct), index)


def _class_votes(votes: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
    """float64 [images, J] votes of each image's class ``classes`` at each look."""
    return tf.cast(tf.gather(tf.transpose(votes, [0, 2, 1]), classes, axis=1, batch_dims=1),
                   tf.float64)


def look_bounds(rule: StoppingRule, votes: tf.Tensor, trials: tf.Tensor,
                level: stats.TensorLike, final_level: stats.TensorLike, statistics: str,
                selected: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(p1_lower, p2_upper, top)`` of each image from its votes ``[images, J, k]`` of
    looks of ``trials`` [J] draws, at level ``level`` (module docstring, "Certificates");
    where ``final_level`` > 0 (the last look), each bound is the better of the method's
    and the Clopper-Pearson bound at ``final_level`` (both split as ``level``)."""
    votes = tf.convert_to_tensor(votes, tf.int64)
    if statistics == "cohen":
        top = tf.convert_to_tensor(selected, tf.int64)
        p1 = rule.lower(_class_votes(votes, top), trials, level, final_level)
        return p1, stats.complement_up(p1), top
    counts = tf.reduce_sum(votes, axis=1)
    k = tf.shape(votes)[2]
    top = tf.argmax(counts, axis=-1, output_type=tf.int64)
    looks = tf.shape(votes)[1]
    # One bound call: the top class's votes (its lower bound) and every class's
    # complementary votes (their upper bounds), each at α/(2k) (simultaneous_bounds).
    complement = tf.reshape(tf.cast(trials, tf.float64) - tf.cast(
        tf.transpose(votes, [0, 2, 1]), tf.float64), [-1, looks])
    sides = [stats.to_float64(v) / (2.0 * tf.cast(k, tf.float64)) for v in (level, final_level)]
    lower = rule.lower(tf.concat([_class_votes(votes, top), complement], axis=0), trials, *sides)
    batch = tf.shape(top)[0]
    is_top = tf.one_hot(top, k, on_value=True, off_value=False)
    p1_per_class = tf.where(is_top, lower[:batch, None], tf.zeros_like(is_top, tf.float64))
    upper = tf.reshape(stats.complement_up(lower[batch:]), tf.shape(is_top))
    return stats.top_class_bounds(counts, p1_per_class, upper)


def reachable_radius(rule: StoppingRule, votes: tf.Tensor, trials: tf.Tensor,
                     future: tf.Tensor, levels: tuple[stats.TensorLike, stats.TensorLike],
                     sigma: float, bound: str | None, statistics: str,
                     selected: tf.Tensor | None = None) -> tf.Tensor:
    """The radius of each image's certificate at the last look if the draws of the
    ``future`` looks came at optimistic frequencies (module docstring, "futility").

    The top class's future votes come at its level-``futility_level`` upper bound and
    the runner-up's (the other class with the most votes) at its lower bound; the final
    bounds are those of the last look at ``levels`` = (its level, its final level), as in
    `look_bounds`, each to ``FUTILITY_STEPS`` bisection halvings.  ``bound`` None: radius 0.
    """
    votes = tf.convert_to_tensor(votes, tf.int64)
    trials, future = stats.to_float64(trials), stats.to_float64(future)
    counts = tf.reduce_sum(votes, axis=1)
    top = (tf.argmax(counts, axis=-1, output_type=tf.int64) if statistics == "simultaneous"
           else tf.convert_to_tensor(selected, tf.int64))
    all_trials = tf.concat([trials, future], axis=0)
    top_votes = _class_votes(votes, top)

    def final_votes(votes_of_class: tf.Tensor, rate: tf.Tensor) -> tf.Tensor:
        return tf.concat([votes_of_class, rate[:, None] * future[None]], axis=1)

    if statistics == "cohen":
        p1_rate = rule.upper(top_votes, trials, rule.futility_level, steps=FUTILITY_STEPS)
        p1 = rule.lower(final_votes(top_votes, p1_rate), all_trials, *levels,
                        steps=FUTILITY_STEPS)
        p2 = stats.complement_up(p1)
    else:
        batch, k = tf.shape(top)[0], tf.shape(votes)[2]
        is_top = tf.one_hot(top, k, on_value=True, off_value=False)
        runner = tf.argmax(tf.where(is_top, -tf.ones_like(counts), counts), axis=-1,
                           output_type=tf.int64)
        runner_votes = _class_votes(votes, runner)
        rates = rule.lower(tf.concat([trials - top_votes, runner_votes], axis=0), trials,
                           rule.futility_level, steps=FUTILITY_STEPS)
        p1_rate, p2_rate = stats.complement_up(rates[:batch]), rates[batch:]
        sides = [stats.to_float64(v) / (2.0 * tf.cast(k, tf.float64)) for v in levels]
        final = rule.lower(tf.concat([final_votes(top_votes, p1_rate),
                                      all_trials - final_votes(runner_votes, p2_rate)], axis=0),
                           all_trials, *sides, steps=FUTILITY_STEPS)
        p1 = final[:batch]
        p2 = tf.minimum(stats.complement_up(final[batch:]), stats.complement_up(p1))
    if bound is None:
        return tf.zeros_like(p1)
    return RADII[bound](p1, p2, sigma)


def look(rule: StoppingRule, votes: tf.Tensor, trials: tf.Tensor, future: tf.Tensor,
         levels: tuple[stats.TensorLike, stats.TensorLike],
         final_levels: tuple[stats.TensorLike, stats.TensorLike], targets: tf.Tensor,
         sigma: float, names: Sequence[str], statistics: str,
         selected: tf.Tensor | None = None) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """One look of the sequential procedure (module docstring), in core TF: the
    certificate of each image's votes so far, and which images stop.

    `run_sequential` calls it (compiled) after each look, and so does the exported
    ``certify_target`` signature inside its ``tf.while_loop`` (`tfcert.export`).

    Args:
        rule: the bounds and stopping rules.
        votes: int64 [images, j, k] votes of each look so far.
        trials: [j] draws of each look so far; future: [J − j] draws of the looks after.
        levels: (α_j, α_J): the level of this look's bounds and of the last look's.
        final_levels: (this look's, the last look's) final Clopper-Pearson level (0: none).
        targets: float64 [images] target radii (+inf: none).
        sigma, names, statistics, selected: as `run_sequential` (``names`` may be empty:
            radius 0).

    Returns:
        ``(certificate, stop)``: ``prediction``, ``p1_lower``, ``p2_upper`` and one radius
        per name (float64 / int64 [images]); bool [images], the images that stop
        (target reached or out of reach, or ``min_gain``; none after the last look).
    """
    p1, p2, top = look_bounds(rule, votes, trials, levels[0], final_levels[0], statistics,
                              selected)
    prediction, radii = certify_bounds(p1, p2, top, sigma, names)
    radius = radii[names[0]] if names else tf.zeros_like(p1)
    targets = stats.to_float64(targets)
    has_target = tf.math.is_finite(targets)
    done = has_target & (prediction != ABSTAIN) & (radius >= targets)

    def reachable(rows: tf.Tensor) -> tf.Tensor:
        return reachable_radius(rule, tf.gather(votes, rows), trials, future, (levels[1],
                                final_levels[1]), sigma, names[0] if names else None,
                                statistics, None if selected is None else tf.gather(selected, rows))

    def give_up() -> tf.Tensor:
        pending = tf.where(~done)[:, 0]
        reach = reachable(pending)
        stop = tf.gather(has_target, pending) & (reach < tf.gather(targets, pending))
        if rule.min_gain is not None:
            stop |= reach - tf.gather(radius, pending) <= rule.min_gain
        return tf.tensor_scatter_nd_update(done, pending[:, None], stop)

    # Nothing to decide after the last look, nor when every image reached its target.
    stop = tf.cond((tf.size(future) > 0) & ~tf.reduce_all(done), give_up,
                   lambda: done | (tf.size(future) == 0))
    return {"prediction": prediction, "p1_lower": p1, "p2_upper": p2, **radii}, stop


@functools.lru_cache(maxsize=None)
def _compiled_look(method: str, min_gain: float | None, futility_level: float,
                   prior: tuple[float, float], bet_truncation: float) -> Callable:
    """`look` compiled for the rules with these bounds and stopping rules (one trace per
    distinct rule, not per `StoppingRule` object: targets and the schedule are inputs)."""
    rule = StoppingRule(0.0, method, min_gain, futility_level=futility_level, prior=prior,
                        bet_truncation=bet_truncation)
    return tf.function(functools.partial(look, rule), reduce_retracing=True)


def run_sequential(draw: Draw, num_images: int, num_classes: int, max_samples: int,
                   rule: StoppingRule, alpha: float, sigma: float,
                   bound: str | Sequence[str] = "renyi", statistics: str = "simultaneous",
                   selected: np.ndarray | None = None,
                   selection_samples: int = 0) -> Certificate:
    """The sequential procedure of the module docstring on any source of votes.

    Args:
        draw: ``draw(images, first_draw, num_new)`` returns fresh votes (see `Draw`).
        num_images, num_classes: the batch size and k.
        max_samples: the most votes any image gets (the last look).
        rule: the bounds, looks and stopping rules.
        alpha: failure probability of each image's certificate.
        sigma: noise σ of the radii.
        bound: radius name(s); the first one is compared with the target.
        statistics: ``"simultaneous"`` or ``"cohen"`` (then ``selected`` is required).
        selected: int [num_images] classes chosen on separate selection samples.
        selection_samples: selection draws per image, added to ``num_samples``.

    Returns:
        The `Certificate` of each image at the look where it stopped; its
        ``num_samples`` are the draws spent on that image.
    """
    names = tuple(bound_names(bound))
    check_statistics(statistics)
    if statistics == "cohen" and selected is None:
        raise ValueError("statistics='cohen' needs the classes selected on separate samples")
    selected = None if selected is None else np.asarray(selected, np.int64)
    plan = rule.plan(max_samples, alpha)
    trials, last = plan.trials, len(plan.looks) - 1
    targets = rule.targets(num_images)
    step = _compiled_look(rule.method, rule.min_gain, float(rule.futility_level),
                          tuple(float(v) for v in rule.prior), float(rule.bet_truncation))
    votes = np.zeros((num_images, len(plan.looks), num_classes), np.int64)
    result = certificate_from_counts(votes[:, 0], alpha, sigma, names, statistics, selected, 0)
    active = np.arange(num_images)
    for j, level in enumerate(plan.levels):
        votes[active, j] = draw(active, int(plan.looks[j] - trials[j]), int(trials[j]))
        cert, stop = step(votes[active, :j + 1], trials[:j + 1], trials[j + 1:],
                          _pair(level, plan.levels[-1]),
                          _pair(plan.final_level if j == last else 0.0, plan.final_level),
                          targets[active], float(sigma), names, statistics,
                          None if selected is None else selected[active])
        _store(result, active, cert, names, votes[active, :j + 1].sum(axis=1),
               int(plan.looks[j]) + selection_samples)
        active = active[~np.asarray(stop)]
        if not active.size:
            break
    return result


def certify_sequential(smoothed: Smoothed, x, max_samples: int, rule: StoppingRule,
                       alpha: float = 0.001, bound: str | Sequence[str] = "renyi",
                       statistics: str = "simultaneous", num_selection_samples: int = 100,
                       batch_size: int | None = None, seed: int | Sequence[int] | None = None,
                       indices=None) -> Certificate:
    """`SmoothedClassifier.certify` with early stopping (module docstring).

    Args:
        smoothed: the smoothed classifier (Gaussian noise: ℓ2 radii).
        x: images [batch, H, W, C] in [0, 1].
        max_samples: the most noisy draws per image (the n of the fixed-n certificate
            it replaces).
        rule: bounds, looks and stopping rules (target radius per image, budget).
        alpha, bound, statistics, num_selection_samples, batch_size: as
            `SmoothedClassifier.certify`.
        seed, indices: as `SmoothedClassifier.sample_counts`.  One run key serves the
            whole procedure: look j adds draws n_{j−1} … n_j − 1 of each image, so its
            votes are those of a fixed-n run with the same seed truncated to n_j, and no
            draw is ever counted twice.

    Each look draws votes only for the images still undecided, all of them in the same
    passes (`SmoothedClassifier.sample_counts`), so passes stay full as images drop out.
    Each returned certificate holds with probability ≥ 1 − ``alpha`` whatever the
    stopping rule (module docstring).
    """
    if np.ndim(alpha) != 0:
        raise ValueError("early stopping takes one alpha for the whole batch (a scalar); "
                         "for one level per image certify without early_stopping")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x = np.asarray(x, np.float32)
    sigma = smoothed.sigma

    key, indices = run_key(seed), np.arange(len(x)) if indices is None else np.asarray(indices)

    def draw(images: np.ndarray, first_draw: int, num_new: int) -> np.ndarray:
        return smoothed.sample_counts(x[images], num_new, batch_size, key, indices[images],
                                      first_draw=first_draw)

    selected, extra = None, 0
    if statistics == "cohen":
        selected = smoothed.select(x, num_selection_samples, batch_size, key, indices)
        extra = num_selection_samples
    return run_sequential(draw, len(x), smoothed.num_classes, max_samples, rule, alpha, sigma,
                          bound, statistics, selected, extra)


def required_probability(bound: str, radius: float, sigma: float) -> float:
    """The smallest p(1) whose radius with ``p2 = 1 − p1`` reaches ``radius``: the
    probability p* an image must have for a certificate at ``radius`` (float64, rounded
    up by the bisection; 1.0 where no p1 < 1 reaches it)."""
    radius_of = RADII[bound]

    def below(p1: tf.Tensor) -> tf.Tensor:
        return radius_of(p1, stats.complement_up(p1), sigma) < radius

    return float(bisect(below, tf.constant(0.5, tf.float64), tf.constant(1.0, tf.float64))[1])


def wald_samples(p: np.ndarray, p_star: float, alpha: float, max_samples: int) -> np.ndarray:
    """Wald's lower bound on the expected draws of any level-``alpha`` sequential test
    that decides ``p`` against ``p_star``: ``log(1/α) / KL(Bern(p) ‖ Bern(p*))``, capped
    at ``max_samples`` (float64, elementwise; the limit that early stopping is measured
    against, docs/PERFORMANCE.md)."""
    p = np.asarray(p, np.float64)
    kl = special.rel_entr(p, p_star) + special.rel_entr(1.0 - p, 1.0 - p_star)
    with np.errstate(divide="ignore"):
        return np.minimum(math.log(1.0 / alpha) / kl, float(max_samples))


def _pair(first: float, second: float) -> tf.Tensor:
    """float64 [2] tensor (not Python floats, whose values would each retrace the look)."""
    return tf.constant([first, second], tf.float64)


def _store(result: Certificate, rows: np.ndarray, cert: dict[str, tf.Tensor],
           names: Sequence[str], counts: np.ndarray, used: int) -> None:
    """Writes the look's certificate ``cert`` of ``rows`` (their ``counts`` after ``used``
    draws each) into ``result`` at ``rows``."""
    result.prediction[rows] = cert["prediction"]
    result.p1_lower[rows] = cert["p1_lower"]
    result.p2_upper[rows] = cert["p2_upper"]
    result.counts[rows] = counts
    result.num_samples[rows] = used
    for name in names:
        result.radii[name][rows] = cert[name]
