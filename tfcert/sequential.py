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

Cost of a look: the bounds of the active images (vectorised float64 bisections over the
distinct vote counts) and one sampling call for all of them.  The votes of every look
are kept (``[images, looks, k]`` int64: the betting bets depend on them).

Example:

>>> rule = tfcert.sequential.StoppingRule(target_radius=0.5)
>>> cert = tfcert.sequential.certify_sequential(sc, x_test[:100], 10_000, rule, alpha=0.001)
>>> cert.prediction, cert.radius, cert.num_samples  # draws spent per image
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol, Sequence

import numpy as np

from tfcert import confidence_sequences as cs
from tfcert import stats
from tfcert.certificate import (ABSTAIN, Certificate, bound_names, certificate_from_bounds,
                                certificate_from_counts, check_statistics, compiled_radius)
from tfcert.keys import run_key

# Default share of α of the last look's Clopper-Pearson bounds with a confidence sequence:
# the images that need every sample keep (nearly) their fixed-n certificate, for ~5% more
# samples (tuned on held-out images, docs/PERFORMANCE.md, early stopping).
FINAL_SHARE = 0.1

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

    def lower(self, successes: np.ndarray, trials: np.ndarray, level: float,
              final_level: float = 0.0) -> np.ndarray:
        """float64 [rows] lower bounds of the method from ``successes`` [rows, J] per look
        of ``trials`` [J] draws (real values allowed: projections), at ``level``; with
        ``final_level`` > 0, the larger of it and the Clopper-Pearson bound at that level.

        Computed once per distinct row of the inputs that the method depends on.
        """
        successes = np.asarray(successes, np.float64)
        trials = np.asarray(trials, np.float64)
        totals = successes.sum(axis=1, keepdims=True)
        total = trials.sum()

        def clopper_pearson(rows, at):
            return np.asarray(stats.clopper_pearson_graph(rows[:, 0], total, at)[0])

        if self.method == "betting":
            lower = _per_distinct_row(
                lambda rows: cs.betting_lower(rows, trials, level, self.bet_truncation), successes)
        elif self.method == "mixture":
            lower = _per_distinct_row(
                lambda rows: cs.mixture_lower(rows[:, 0], total, level, self.prior), totals)
        else:
            lower = _per_distinct_row(lambda rows: clopper_pearson(rows, level), totals)
        if final_level > 0.0:
            lower = np.maximum(lower, _per_distinct_row(
                lambda rows: clopper_pearson(rows, final_level), totals))
        return lower

    def upper(self, successes: np.ndarray, trials: np.ndarray, level: float,
              final_level: float = 0.0) -> np.ndarray:
        """Upper bounds: one minus the lower bounds of the complementary votes, rounded up."""
        complement = np.asarray(trials, np.float64) - np.asarray(successes, np.float64)
        return _complement_up(self.lower(complement, trials, level, final_level))


