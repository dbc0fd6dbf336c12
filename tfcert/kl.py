"""KL-divergence certificates of Zhang & Liang, Section 4 (ℓ∞ threat model).

- :func:`randdisc_kl_bound`: Proposition 1, an upper bound U_KL on KL(p_x̃ ‖ p_x̃') over all
  x' with ‖x − x'‖∞ ≤ ε for the RandDisc transformation x̃ of x (the Gaussian bound, eq. (4),
  is :func:`tfcert.bounds.gaussian_kl_bound`).
- :func:`kl_certify`: Proposition 2 with the sign of δ corrected (docs/SOUNDNESS.md §3): the
  label y is certified when a lower confidence bound of margin(x̃, y, f) exceeds sqrt(2 U_KL).
- :func:`betting_upper_bound`: the confidence bound on a bounded mean that makes the
  Monte-Carlo part of U_KL a high-probability bound.

**Guarantee.**  Fix an image x and one ε of the grid.  For a center set u let
Y(u) = Σ_i sup_Δ KL(p_r(x_i|u) ‖ p_r(x_i+Δ|u)).  By data processing Y(u) ∈ [0, G] with
G = n·q·ε²/(2σ²), the Gaussian bound of eq. (4), and E_u[Y] ≥ Σ_i sup_Δ E_u[…], the pixel
sum of eq. (5).  U_KL's pixel term is an upper confidence bound on E_u[Y] at level 1 − α′
from M i.i.d. center sets (:func:`betting_upper_bound`), clamped to G.  Hence:

- q = 1, image-dependent centers: with probability ≥ 1 − α′ (``kl_alpha``) over the center
  sets, ``KLBound.value`` ≥ the right-hand side of eq. (5) ≥ KL(p_x̃ ‖ p_x̃') for every x' in
  the ε-ball (``KLBound.failure_probability`` = α′); and always
  ``value`` ≤ s·q·ε²/(2τ²) + G.
- q = 1, fixed centers: nothing is sampled and the bound always holds (failure 0).
- q > 1: the assignment probabilities given u are Monte-Carlo estimates and the plug-in KL
  is biased, so U_KL is an **estimate, not a bound** (``KLBound.rigorous`` is False).
- :func:`kl_certify`: a certified label is wrong with probability ≤ α + α′ (union bound
  over the margin's and U_KL's failures; ``KLCertificate.failure_probability``).

Each statement is per image and per ε (not simultaneous over the grid), exact real
arithmetic assumed (float64 rounding is not accounted for).  Everything is vectorised over
images and over a grid of ε, in float64; the draws of an image depend only on its key.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfcert import stats
from tfcert.bisection import bisect
from tfcert.layers.discretization import (RandomizedDiscretization, default_sharpness,
                                          max_pool, sample_candidates, select_centers)

_STANDARD_NORMAL = tfp.distributions.Normal(np.float64(0.0), np.float64(1.0))

#: Stream number of the KL bound's center draws under a run key (the vote streams of
#: :mod:`tfcert.keys` are 0 and 1): image keys are
#: ``fold_in(fold_in(run_key, CENTER_STREAM), image_index)``.
CENTER_STREAM = 2
#: Default M.  On 20 MNIST test digits (k = 2, σ = τ = 0.15) the pixel bound is then 6%
#: above the Monte-Carlo mean (17% at M = 1000, 11% at 2000, 4.5% at 10,000), and below
#: the old invalid mean + 3 s.e. of 100 sets (-24% at ε = 0.01); about 0.3 s per digit.
DEFAULT_CENTER_SAMPLES = 5000
#: Center sets drawn per stateless key: set m of an image comes from
#: ``fold_in(centers_key, m // 64)``, so it is a function of the image key and m only.
_SETS_PER_KEY = 64
#: Largest intermediate of one chunk of center sets, in float64 elements (512 KiB: a
#: cache-sized chunk ran 2-3x faster on MNIST than 8 MiB ones).
_CHUNK_ELEMENTS = 2 ** 16
#: Largest bet of the betting bound (Waudby-Smith & Ramdas use 1/2 or 3/4).
_MAX_BET = 0.75
# Sub-streams of an image key.
_CENTERS, _NOISE = 0, 1


class KLBound(NamedTuple):
    """U_KL of Proposition 1 and its parts, each [E, B] for an ε grid of size E (or [B] for a
    scalar ε) and B images; see the module docstring for the guarantee.

    Attributes:
        value: U_KL = center_term + pixel_bound, the bound to pass to :func:`kl_certify`.
        center_term: s·q·ε²/(2τ²), the first term of eq. (5) (0 with fixed centers).
        pixel_bound: upper confidence bound, failing with probability ≤
            ``failure_probability``, on E_u[Σ_i sup_Δ KL(p_r(x_i|u) ‖ p_r(x_i+Δ|u))], which is
            ≥ the second term of eq. (5); never above ``pixel_cap``.
        pixel_mean: the Monte-Carlo estimate of that expectation (mean over the center sets).
        std_error: standard error of ``pixel_mean`` (a diagnostic: the bound does not use it).
        pixel_cap: n·q·ε²/(2σ²), the Gaussian bound of eq. (4), which caps the pixel term.
        failure_probability: α′, the probability that ``value`` is below eq. (5); 0 when
            nothing is sampled (fixed centers, q = 1).
        exact_assignment: True when the assignment probabilities given the centers are exact
            (q = 1); False when they are Monte-Carlo estimates (q > 1): see ``rigorous``.
        num_pixels: n, the number of pixels the bound sums over (of the pooled image for the
            down-sampled variant).
        num_center_samples: M, the center sets drawn per image (noise replicates for fixed
            centers and q > 1; 1 when nothing is sampled).
    """

    value: tf.Tensor
    center_term: tf.Tensor
    pixel_bound: tf.Tensor
    pixel_mean: tf.Tensor
    std_error: tf.Tensor
    pixel_cap: tf.Tensor
    failure_probability: float
    exact_assignment: bool
    num_pixels: int
    num_center_samples: int

    @property
    def rigorous(self) -> bool:
        """Whether ``value`` is a bound (q = 1) rather than a Monte-Carlo estimate (q > 1)."""
        return self.exact_assignment

    @property
    def guarantee(self) -> str:
        """What ``value`` guarantees, in words (for logs and summaries)."""
        if not self.rigorous:
            return ("NOT a rigorous bound: the assignment probabilities (q > 1) are "
                    "Monte-Carlo estimates and the plug-in KL is biased; U_KL is an estimate")
        if self.failure_probability == 0.0:
            return "U_KL is an exact upper bound (fixed centers, nothing sampled)"
        return (f"U_KL ≥ Prop. 1's bound with probability ≥ 1 − {self.failure_probability:g} "
                f"per image and ε ({self.num_center_samples} center sets, betting bound)")


def _float64(x) -> tf.Tensor:
    """``x`` in float64; Python and numpy values never pass through float32."""
    return tf.cast(x, tf.float64) if tf.is_tensor(x) else tf.constant(np.asarray(x, np.float64))


def interval_log_probabilities(values: tf.Tensor, centers: tf.Tensor,
                               noise_stddev: float) -> tf.Tensor:
    """Exact log P(r(v | c) = c_(j)) for one channel (q = 1), Proposition 1.

    On the line the nearest-center regions are intervals between midpoints m_j of
    consecutive sorted centers, so P(v + w ∈ [m_{j−1}, m_j]) = Φ(z_j) − Φ(z_{j−1}) with
    z_j = (m_j − v)/σ, computed in log space from log Φ(±z_j) (upper tails through
    Φ(−z), so tiny probabilities keep their accuracy) in float64.

    Args:
        values: [B, m] pixel values v (or [1, m], shared by every row of ``centers``).
        centers: [B, k] centers in any order.
        noise_stddev: σ > 0.

    Returns:
        [B, m, k] log-probabilities of the centers **sorted in ascending order**; equal
        centers split their region at their common midpoint (a finer partition, so the KL
        computed from it is an upper bound, by data processing).
    """
    values = _float64(values)
    ordered = tf.sort(_float64(centers), axis=-1)
    if ordered.shape[-1] == 1:  # one center: it is always the output
        return tf.zeros_like(values + ordered)[..., None]
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2.0
    z = (midpoints[:, None, :] - values[..., None]) / noise_stddev  # [B, m, k − 1]
    below, above = _STANDARD_NORMAL.log_cdf(z), _STANDARD_NORMAL.log_cdf(-z)
    # Interval j ∈ [1, k − 2] lies between edges j − 1 and j: Φ(−z_{j−1}) − Φ(−z_j) above
    # the mean (z_{j−1} > 0), Φ(z_j) − Φ(z_{j−1}) otherwise.
    middle = tf.where(z[..., :-1] > 0.0,
                      tfp.math.log_sub_exp(above[..., :-1], above[..., 1:]),
                      tfp.math.log_sub_exp(below[..., 1:], below[..., :-1]))
    return tf.concat([below[..., :1], middle, above[..., -1:]], axis=-1)


def _kl_from_log_probs(log_p: tf.Tensor, log_q: tf.Tensor) -> tf.Tensor:
    """KL(p ‖ q) over the last axis, terms with p = 0 dropped."""
    support = log_p > -np.inf
    terms = tf.where(support, tf.exp(log_p) * (log_p - tf.where(support, log_q, 0.0)), 0.0)
    return tf.reduce_sum(terms, axis=-1)


def _exact_set_kl(values, centers, shifts, noise_stddev, noise_keys, num_noise_samples):
    """q = 1: KL per center set, pixel value and shift from exact interval probabilities.

    values [U, 1], centers [C, k, 1], shifts [D, 1] → [C, U, D].
    """
    del noise_keys, num_noise_samples  # nothing to sample
    clean = values[:, :1]
    all_values = tf.concat([clean, clean + shifts[:, 0]], axis=-1)  # [U, 1 + D]
    log_p = interval_log_probabilities(tf.reshape(all_values, [1, -1]), centers[..., 0],
                                       noise_stddev)
    log_p = tf.reshape(log_p, tf.concat([tf.shape(centers)[:1], tf.shape(all_values), [-1]], 0))
    return _kl_from_log_probs(log_p[:, :, :1, :], log_p[:, :, 1:, :])


def _sampled_set_kl(values, centers, shifts, noise_stddev, noise_keys, num_noise_samples):
    """q > 1: KL per center set, pixel and shift from Monte-Carlo assignment probabilities.

    values [U, q], centers [C, k, q], shifts [D, q], noise_keys [C, 2] → [C, U, D].  One set
    of noise draws serves x_i and every x_i + Δ (common random numbers):
    P(x + Δ + w ∈ V_j) = E_w[1{x + w ∈ V_j} · exp(w·Δ/σ² − ‖Δ‖²/(2σ²))].  The estimated
    distributions share their support, so the plug-in KL is always finite.
    """
    shape = tf.concat([tf.shape(values)[:1], [num_noise_samples], tf.shape(values)[1:]], 0)
    noise = noise_stddev * tf.map_fn(
        lambda key: tf.random.stateless_normal(shape, key, dtype=tf.float64), noise_keys,
        fn_output_signature=tf.TensorSpec([None, num_noise_samples, None], tf.float64))
    noisy = values[None, :, None, :] + noise  # [C, U, S, q]
    sq = tf.reduce_sum(tf.square(noisy[:, :, :, None, :] - centers[:, None, None, :, :]), -1)
    nearest = tf.one_hot(tf.argmin(sq, axis=-1), tf.shape(centers)[1], dtype=tf.float64)
    log_weights = (tf.einsum("cusq,dq->cusd", noise, shifts)
                   - 0.5 * tf.reduce_sum(tf.square(shifts), axis=-1)) / noise_stddev ** 2
    shifted = tf.einsum("cusd,cusk->cudk", tf.exp(log_weights), nearest)
    shifted /= tf.reduce_sum(shifted, axis=-1, keepdims=True)
    clean = tf.reduce_mean(nearest, axis=2)[:, :, None, :]
    return tf.reduce_sum(tf.math.xlogy(clean, clean) - tf.math.xlogy(clean, shifted), axis=-1)


def _fold_in(key: tf.Tensor, data) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64))


def _adaptive_center_sets(pixels, key, num_sets, num_clusters, channels, center_stddev,
                          num_candidates, gamma) -> tf.Tensor:
    """Center sets 0 … M−1 of one image ``pixels`` [n, q], drawn as the layer draws them.

    Sets are drawn in blocks of ``_SETS_PER_KEY``, block j from ``fold_in(key, j)``: set m
    is a function of ``key`` and m only.  Returns float32 [M, k, q].
    """

    def block(index):
        candidate_key, select_key = tf.unstack(
            tf.random.experimental.stateless_split(_fold_in(key, index), 2))
        candidates = sample_candidates(pixels[None], _SETS_PER_KEY * num_candidates,
                                       center_stddev, candidate_key)
        candidates = tf.reshape(candidates, [_SETS_PER_KEY, num_candidates, channels])
        return select_centers(candidates, num_clusters, gamma, select_key)

    blocks = tf.map_fn(block, tf.range(-(-num_sets // _SETS_PER_KEY), dtype=tf.int64),
                       fn_output_signature=tf.TensorSpec(
                           [_SETS_PER_KEY, num_clusters, channels], tf.float32))
    return tf.reshape(blocks, [-1, num_clusters, channels])[:num_sets]


def _set_values(values, counts, centers, noise_keys, shifts, caps, num_clusters, channels,
                noise_stddev, num_noise_samples) -> tf.Tensor:
    """Y(u) = Σ_i min(max over vertices of KL_i(Δ, u), cap) per center set: [M, E].

    ``values`` [U, q] are an image's distinct pixels, ``counts`` [U] their multiplicities,
    ``shifts`` [E·V, q] the vertices of each ε, ``caps`` [E] = q·ε²/(2σ²).  The per-set cap
    only removes rounding (data processing: every term is ≤ its Gaussian KL).  Sets are
    processed in chunks whose size depends on the image, never on the batch.
    """
    num_sets, num_eps, num_vertices = tf.shape(centers)[0], tf.shape(caps)[0], 2 ** channels
    exact = channels == 1
    per_set = tf.shape(values)[0] * num_eps * num_vertices * (
        num_clusters + 1 if exact else num_noise_samples * max(num_clusters, channels))
    chunk = tf.clip_by_value(_CHUNK_ELEMENTS // per_set, 1, num_sets)
    chunks = -(-num_sets // chunk)
    padding = [[0, chunks * chunk - num_sets], [0, 0]]
    centers = tf.pad(tf.reshape(centers, [num_sets, -1]), padding)
    noise_keys = tf.pad(noise_keys, padding)
    pixel_kl = _exact_set_kl if exact else _sampled_set_kl

    def chunk_values(chunk_input):
        chunk_centers, chunk_keys = chunk_input
        kl = pixel_kl(values, tf.reshape(chunk_centers, [chunk, num_clusters, channels]),
                      shifts, noise_stddev, chunk_keys, num_noise_samples)
        kl = tf.reshape(kl, [chunk, -1, num_eps, num_vertices])
        worst = tf.clip_by_value(tf.reduce_max(kl, axis=-1), 0.0, caps)  # [C, U, E]
        return tf.reduce_sum(worst * counts[None, :, None], axis=1)

    per_chunk = tf.map_fn(
        chunk_values, (tf.reshape(centers, [chunks, chunk, -1]),
                       tf.reshape(noise_keys, [chunks, chunk, 2])),
        fn_output_signature=tf.TensorSpec([None, None], tf.float64))
    return tf.reshape(per_chunk, [-1, num_eps])[:num_sets]


def betting_upper_bound(samples: tf.Tensor | np.ndarray, alpha: float) -> tf.Tensor:
    """Upper confidence bound on the mean μ of i.i.d. samples in [0, 1]: P(μ > bound) ≤ α.

    The one-sided betting bound of Waudby-Smith & Ramdas ("Estimating means of bounded
    random variables by betting", JRSS-B 2023: the capital process K⁻ with predictable
    plug-in bets).  For a candidate mean m the capital after t draws is
    K_t(m) = Π_{i≤t} (1 + λ_i (m − X_i)), with bets λ_i ∈ [0, 3/4] computed from
    X_1 … X_{i−1} only: λ_i = min(sqrt(2 log(1/α) / (M σ̂²_{i−1})), 3/4),
    σ̂²_t = (1/4 + Σ_{j≤t} (X_j − μ̂_j)²)/(t + 1), μ̂_t = (1/2 + Σ_{j≤t} X_j)/(t + 1).

    Why it is valid for every distribution on [0, 1] and every M: at m = μ each factor is
    ≥ 1/4 and has conditional mean 1, so K_t(μ) is a nonnegative martingale with K_0 = 1
    and Ville's inequality gives P(max_{t≤M} K_t(μ) ≥ 1/α) ≤ α.  K_t(m) is nondecreasing in
    m, so the returned m (the least m ∈ [0, 1] with max_t K_t(m) ≥ 1/α, by bisection, rounded
    up; 1 if there is none) is < μ only on that event.  Unlike mean + z·s.e., a sample
    with no large values still leaves room for rare ones (about log(1/α)/(¾M) above the
    mean), and small variances give bounds close to mean + σ·sqrt(2 log(1/α)/M).

    Args:
        samples: float64 [M, ...] in [0, 1], axis 0 in draw order (i.i.d. along it).
        alpha: failure probability, in (0, 1).

    Returns:
        float64 [...] bounds in [0, 1].
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    samples = tf.convert_to_tensor(samples, tf.float64)
    if samples.shape.rank == 0 or samples.shape[0] == 0:
        raise ValueError(f"samples must be [M, ...] with M >= 1, got shape {samples.shape}")
    return _betting_bound(samples, float(alpha))


