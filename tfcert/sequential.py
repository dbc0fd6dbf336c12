"""Certification with early stopping at a target radius (sequential sampling).

A fixed-n certificate (`SmoothedClassifier.certify`) spends n noisy draws on every
image, although most images are decided long before: an image whose votes are all for
one class is certified at a moderate radius after a few hundred draws, and an image
whose runner-up is close will never reach the radius.  `certify_sequential` looks at
the votes at a geometric schedule of checkpoints and stops each image as soon as its
outcome is decided; the undecided images keep sampling, batched together.

Procedure (all images in parallel; n_J = ``max_samples``):

1. checkpoints ``n_1 < n_2 < ... < n_J``: ``n_1 = first_checkpoint``,
   ``n_{j+1} = ceil(growth · n_j)``, the last one clipped to ``max_samples``;
2. levels ``α_1 + ... + α_J = α``: the last checkpoint gets ``final_share · α``, the
   others share the rest equally (the last checkpoint decides the hard images, where
   the level matters most; early stops need few samples at any level);
3. at checkpoint j the certificate of every active image is computed from all its
   ``n_j`` votes at level ``α_j``, exactly as `SmoothedClassifier.certify` computes it
   with n = n_j, α = α_j (same statistics, same radii);
4. the image stops, keeping that certificate, if it is certified with radius
   >= ``target_radius`` (the first requested bound's), or if reaching it looks futile:
   even the optimistic probabilities (a level-``futility_level`` upper bound on the top
   class, a lower bound on the runner-up, taken as exact) give a radius below the target.
   Otherwise it draws ``n_{j+1} − n_j`` more votes.  At the last checkpoint every
   image keeps its certificate (possibly a smaller radius, or abstain).

Soundness.  For each j the ``n_j`` votes are an i.i.d. sample whatever the stopping
rule does (stopping only hides later samples), so the level-``α_j`` certificate at
checkpoint j is wrong with probability at most ``α_j``; by the union bound, the
probability that *any* checkpoint's certificate of an image is wrong is at most
``Σ α_j = α``, and the reported certificate is one of them.  The futility rule only
decides when to stop, never what is certified, so its level does not enter α; a wrong
futility stop (probability <= ``futility_level`` per checkpoint) only forgoes a
certificate.  Certified accuracy *at the target radius* matches a fixed-n run with
n = ``max_samples`` up to the cost of the smaller final level (``final_share · α``) and
of rare wrong futility stops (equal in the benchmark of docs/PERFORMANCE.md, with 6.5x
fewer samples); radii above the target are not pursued, so curves above it are lower.
A first checkpoint too small for unanimous votes to reach the target only wastes a
look and its share of α.

Example:

>>> rule = tfcert.sequential.EarlyStopping(target_radius=0.5)
>>> cert = tfcert.sequential.certify_sequential(sc, x_test[:100], 10_000, rule, alpha=0.001)
>>> cert.prediction, cert.radius, cert.num_samples  # draws spent per image
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from tfcert import stats
from tfcert.smoothing import (ABSTAIN, RADII, Certificate, SmoothedClassifier, bound_names,
                              certificate_from_counts, run_key)

# draw(images, first_draw, num_new) -> int [len(images), k] votes of the draws numbered
# first_draw … first_draw + num_new − 1 of each of `images` (indices into the batch): every
# call asks for draws no earlier call has seen.
Draw = Callable[[np.ndarray, int, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """When to look at the votes, and when an image is decided (module docstring).

    Args:
        target_radius: stop an image once it is certified at this ℓ2 radius (0: as
            soon as it is certified at all).
        first_checkpoint: votes per image at the first look.
        growth: ratio of consecutive checkpoints (> 1).
        final_share: fraction of α spent at the last checkpoint (in (0, 1); the
            others split the rest equally).  With a single checkpoint it gets all of α.
        futility_level: confidence level of the optimistic bounds of the futility rule
            (in (0, 1)); larger stops hopeless images sooner, but forgoes more
            borderline certificates.
    """

    target_radius: float
    first_checkpoint: int = 100
    growth: float = 2.0
    final_share: float = 0.5
    futility_level: float = 0.01

    def __post_init__(self):
        if not self.target_radius >= 0.0 or math.isinf(self.target_radius):
            raise ValueError(
                f"target_radius must be a finite number >= 0, got {self.target_radius}")
        if int(self.first_checkpoint) < 1:
            raise ValueError(f"first_checkpoint must be >= 1, got {self.first_checkpoint}")
        if not self.growth > 1.0:
            raise ValueError(f"growth must be > 1, got {self.growth}")
        if not 0.0 < self.final_share < 1.0:
            raise ValueError(f"final_share must be in (0, 1): the earlier checkpoints need a "
                             f"share of α too, got {self.final_share}")
        if not 0.0 < self.futility_level < 1.0:
            raise ValueError(f"futility_level must be in (0, 1), got {self.futility_level}")

    def checkpoints(self, max_samples: int) -> np.ndarray:
        """int64 checkpoints ``n_1 < ... < n_J = max_samples`` (geometric, see module doc)."""
        if int(max_samples) < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        points = [min(int(self.first_checkpoint), int(max_samples))]
        while points[-1] < max_samples:
            points.append(min(max(math.ceil(self.growth * points[-1]), points[-1] + 1),
                              int(max_samples)))
        return np.array(points, np.int64)

    def levels(self, alpha: float, num_checkpoints: int) -> np.ndarray:
        """float64 levels ``α_j`` of the checkpoints, summing to ``alpha``."""
        if num_checkpoints == 1:
            return np.array([alpha], np.float64)
        early = (1.0 - self.final_share) * alpha / (num_checkpoints - 1)
        return np.array([early] * (num_checkpoints - 1) + [self.final_share * alpha], np.float64)

    def futile(self, counts: np.ndarray, top: np.ndarray, sigma: float, bound: str,
               statistics: str) -> np.ndarray:
        """bool [batch]: the target radius looks out of reach for these votes.

        ``p1`` is the level-``futility_level`` Clopper-Pearson upper bound of class
        ``top``; ``p2`` the lower bound of the strongest other class (under Cohen's
        statistics the certificate uses ``1 − p1_lower``, so ``p2 = 1 − p1``).  Futile
        if these optimistic values, taken as exact probabilities, are not certified or
        give a radius below the target.
        """
        counts = np.asarray(counts, np.int64)
        n = counts.sum(axis=1, keepdims=True)
        lower, upper = (np.asarray(b)
                        for b in stats.clopper_pearson(counts, n, self.futility_level))
        rows = np.arange(len(counts))
        p1 = upper[rows, top]
        if statistics == "cohen":
            p2 = 1.0 - p1
        else:
            others = lower.copy()
            others[rows, top] = 0.0
            p2 = others.max(axis=1)
        radius = np.asarray(RADII[bound](p1, p2, sigma))
        return ~(p1 > p2) | (radius < self.target_radius)


def run_sequential(draw: Draw, num_images: int, num_classes: int, max_samples: int,
                   rule: EarlyStopping, alpha: float, sigma: float,
                   bound: str | Sequence[str] = "renyi", statistics: str = "simultaneous",
                   selected: np.ndarray | None = None,
                   selection_samples: int = 0) -> Certificate:
    """The sequential procedure of the module docstring on any source of votes.

    Args:
        draw: ``draw(images, first_draw, num_new)`` returns fresh votes (see `Draw`).
        num_images, num_classes: the batch size and k.
        max_samples: n_J, the most votes any image gets.
        rule: the schedule and stopping rule.
        alpha: failure probability of each image's certificate.
        sigma: noise σ of the radii.
        bound: radius name(s); the first one is compared with the target.
        statistics: ``"simultaneous"`` or ``"cohen"`` (then ``selected`` is required).
        selected: int [num_images] classes chosen on separate selection samples.
        selection_samples: selection draws per image, added to ``num_samples``.

    Returns:
        The `Certificate` of each image at the checkpoint where it stopped; its
        ``num_samples`` are the draws spent on that image.
    """
    names = bound_names(bound)
    checkpoints = rule.checkpoints(max_samples)
    levels = rule.levels(alpha, len(checkpoints))
    counts = np.zeros((num_images, num_classes), np.int64)
    result = certificate_from_counts(counts, alpha, sigma, names, statistics,
                                     None if selected is None else np.asarray(selected), 0)
    active, drawn = np.arange(num_images), 0
    for step, (n, level) in enumerate(zip(checkpoints, levels)):
        if not active.size:
            break
        counts[active] += draw(active, int(drawn), int(n - drawn))
        drawn = n
        choice = None if selected is None else np.asarray(selected)[active]
        cert = certificate_from_counts(counts[active], level, sigma, names, statistics, choice,
                                       n + selection_samples)
        _store(result, active, cert)
        if step == len(checkpoints) - 1:
            break
        reached = (cert.prediction != ABSTAIN) & (cert.radius >= rule.target_radius)
        top = np.argmax(counts[active], axis=1) if choice is None else choice
        done = reached | rule.futile(counts[active], top, sigma, names[0], statistics)
        active = active[~done]
    return result


def certify_sequential(smoothed: SmoothedClassifier, x, max_samples: int, rule: EarlyStopping,
                       alpha: float = 0.001, bound: str | Sequence[str] = "renyi",
                       statistics: str = "simultaneous", num_selection_samples: int = 100,
                       batch_size: int | None = None, seed: int | Sequence[int] | None = None,
                       indices=None) -> Certificate:
    """`SmoothedClassifier.certify` with early stopping at ``rule.target_radius``.

    Args:
        smoothed: the smoothed classifier (Gaussian noise: ℓ2 radii).
        x: images [batch, H, W, C] in [0, 1].
        max_samples: the most noisy draws per image (the n of the fixed-n certificate
            it replaces).
        rule: checkpoints, level split and stopping rule.
        alpha, bound, statistics, num_selection_samples, batch_size: as
            `SmoothedClassifier.certify`.
        seed, indices: as `SmoothedClassifier.sample_counts`.  One run key serves the
            whole procedure: checkpoint j adds draws n_{j−1} … n_j − 1 of each image, so
            its votes are those of a fixed-n run with the same seed truncated to n_j,
            and no draw is ever counted twice.

    Each checkpoint draws votes only for the images still undecided, all of them in the
    same passes (`SmoothedClassifier.sample_counts`), so passes stay full as images drop
    out.  See the module docstring for the guarantee.
    """
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