def _per_distinct_row(bound: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """``bound(rows)`` computed once per distinct row."""
    if not len(rows):
        return np.zeros(0, np.float64)
    distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
    return np.asarray(bound(distinct), np.float64)[inverse.reshape(-1)]


def _complement_up(x: np.ndarray) -> np.ndarray:
    """``1 − x`` rounded up (`tfcert.stats.complement_up`), as a writable float64 array."""
    return np.array(stats.complement_up(np.asarray(x, np.float64)))


def look_certificate(rule: StoppingRule, votes: np.ndarray, trials: np.ndarray, level: float,
                     sigma: float, names: list[str], statistics: str,
                     selected: np.ndarray | None, used: int,
                     final_level: float = 0.0) -> Certificate:
    """The certificate of each image from its votes ``[images, J, k]`` of looks of
    ``trials`` [J] draws, at level ``level`` (module docstring, "Certificates"); with
    ``final_level`` > 0 (the last look), each bound is the better of the method's and
    the Clopper-Pearson bound at ``final_level`` (both shares split as ``level``)."""
    counts = votes.sum(axis=1)
    rows = np.arange(len(counts))
    if statistics == "cohen":
        top = np.asarray(selected, np.int64)
        p1 = rule.lower(votes[rows, :, top], trials, level, final_level)
        return certificate_from_bounds(counts, top, p1, _complement_up(p1), sigma, names,
                                       np.full(len(counts), used))
    num_images, looks, k = votes.shape
    top = np.argmax(counts, axis=1)
    side, final_side = level / (2 * k), final_level / (2 * k)
    p1 = rule.lower(votes[rows, :, top], trials, side, final_side)
    upper = rule.upper(votes.transpose(0, 2, 1).reshape(-1, looks), trials, side,
                       final_side).reshape(num_images, k)
    upper[rows, top] = 0.0
    p2 = np.minimum(upper.max(axis=1), _complement_up(p1))
    return certificate_from_bounds(counts, top, p1, p2, sigma, names, np.full(len(counts), used))


def reachable_radius(rule: StoppingRule, votes: np.ndarray, trials: np.ndarray,
                     future: np.ndarray, levels: tuple[float, float], sigma: float, bound: str,
                     statistics: str, selected: np.ndarray | None = None) -> np.ndarray:
    """The radius of each image's certificate at the last look if the draws of the
    ``future`` looks came at optimistic frequencies (module docstring, "futility").

    The top class's future votes come at its level-``futility_level`` upper bound and
    the runner-up's (the other class with the most votes) at its lower bound; the final
    bounds are those of the last look at ``levels`` = (its level, its final level), as in
    `look_certificate`.
    """
    counts = votes.sum(axis=1)
    rows = np.arange(len(counts))
    top = (np.argmax(counts, axis=1) if statistics == "simultaneous"
           else np.asarray(selected, np.int64))
    all_trials = np.concatenate([trials, future]).astype(np.float64)

    def final_votes(votes_of_class, rate):
        return np.concatenate([votes_of_class, rate[:, None] * future[None]], axis=1)

    top_votes = votes[rows, :, top]
    p1_rate = rule.upper(top_votes, trials, rule.futility_level)
    if statistics == "cohen":
        p1 = rule.lower(final_votes(top_votes, p1_rate), all_trials, *levels)
        p2 = _complement_up(p1)
    else:
        sides = tuple(level / (2 * votes.shape[2]) for level in levels)
        p1 = rule.lower(final_votes(top_votes, p1_rate), all_trials, *sides)
        others = counts.copy()
        others[rows, top] = -1
        runner_votes = votes[rows, :, np.argmax(others, axis=1)]
        p2_rate = rule.lower(runner_votes, trials, rule.futility_level)
        p2 = np.minimum(rule.upper(final_votes(runner_votes, p2_rate), all_trials, *sides),
                        _complement_up(p1))
    return compiled_radius(bound, p1, p2, sigma)


def decided(rule: StoppingRule, cert: Certificate, targets: np.ndarray,
            reachable: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """bool [images]: the images that stop at this look (module docstring, stopping rules).

    Args:
        cert: the images' certificates at this look.
        targets: their target radii (+inf: none).
        reachable: ``reachable(rows)`` gives the reachable radius of images ``rows``.
    """
    has_target = np.isfinite(targets)
    done = has_target & (cert.prediction != ABSTAIN) & (cert.radius >= targets)
    pending = np.flatnonzero(~done)
    if pending.size:
        reach = reachable(pending)
        stop = has_target[pending] & (reach < targets[pending])
        if rule.min_gain is not None:
            stop |= reach - cert.radius[pending] <= rule.min_gain
        done[pending] = stop
    return done


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
    names = bound_names(bound)
    check_statistics(statistics)
    selected = None if selected is None else np.asarray(selected, np.int64)
    looks = rule.looks(max_samples)
    trials = np.diff(looks, prepend=0)
    levels = rule.levels(alpha, len(looks))
    targets = rule.targets(num_images)
    votes = np.zeros((num_images, len(looks), num_classes), np.int64)
    result = certificate_from_counts(votes[:, 0], alpha, sigma, names, statistics, selected, 0)
    last = (levels[-1], rule.final_level(alpha))
    active = np.arange(num_images)
    for j, level in enumerate(levels):
        votes[active, j] = draw(active, int(looks[j] - trials[j]), int(trials[j]))
        choice = None if selected is None else selected[active]
        seen = votes[active, :j + 1]
        final = j == len(looks) - 1
        cert = look_certificate(rule, seen, trials[:j + 1], level, sigma, names, statistics,
                                choice, int(looks[j]) + selection_samples,
                                last[1] if final else 0.0)
        _store(result, active, cert)
        if final:
            break

        def reachable(rows):
            return reachable_radius(rule, seen[rows], trials[:j + 1], trials[j + 1:], last,
                                    sigma, names[0], statistics,
                                    None if choice is None else choice[rows])

        active = active[~decided(rule, cert, targets[active], reachable)]
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


def _store(result: Certificate, rows: np.ndarray, cert: Certificate) -> None:
    """Writes ``cert`` (the certificates of ``rows``) into ``result`` at ``rows``."""
    for field in ("prediction", "radius", "counts", "p1_lower", "p2_upper", "num_samples"):
        getattr(result, field)[rows] = getattr(cert, field)
    for name, radius in cert.radii.items():
        result.radii[name][rows] = radius