@tf.function(reduce_retracing=True)
def _betting_bound(samples: tf.Tensor, alpha: float) -> tf.Tensor:
    """:func:`betting_upper_bound` without the argument checks (graph-safe)."""
    flat = tf.reshape(samples, tf.stack([tf.shape(samples)[0], -1]))
    draws = tf.cast(tf.shape(flat)[0], tf.float64)
    steps = tf.range(1.0, draws + 1.0, dtype=tf.float64)[:, None]
    running_mean = (0.5 + tf.cumsum(flat, axis=0)) / (steps + 1.0)
    running_var = (0.25 + tf.cumsum(tf.square(flat - running_mean), axis=0)) / (steps + 1.0)
    previous_var = tf.concat([0.25 + 0.0 * flat[:1], running_var[:-1]], axis=0)
    log_level = -np.log(alpha)
    bets = tf.minimum(tf.sqrt(2.0 * log_level / (draws * previous_var)), _MAX_BET)

    def not_rejected(middle):  # K_t(middle) stays below 1/α (it grows with middle)
        return tf.reduce_max(tf.cumsum(tf.math.log1p(bets * (middle - flat)), 0), 0) < log_level

    # The upper end is a rejected point (or 1): the bound is rounded up.
    _, upper = bisect(not_rejected, tf.zeros_like(flat[0]), tf.ones_like(flat[0]))
    return tf.reshape(upper, tf.shape(samples)[1:])


def _image_bound(pixels, key, shifts, caps, *, num_sets, num_clusters, channels, noise_stddev,
                 center_stddev, num_candidates, gamma, fixed_centers, num_noise_samples,
                 kl_alpha):
    """Pixel term of one image ``pixels`` [n, q] from its key: (bound, mean, s.e.), each [E].

    Shapes come from the Python arguments (k, q), never from static tensor shapes, which
    ``reduce_retracing`` may leave unknown.
    """
    unique = tf.raw_ops.UniqueWithCountsV2(x=pixels, axis=tf.constant([0], tf.int64))
    values = tf.reshape(tf.cast(unique.y, tf.float64), [-1, channels])
    counts = tf.cast(unique.count, tf.float64)
    centers_key, noise_key = _fold_in(key, _CENTERS), _fold_in(key, _NOISE)
    if fixed_centers is None:
        centers = _adaptive_center_sets(pixels, centers_key, num_sets, num_clusters, channels,
                                        center_stddev, num_candidates, gamma)
    else:
        fixed = tf.constant(fixed_centers, tf.float32)  # float32 as in the layer
        centers = tf.broadcast_to(fixed, tf.concat([[num_sets], tf.shape(fixed)], 0))
    if channels == 1:  # nothing else to sample
        noise_keys = tf.zeros([num_sets, 2], tf.int64)
    else:
        noise_keys = tf.map_fn(lambda index: _fold_in(noise_key, index),
                               tf.range(num_sets, dtype=tf.int64),
                               fn_output_signature=tf.TensorSpec([2], tf.int64))
    values_per_set = _set_values(values, counts, tf.cast(centers, tf.float64), noise_keys,
                                 shifts, caps, num_clusters, channels, noise_stddev,
                                 num_noise_samples)  # [M, E]
    mean = tf.reduce_mean(values_per_set, axis=0)
    if num_sets == 1:
        return values_per_set[0], mean, tf.zeros_like(mean)
    cap = tf.reduce_sum(counts) * caps  # eq. (4): n·q·ε²/(2σ²)
    scaled = tf.clip_by_value(tf.math.divide_no_nan(values_per_set, cap), 0.0, 1.0)
    std_error = tf.math.reduce_std(values_per_set, axis=0) * np.sqrt(1.0 / (num_sets - 1))
    return cap * _betting_bound(scaled, kl_alpha), mean, std_error


@tf.function(reduce_retracing=True)
def _batch_bounds(pixels, keys, shifts, caps, **config):
    """:func:`_image_bound` of every image (one map iteration each): three [B, E] tensors."""
    spec = tf.TensorSpec([None], tf.float64)
    return tf.map_fn(lambda item: _image_bound(item[0], item[1], shifts, caps, **config),
                     (pixels, keys), fn_output_signature=(spec, spec, spec))


def _image_keys(keys: tf.Tensor | np.ndarray | None, seed: int | None,
                batch: int) -> tf.Tensor:
    """Per-image keys int64 [B, 2]: ``keys`` checked, or derived from ``seed`` as a run
    key ([seed, 0]; fresh from OS entropy for None) for images 0 … B−1."""
    if keys is not None:
        if seed is not None:
            raise ValueError("pass keys or seed, not both")
        keys = np.asarray(keys)
        if keys.shape != (batch, 2) or not np.issubdtype(keys.dtype, np.integer):
            raise ValueError(f"keys must be int [{batch}, 2] (one per image), got "
                             f"{keys.dtype} {keys.shape}")
        return tf.constant(keys.astype(np.int64))
    if seed is None:
        run = np.random.SeedSequence().generate_state(2, np.uint64).view(np.int64)
    else:
        run = np.array([seed, 0], np.int64)
    stream = _fold_in(tf.constant(run), CENTER_STREAM)
    return tf.map_fn(lambda index: _fold_in(stream, index), tf.range(batch, dtype=tf.int64),
                     fn_output_signature=tf.TensorSpec([2], tf.int64))


def randdisc_kl_bound(x: tf.Tensor | np.ndarray, eps: float | Sequence[float],
                      num_clusters: int, noise_stddev: float, center_stddev: float,
                      num_candidates: int = 100, selection_gamma: float | None = None,
                      pixel_range: float = 1.0,
                      fixed_centers: Sequence[Sequence[float]] | np.ndarray | None = None,
                      pool_size: int = 1, pool_strides: int | None = None,
                      num_center_samples: int = DEFAULT_CENTER_SAMPLES,
                      num_noise_samples: int = 256, kl_alpha: float = 0.001,
                      keys: tf.Tensor | np.ndarray | None = None,
                      seed: int | None = None) -> KLBound:
    """U_KL of Proposition 1 for RandDisc on clean images ``x``, ℓ∞ budget(s) ``eps``.

    U_KL = s·q·ε²/(2τ²) + Σ_i sup_{Δ∈[−ε,ε]^q} E_{u∼p_c}[KL(p_r(x_i|u) ‖ p_r(x_i+Δ|u))] (eq. 5),
    u the centers drawn for the *clean* image, r(·|u) the nearest-center assignment of the
    σ-noisy pixel.  How each part is computed, and why it is sound:

    - **sup over Δ at the vertices {±ε}^q, per center set.**  Each assignment probability
      P(x + Δ + w ∈ V_j) integrates a log-concave density over a convex (Voronoi) cell, so
      it is log-concave in Δ (Prékopa); KL(p ‖ p_Δ) = −H(p) − Σ_j p_j log p_j(Δ) is therefore
      convex in Δ for every u and its maximum over the cube is attained at a vertex.  The
      sup is taken per center set: Y(u) = Σ_i max_vertex KL_i(Δ, u), and
      E_u[Y] ≥ Σ_i sup_Δ E_u[KL_i(Δ, u)] (a sup of means is at most the mean of sups).
    - **per-pixel cap.**  r(·|u) is a function of x_i + w_i, so by data processing each
      term is at most ‖Δ‖²/(2σ²) = qε²/(2σ²): Y(u) ∈ [0, G], G = n·q·ε²/(2σ²) (eq. 4).
    - **E over u**: M = ``num_center_samples`` i.i.d. center sets per image, drawn exactly
      as :class:`~tfcert.layers.RandomizedDiscretization` draws them, give Y(u_1) … Y(u_M);
      :func:`betting_upper_bound` of Y/G at level ``kl_alpha`` (times G) bounds E_u[Y] with
      probability ≥ 1 − α′, and is ≤ G, so U_KL ≤ center term + eq. (4) always.
    - **assignment probabilities given u**: exact for q = 1 (:func:`interval_log_probabilities`,
      over the image's distinct pixel values), Monte-Carlo with ``num_noise_samples`` draws
      for q > 1 (``exact_assignment=False``, not rigorous: the plug-in KL is biased).

    Randomness: image b's draws depend only on its key ``keys[b]`` and the draw number, so
    its bound is bit-identical alone or in any batch.  Center set m comes from
    ``fold_in(fold_in(key, 0), m // 64)`` (split into candidate and selection keys), the
    noise of set m (q > 1) from ``fold_in(fold_in(key, 1), m)``.

    Down-sampled variant (``pool_size``/``pool_strides``): max pooling is 1-Lipschitz in ℓ∞,
    so the pooled image is perturbed by at most ε and the bound is computed on it (n = its
    pixel count); the bilinear resize belongs to the base classifier (Section 5.1).

    Note: Prop. 2 needs U_KL < ½, while the center term alone is s·q·ε²/(2τ²) (= 0.89 for the
    MNIST setting s = 100, τ = 0.15 at ε = 0.02): adaptive centers certify only tiny ε unless
    s is small or τ large; fixed centers have no center term.

    Args:
        x: clean images [B, H, W, q] in [0, t].
        eps: ℓ∞ budget, a scalar or a 1-D grid of E values.
        num_clusters, noise_stddev, center_stddev, num_candidates, selection_gamma,
        pixel_range, fixed_centers, pool_size, pool_strides: the layer's hyperparameters
            (k, σ > 0, τ, s, γ, t, ...); see :class:`~tfcert.layers.RandomizedDiscretization`.
        num_center_samples: M, center sets per image (or noise replicates with fixed centers
            and q > 1); unused with fixed centers and q = 1 (nothing random).
        num_noise_samples: noise draws per pixel and center set (q > 1 only).
        kl_alpha: α′, the failure probability of the bound on the pixel term.
        keys: per-image stateless keys, int [B, 2] (e.g. ``fold_in(fold_in(run_key,
            CENTER_STREAM), image_index)``, as :func:`tfcert.keys.draw_keys` makes).
        seed: instead of ``keys``: an int run key [seed, 0] for images 0 … B−1 of this
            batch; None (and no keys): a fresh run key from OS entropy.

    Returns:
        A :class:`KLBound` (float64, [E, B], or [B] for a scalar ``eps``).
    """
    eps_grid = _check_arguments(eps, noise_stddev, center_stddev, fixed_centers,
                                num_center_samples, kl_alpha)
    images = max_pool(tf.cast(x, tf.float32), pool_size,
                      pool_size if pool_strides is None else pool_strides)
    channels = images.shape[-1]
    pixels = tf.reshape(images, tf.stack([tf.shape(images)[0], -1, channels]))
    num_pixels = int(np.prod(images.shape[1:]) // channels)
    exact = channels == 1
    sampled = fixed_centers is None or not exact
    num_sets = int(num_center_samples) if sampled else 1
    vertices = np.array(list(itertools.product((-1.0, 1.0), repeat=channels)))  # [V, q]
    shifts = (eps_grid[:, None, None] * vertices[None]).reshape(-1, channels)  # [E·V, q]
    caps = channels * eps_grid ** 2 / (2.0 * noise_stddev ** 2)
    if fixed_centers is None:
        fixed = None
        center_term = num_candidates * channels * eps_grid ** 2 / (2.0 * center_stddev ** 2)
    else:
        fixed = _check_fixed_centers(fixed_centers, num_clusters, channels)
        center_term = np.zeros_like(eps_grid)
    per_image = _batch_bounds(
        pixels, _image_keys(keys, seed, int(pixels.shape[0])), tf.constant(shifts),
        tf.constant(caps), num_sets=num_sets, num_clusters=int(num_clusters), channels=channels,
        noise_stddev=float(noise_stddev), center_stddev=float(center_stddev),
        num_candidates=int(num_candidates), fixed_centers=fixed,
        gamma=float(default_sharpness(pixel_range) if selection_gamma is None
                    else selection_gamma),
        num_noise_samples=int(num_noise_samples), kl_alpha=float(kl_alpha))
    bound, mean, std_error = (tf.transpose(part) for part in per_image)  # [E, B] each
    center_term = tf.broadcast_to(tf.constant(center_term)[:, None], tf.shape(bound))
    cap = tf.broadcast_to(tf.constant(num_pixels * caps)[:, None], tf.shape(bound))
    result = KLBound(center_term + bound, center_term, bound, mean, std_error, cap,
                     failure_probability=float(kl_alpha) if sampled else 0.0,
                     exact_assignment=exact, num_pixels=num_pixels,
                     num_center_samples=num_sets)
    if np.ndim(eps) == 0:
        result = result._replace(**{name: getattr(result, name)[0] for name in
                                    ("value", "center_term", "pixel_bound", "pixel_mean",
                                     "std_error", "pixel_cap")})
    return result


def _check_arguments(eps, noise_stddev: float, center_stddev: float, fixed_centers,
                     num_center_samples: int, kl_alpha: float) -> np.ndarray:
    """The ε grid (float64, 1-D) after checking :func:`randdisc_kl_bound`'s arguments."""
    eps_grid = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if eps_grid.ndim != 1 or np.any(eps_grid < 0) or not np.all(np.isfinite(eps_grid)):
        raise ValueError(f"eps must be a finite scalar or 1-D grid >= 0, got {eps}")
    if not noise_stddev > 0:
        raise ValueError(f"the KL bound needs noise_stddev > 0, got {noise_stddev}")
    if fixed_centers is None and not center_stddev > 0:
        raise ValueError(f"adaptive centers need center_stddev > 0, got {center_stddev}")
    if int(num_center_samples) != num_center_samples or num_center_samples < 2:
        raise ValueError(f"num_center_samples must be an integer >= 2, got "
                         f"{num_center_samples}")
    if not 0.0 < kl_alpha < 1.0:
        raise ValueError(f"kl_alpha must be in (0, 1), got {kl_alpha}")
    return eps_grid


def _check_fixed_centers(fixed_centers, num_clusters: int,
                         channels: int) -> tuple[tuple[float, ...], ...]:
    """The fixed centers [k, q] as a (hashable) tuple, float32-rounded as in the layer."""
    fixed = np.asarray(fixed_centers, np.float32)
    if fixed.shape != (num_clusters, channels):
        raise ValueError(f"fixed_centers must have shape [{num_clusters}, {channels}], "
                         f"got {fixed.shape}")
    return tuple(tuple(float(v) for v in row) for row in fixed)


def layer_kl_bound(layer: RandomizedDiscretization, x: tf.Tensor | np.ndarray,
                   eps: float | Sequence[float],
                   num_center_samples: int = DEFAULT_CENTER_SAMPLES,
                   num_noise_samples: int = 256, kl_alpha: float = 0.001,
                   keys: tf.Tensor | np.ndarray | None = None,
                   seed: int | None = None) -> KLBound:
    """:func:`randdisc_kl_bound` (Proposition 1) with the hyperparameters of a RandDisc
    ``layer``; the sampling arguments are passed through.

    Proposition 1 is for RandDisc only: other layers (RandMix included) raise TypeError.
    """
    if not isinstance(layer, RandomizedDiscretization):
        raise TypeError(f"Proposition 1 bounds RandomizedDiscretization, got {type(layer)}")
    return randdisc_kl_bound(
        x, eps, layer.num_clusters, layer.noise_stddev, layer.center_stddev,
        num_candidates=layer.num_candidates, selection_gamma=layer.selection_gamma,
        pixel_range=layer.pixel_range, fixed_centers=layer.fixed_centers,
        pool_size=layer.pool_size, pool_strides=layer.pool_strides,
        num_center_samples=num_center_samples, num_noise_samples=num_noise_samples,
        kl_alpha=kl_alpha, keys=keys, seed=seed)


class KLCertificate(NamedTuple):
    """Result of :func:`kl_certify`, each of shape ``broadcast(u_kl, [B])``.

    Attributes:
        certified: margin_lower > sqrt(2·U_KL) (Prop. 2, sign corrected).
        margin_lower: lower confidence bound of margin(x̃, y, f) (same for every U_KL).
        delta: δ = ½·max(margin_lower, 0)² − U_KL (> 0 where certified).
        probability_bound: 1 − (k−1)·exp(−m·(margin_lower − sqrt(2 U_KL))²/2), the sound
            probability that the majority of m votes on x̃' is y (0 where not certified).
        paper_probability_bound: 1 − k·exp(−2mδ²) as printed in Prop. 2 (0 where not
            certified); valid only where margin_lower + sqrt(2 U_KL) ≤ 1, and there it is
            never larger than ``probability_bound``.
        failure_probability: α + α′, a bound on the probability that the certificate of an
            image and ε is wrong (the margin bound's α plus the U_KL bound's α′, union
            bound; α alone for a U_KL that always holds).
        rigorous: False when U_KL is a Monte-Carlo estimate (q > 1, ``KLBound.rigorous``).
    """

    certified: tf.Tensor
    margin_lower: tf.Tensor
    delta: tf.Tensor
    probability_bound: tf.Tensor
    paper_probability_bound: tf.Tensor
    failure_probability: float
    rigorous: bool


def kl_certify(counts: tf.Tensor | np.ndarray, labels: tf.Tensor | np.ndarray | Sequence[int],
               u_kl: KLBound | tf.Tensor | np.ndarray | float, alpha: float = 0.001,
               num_votes: int | None = None) -> KLCertificate:
    """Certified accuracy of Prop. 2 (Zhang & Liang), sign of δ corrected (docs/SOUNDNESS.md §3).

    Pinsker and data processing give margin(x̃', y, f) ≥ margin(x̃, y, f) − sqrt(2·U_KL) for
    every x' in the ε-ball, so y stays the most likely output when the clean margin exceeds
    sqrt(2·U_KL), i.e. δ := ½·margin² − U_KL > 0 (the paper prints δ with the sign flipped).
    The clean margin P(f = y) − max_{z≠y} P(f = z) is bounded from below soundly from the
    votes ``counts``: lower(p_y) − min(max_{z≠y} upper(p_z), 1 − lower(p_y)) with one-sided
    Clopper-Pearson bounds (:func:`tfcert.stats.clopper_pearson`) at level α/k each (the
    label is given, so k one-sided bounds: a union bound over the classes), so the
    certificate holds with probability ≥ 1 − α over the votes (given a valid U_KL).  With
    a :class:`KLBound` from Prop. 1, which is valid with probability ≥ 1 − α′, a certified
    label is wrong with probability ≤ α + α′ (``failure_probability``).

    Majority vote of m fresh runs on x̃': for each z ≠ y, 1{f=z} − 1{f=y} ∈ [−1, 1] has mean
    ≤ −(margin_lower − sqrt(2 U_KL)), so Hoeffding and a union bound give
    ``probability_bound``.  The paper's 1 − k·exp(−2mδ²) would need a perturbed margin ≥ 2δ,
    which holds only when margin + sqrt(2 U_KL) ≤ 1; it is reported as
    ``paper_probability_bound`` for comparison.

    Args:
        counts: [B, k] votes of the randomized classifier on the clean images
            (non-negative integers, :func:`tfcert.stats.vote_counts`).
        labels: [B] true labels y, integers in [0, k).
        u_kl: a :class:`KLBound` (its ``value``, failure probability and rigour are used),
            or U_KL values, broadcastable to [..., B] (e.g. [E, B] for an ε grid), taken as
            a bound that always holds (such as eq. (4), :func:`tfcert.bounds.gaussian_kl_bound`);
            >= 0.
        alpha: failure probability of the margin bound, a scalar in (0, 1).
        num_votes: m of the majority vote (a whole number >= 1); default the number of
            votes in ``counts``.

    Raises:
        ValueError: an argument outside the contract above, naming it.

    Returns:
        A :class:`KLCertificate` (float64/bool tensors, a float and a bool).
    """
    kl_failure, rigorous = 0.0, True
    if isinstance(u_kl, KLBound):
        kl_failure, rigorous, u_kl = u_kl.failure_probability, u_kl.rigorous, u_kl.value
    if np.ndim(alpha) != 0:
        raise ValueError("kl_certify takes one alpha (a scalar): its failure_probability is "
                         "one number")
    counts = stats.vote_counts(counts)
    num_classes = counts.shape[-1]
    labels = stats.class_indices(labels, num_classes, "labels")
    total = tf.reduce_sum(tf.cast(counts, tf.float64), axis=-1)
    lower, upper = stats.clopper_pearson(counts, total[:, None], alpha / num_classes)
    is_label = tf.one_hot(labels, num_classes, on_value=True, off_value=False)
    label_lower = tf.reduce_sum(tf.where(is_label, lower, 0.0), axis=-1)
    # On the event p_y >= lower_y, no other class exceeds 1 - lower_y either (rounded up).
    other_upper = tf.minimum(tf.reduce_max(tf.where(is_label, 0.0, upper), axis=-1),
                             stats.complement_up(label_lower))
    margin_lower = label_lower - other_upper
    u_kl = stats.checked(tf.cast(u_kl, tf.float64), lambda u: u >= 0.0, "u_kl must be >= 0")
    if num_votes is not None and not (float(num_votes) >= 1 and float(num_votes) % 1 == 0):
        raise ValueError(f"num_votes must be a whole number >= 1, got {num_votes}")
    threshold = tf.sqrt(2.0 * u_kl)
    certified = margin_lower > threshold
    delta = 0.5 * tf.square(tf.maximum(margin_lower, 0.0)) - u_kl
    votes = total if num_votes is None else tf.constant(float(num_votes), tf.float64)
    gap = margin_lower - threshold
    sound = 1.0 - (num_classes - 1) * tf.exp(-votes * tf.square(gap) / 2.0)
    paper = 1.0 - num_classes * tf.exp(-2.0 * votes * tf.square(delta))
    margin_lower = tf.broadcast_to(margin_lower, tf.shape(certified))
    return KLCertificate(
        certified=certified, margin_lower=margin_lower, delta=delta,
        probability_bound=tf.where(certified, tf.maximum(sound, 0.0), 0.0),
        paper_probability_bound=tf.where(certified, tf.maximum(paper, 0.0), 0.0),
        failure_probability=float(alpha) + kl_failure, rigorous=rigorous)
