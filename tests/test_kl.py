"""KL certificates of Zhang & Liang Section 4: Proposition 1 (RandDisc U_KL) and
Proposition 2 (certified accuracy, sign of δ corrected), against closed forms (scipy),
Monte-Carlo frequencies of the layer and the Gaussian bound of eq. (4); coverage of the
high-probability bound on Prop. 1's expectation over the centers, and per-image keys."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats as sps

from tfcert.bounds import gaussian_kl_bound
from tfcert.kl import (CENTER_STREAM, betting_upper_bound, interval_log_probabilities,
                       kl_certify, layer_kl_bound, randdisc_kl_bound)
from tfcert.layers.discretization import RandomizedDiscretization, RandomizedMixture


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _binary_digit(batch=2):
    """A two-level 28x28 image, like a binarised MNIST digit."""
    image = np.zeros((batch, 28, 28, 1), np.float32)
    image[:, 5:23, 9:13] = 1.0
    image[:, 5:9, 9:20] = 1.0
    return image


def _scipy_interval_probs(value, centers, sigma):
    """P(nearest center to value + N(0, σ²) is each sorted center), by scipy (upper-tail
    intervals through the survival function, so tiny probabilities keep their accuracy)."""
    centers = np.sort(centers)
    edges = np.concatenate([[-np.inf], (centers[1:] + centers[:-1]) / 2, [np.inf]])
    z = (edges - value) / sigma
    return np.where(z[:-1] > 0, sps.norm.sf(z[:-1]) - sps.norm.sf(z[1:]),
                    sps.norm.cdf(z[1:]) - sps.norm.cdf(z[:-1]))


def _scipy_kl(value, shift, centers, sigma):
    p = _scipy_interval_probs(value, centers, sigma)
    q = _scipy_interval_probs(value + shift, centers, sigma)
    return float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))


def test_interval_probabilities_match_scipy_and_are_normalised():
    centers = np.array([[0.8, 0.1, 0.45, 0.5], [0.3, 0.3, 0.9, 0.0]])
    values = np.array([[0.0, 0.3, 0.47, 1.2], [-3.0, 0.3, 0.6, 5.0]])
    probs = np.exp(interval_log_probabilities(values, centers, 0.15).numpy())
    for b in range(2):
        for m in range(4):
            expected = _scipy_interval_probs(values[b, m], centers[b], 0.15)
            np.testing.assert_allclose(probs[b, m], expected, rtol=1e-7, atol=1e-300)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)


def test_interval_probabilities_with_one_and_two_centers():
    assert interval_log_probabilities([[0.3, 2.0]], [[0.5]], 0.1).numpy().tolist() == [[[0.0],
                                                                                     [0.0]]]
    log_p = interval_log_probabilities([[0.3]], [[0.9, 0.1]], 0.2).numpy()[0, 0]
    # z = (0.5 − 0.3)/0.2 = 1 up to 2 ulps; log Φ(±1) from TFP and scipy agree to ~1e-15.
    np.testing.assert_allclose(log_p, [sps.norm.logcdf(1.0), sps.norm.logsf(1.0)], rtol=1e-12)


def test_interval_probabilities_are_accurate_in_far_tails():
    log_p = interval_log_probabilities([[0.0]], [[0.0, 10.0]], 0.1).numpy()[0, 0]
    assert log_p[1] == pytest.approx(sps.norm.logsf(50.0), rel=1e-9)  # P ≈ 1e-545
    assert np.isfinite(log_p).all()


def test_one_channel_assignment_probabilities_match_layer_frequencies():
    centers = np.array([0.1, 0.45, 0.8])
    sigma = 0.2
    layer = RandomizedDiscretization(3, sigma, 0.0, fixed_centers=centers[:, None], seed=0)
    for value in (0.3, 0.62):
        out = layer(np.full([1, 150, 150, 1], value, np.float32)).numpy().ravel()
        frequencies = np.array([np.mean(np.isclose(out, c)) for c in centers])
        probs = np.exp(interval_log_probabilities([[value]], [centers], sigma).numpy()[0, 0])
        tolerance = 5 * np.sqrt(probs * (1 - probs) / out.size)
        assert np.all(np.abs(frequencies - probs) <= tolerance)


def test_pixel_kl_is_convex_in_the_shift_so_vertices_are_exact():
    """Prop. 1's sup over Δ ∈ [−ε, ε] is attained at ±ε (log-concavity argument)."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        centers, value = rng.uniform(size=3), rng.uniform()
        shifts = np.linspace(-0.1, 0.1, 81)
        kl = np.array([_scipy_kl(value, d, centers, 0.15) for d in shifts])
        assert np.all(np.diff(kl, 2) >= -1e-12)
        assert kl.max() == max(kl[0], kl[-1])


def test_fixed_centers_bound_matches_closed_form():
    x = _images([2, 3, 3, 1])
    centers, sigma, eps = np.array([0.25, 0.75]), 0.15, np.array([0.01, 0.05, 0.3])
    result = randdisc_kl_bound(x, eps, 2, sigma, 0.15, fixed_centers=centers[:, None])
    cap = eps ** 2 / (2 * sigma ** 2)
    expected = np.array([[sum(min(max(_scipy_kl(v, s * e, centers, sigma) for s in (-1, 1)), c)
                              for v in image.ravel()) for image in x] for e, c in zip(eps, cap)])
    np.testing.assert_allclose(result.value.numpy(), expected, rtol=1e-8)
    np.testing.assert_array_equal(result.center_term.numpy(), 0.0)
    np.testing.assert_array_equal(result.std_error.numpy(), 0.0)
    np.testing.assert_array_equal(result.pixel_bound.numpy(), result.pixel_mean.numpy())
    assert result.exact_assignment and result.num_pixels == 9
    assert result.failure_probability == 0.0 and result.num_center_samples == 1
    assert result.value.shape == (3, 2)


def test_randdisc_bound_is_far_below_gaussian_on_a_two_level_image():
    eps = np.array([0.01, 0.05, 0.1])
    result = randdisc_kl_bound(_binary_digit(), eps, 2, 0.15, 0.15, num_center_samples=2000,
                               seed=0)
    gaussian = gaussian_kl_bound(eps, 28 * 28, 1, 0.15)
    gaussian = np.asarray(gaussian, np.float64)[:, None]
    np.testing.assert_allclose(gaussian[:, 0], 784 * eps ** 2 / (2 * 0.15 ** 2))
    np.testing.assert_allclose(result.center_term.numpy(),
                               np.broadcast_to(100 * eps[:, None] ** 2 / (2 * 0.15 ** 2), (3, 2)))
    np.testing.assert_allclose(result.pixel_cap.numpy(), np.broadcast_to(gaussian, (3, 2)))
    # Measured: mean 0.026-0.038 G, bound 0.032-0.045 G (G = eq. (4)); margins of ≥ 24%.
    assert np.all(result.pixel_mean.numpy() < 0.05 * gaussian)
    assert np.all(result.pixel_bound.numpy() < 0.06 * gaussian)
    # The betting bound's excess over the mean at M = 2000 (measured 18-23%), not the
    # 3x of M = 50, where log(1/α′)/(¾M) ≈ 0.18 G alone.
    assert np.all(result.pixel_bound.numpy() < 1.3 * result.pixel_mean.numpy())
    assert np.all(result.pixel_bound.numpy() > result.pixel_mean.numpy())
    assert np.all(result.value.numpy() < 0.2 * gaussian)
    assert np.all(result.std_error.numpy() < 0.1 * result.pixel_mean.numpy())  # measured 4-5%


def test_bound_properties_on_random_grayscale_images():
    x = _images([3, 8, 8, 1])
    eps = np.array([0.0, 0.01, 0.03, 0.1])
    result = randdisc_kl_bound(x, eps, 3, 0.1, 0.2, num_center_samples=200, seed=2)
    mean, bound = result.pixel_mean.numpy(), result.pixel_bound.numpy()
    np.testing.assert_array_equal(bound[0], 0.0)
    np.testing.assert_array_equal(mean[0], 0.0)
    # Per center set, the worst vertex KL grows with ε (convex in Δ, 0 at Δ = 0).
    assert np.all(np.diff(mean, axis=0) > 0)
    assert np.all(mean <= bound) and np.all(bound <= result.pixel_cap.numpy())
    np.testing.assert_array_equal(result.value.numpy(), result.center_term.numpy() + bound)
    assert result.failure_probability == 0.001 and result.rigorous
    assert result.num_center_samples == 200
    again = randdisc_kl_bound(x, eps, 3, 0.1, 0.2, num_center_samples=200, seed=2)
    np.testing.assert_array_equal(again.value.numpy(), result.value.numpy())
    scalar = randdisc_kl_bound(x, 0.03, 3, 0.1, 0.2, num_center_samples=200, seed=2)
    assert scalar.value.shape == (3,)
    np.testing.assert_array_equal(scalar.value.numpy(), result.value.numpy()[2])


def test_unseeded_calls_draw_fresh_centers():
    x = _images([1, 6, 6, 1])
    first, second = (randdisc_kl_bound(x, 0.05, 2, 0.15, 0.15, num_center_samples=20)
                     for _ in range(2))
    assert first.pixel_mean.numpy()[0] != second.pixel_mean.numpy()[0]


def test_bound_of_an_image_does_not_depend_on_its_batch():
    """Per-image keys: image j's bound is bit-identical alone, in a batch, or permuted."""
    keys = np.array([[11, 1], [-5, 2], [2 ** 40, 3]], np.int64)
    cases = [(_images([3, 7, 7, 1], seed=3), {}),
             (_images([3, 3, 3, 3], seed=4), {"num_noise_samples": 16})]  # q = 3, sampled
    for x, extra in cases:
        kwargs = {"num_center_samples": 70, **extra}  # 70 sets: two key blocks of 64
        batch = randdisc_kl_bound(x, [0.01, 0.05], 2, 0.15, 0.15, keys=keys, **kwargs)
        alone = randdisc_kl_bound(x[1:2], [0.01, 0.05], 2, 0.15, 0.15, keys=keys[1:2],
                                  **kwargs)
        order = [2, 1, 0]
        permuted = randdisc_kl_bound(x[order], [0.01, 0.05], 2, 0.15, 0.15, keys=keys[order],
                                     **kwargs)
        for name in ("value", "pixel_mean", "std_error"):
            full = getattr(batch, name).numpy()
            np.testing.assert_array_equal(getattr(alone, name).numpy()[:, 0], full[:, 1])
            np.testing.assert_array_equal(getattr(permuted, name).numpy(), full[:, order])
        # seed=s is the run key [s, 0] with images 0 … B−1, derived as the CLI derives keys
        # (int64 data: fold_in returns the dtype of what it folds in).
        fold_in = tf.random.experimental.stateless_fold_in
        stream = fold_in(tf.constant([4, 0], tf.int64), tf.constant(CENTER_STREAM, tf.int64))
        derived = np.stack([fold_in(stream, tf.constant(j, tf.int64)).numpy() for j in range(3)])
        seeded = randdisc_kl_bound(x, [0.01, 0.05], 2, 0.15, 0.15, seed=4, **kwargs)
        again = randdisc_kl_bound(x, [0.01, 0.05], 2, 0.15, 0.15, keys=derived, **kwargs)
        np.testing.assert_array_equal(seeded.value.numpy(), again.value.numpy())


@pytest.mark.slow
def test_betting_bound_covers_skewed_bounded_means_where_mean_plus_3_se_does_not():
    """Coverage of `betting_upper_bound` at the CLI's α′ = 0.001, on [0, 1] variables.

    R = 20,000 replications of M = 100 draws.  A valid bound misses with probability ≤ α′,
    so its misses are stochastically below Binomial(R, α′); the test allows
    ``sps.binom.isf(1e-5, R, α′)`` (= 42) misses: a false alarm has probability < 1e-5 per
    distribution, < 1e-4 for the test.  The old rule (mean + 3 standard errors of 10 batch
    means, the CLI's U_KL before) is checked against the same limit: it misses 37% of the
    time for Bernoulli(0.01) (all 100 draws are 0 with probability 0.99¹⁰⁰ = 0.37) and
    1.7% for Beta(0.5, 6) (17x α′), in the range of the 2.8% measured on the per-set KL of
    an MNIST digit (Prop. 1, M = 100; 1.2% at M = 1000).
    """
    alpha, replications, draws = 0.001, 20_000, 100
    limit = sps.binom.isf(1e-5, replications, alpha)
    rng = np.random.default_rng(0)
    cases = {"bernoulli": ((rng.uniform(size=(draws, replications)) < 0.01) * 1.0, 0.01),
             "beta": (rng.beta(0.5, 6.0, size=(draws, replications)), 0.5 / 6.5)}
    for name, (samples, mean) in cases.items():
        bound = betting_upper_bound(samples, alpha).numpy()
        assert bound.shape == (replications,) and np.all(bound <= 1.0)
        assert np.sum(bound < mean) <= limit, name
        groups = samples.reshape(10, draws // 10, replications).mean(axis=1)
        old = groups.mean(0) + 3 * groups.std(0, ddof=1) / np.sqrt(10)
        assert np.sum(old < mean) > limit, name
    # Zero variance: the bound still covers the mean, and exceeds it by about
    # log(1/α′)/(¾M) = 0.09 (the 0.2 allows twice that).
    constant = betting_upper_bound(np.full((draws, 2), 0.3), alpha).numpy()
    assert np.all(constant >= 0.3) and np.all(constant < 0.3 + 0.2)


@pytest.mark.slow
def test_kl_bound_covers_the_expectation_over_center_sets():
    """Coverage of Prop. 1's Monte-Carlo part through `randdisc_kl_bound` (q = 1).

    Truth: E_u[Σ_i max_Δ KL_i] of a 3x3 image from 100,000 center sets, lowered by 5 of its
    standard errors (the truth is then too high with probability < 3e-7).  R bounds (the
    same image with R independent keys) may miss it ``sps.binom.isf(1e-5, R, α′)`` times
    (a valid bound's misses are below Binomial(R, α′): false alarm < 1e-5 per ε and level,
    < 1e-4 in all).  At the CLI's α′ = 0.001 with M = 20 sets and R = 2000 the limit is
    10 misses, and mean + 3 s.e. of the same sets, which misses 2.5-2.9% (measured), must
    exceed it (the chance that it does not is < 1e-9); at M = 200 it still misses 0.3-0.4%,
    3-4x α′.  α′ = 0.2 with M = 200 (R = 1000, limit 256) checks the bound where it is
    tight (1.08-1.09x the truth, measured).
    """
    image = np.array([0, 0, 0, 1, 1, 0.5, 0, 1, 0.2], np.float32).reshape(1, 3, 3, 1)
    eps = [0.02, 0.1]
    truth = randdisc_kl_bound(image, eps, 2, 0.15, 0.15, num_center_samples=100_000, seed=1)
    lowest = truth.pixel_mean.numpy() - 5 * truth.std_error.numpy()  # [E, 1]
    for alpha, sets, replications in ((0.001, 20, 2000), (0.2, 200, 1000)):
        keys = np.stack([np.arange(replications), np.full(replications, 7)], axis=1)
        bounds = randdisc_kl_bound(np.repeat(image, replications, 0), eps, 2, 0.15, 0.15,
                                   num_center_samples=sets, kl_alpha=alpha, keys=keys)
        limit = sps.binom.isf(1e-5, replications, alpha)
        assert np.all(np.sum(bounds.pixel_bound.numpy() < lowest, axis=1) <= limit)
        if alpha == 0.001:
            old = bounds.pixel_mean.numpy() + 3 * bounds.std_error.numpy()
            assert np.all(np.sum(old < lowest, axis=1) > limit)


def test_u_kl_never_exceeds_the_gaussian_bound_plus_the_center_term():
    x = _images([2, 5, 5, 1], seed=6)
    eps = np.array([0.01, 0.1, 0.3])
    ceiling = (100 * eps ** 2 / (2 * 0.15 ** 2) + gaussian_kl_bound(eps, 25, 1, 0.15))[:, None]
    # M = 2 sets cannot reach capital 1/α′ (at most 1.75² < 1000): the bound is the clamp.
    clamped = randdisc_kl_bound(x, eps, 2, 0.15, 0.15, num_center_samples=2, seed=0)
    np.testing.assert_allclose(clamped.value.numpy(), np.broadcast_to(ceiling, (3, 2)),
                               rtol=1e-15)  # the same float64 sum, rounded in another order
    loose = randdisc_kl_bound(x, eps, 2, 0.15, 0.15, num_center_samples=40, kl_alpha=0.5,
                              seed=0)
    assert np.all(loose.value.numpy() < ceiling)  # 40 sets at α′ = 0.5: an informative bound


def test_colour_monte_carlo_matches_exact_one_channel_case():
    """q = 2 with centers that differ in channel 0 only reduces to the exact q = 1 bound."""
    x1 = _images([2, 4, 4, 1])
    x2 = np.concatenate([x1, np.full_like(x1, 0.5)], axis=-1)
    for eps in (0.02, 0.1):
        exact = randdisc_kl_bound(x1, eps, 2, 0.15, 0.15, fixed_centers=[[0.2], [0.7]])
        sampled = randdisc_kl_bound(x2, eps, 2, 0.15, 0.15,
                                    fixed_centers=[[0.2, 0.5], [0.7, 0.5]],
                                    num_center_samples=10, num_noise_samples=4000, seed=1)
        assert exact.rigorous and not sampled.rigorous
        assert exact.num_center_samples == 1 and sampled.num_center_samples == 10
        gap = sampled.pixel_mean.numpy() - exact.pixel_bound.numpy()
        # 4 standard errors of the 10 replicates either way, plus, above, 10% for the bias
        # of the per-set max over vertices of noisy estimates (here pairs of vertices are
        # equal in truth, the max picks the noisier one) and of the plug-in KL: measured
        # +4% and +6%.
        noise = 4 * sampled.std_error.numpy()
        assert np.all(gap >= -noise)
        assert np.all(gap <= noise + 0.1 * exact.pixel_bound.numpy())
        assert np.all(sampled.std_error.numpy() > 0)


def test_colour_bound_is_flagged_as_not_rigorous():
    x = _images([2, 3, 3, 3], seed=5)
    result = randdisc_kl_bound(x, 0.01, 2, 0.15, 0.15, num_center_samples=4,
                               num_noise_samples=8, seed=0)
    assert result.exact_assignment is False and result.rigorous is False
    assert result.guarantee.startswith("NOT a rigorous bound")
    certificate = kl_certify(np.array([[90, 10], [60, 40]]), [0, 0], result, alpha=0.01)
    assert certificate.rigorous is False
    assert certificate.failure_probability == pytest.approx(0.011, rel=1e-12)  # float α + α′


def test_downsampled_variant_computes_the_bound_on_the_pooled_image():
    x = _binary_digit(1) * 0.8 + 0.1 * _images([1, 28, 28, 1])
    pooled = x[:, :27, :27].reshape(1, 9, 3, 9, 3, 1)[:, :, :2, :, :2].max(axis=(2, 4))
    kwargs = {"num_center_samples": 10, "seed": 3}
    small = randdisc_kl_bound(x, 0.06, 2, 0.15, 0.15, pool_size=2, pool_strides=3, **kwargs)
    direct = randdisc_kl_bound(pooled, 0.06, 2, 0.15, 0.15, **kwargs)
    assert small.num_pixels == 81
    np.testing.assert_array_equal(small.value.numpy(), direct.value.numpy())
    full = randdisc_kl_bound(x, 0.06, 2, 0.15, 0.15, **kwargs)
    assert np.all(small.pixel_mean.numpy() < full.pixel_mean.numpy())


def test_layer_kl_bound_uses_the_layer_hyperparameters():
    layer = RandomizedDiscretization(2, 0.12, 0.2, num_candidates=30, pool_size=1,
                                     pool_strides=2)
    x = _images([2, 10, 10, 1])
    expected = randdisc_kl_bound(x, [0.01, 0.02], 2, 0.12, 0.2, num_candidates=30,
                                 pool_strides=2, num_center_samples=10, kl_alpha=0.01, seed=5)
    result = layer_kl_bound(layer, x, [0.01, 0.02], num_center_samples=10, kl_alpha=0.01,
                            seed=5)
    np.testing.assert_array_equal(result.value.numpy(), expected.value.numpy())
    assert result.num_pixels == 25 and result.failure_probability == 0.01
    with pytest.raises(TypeError):
        layer_kl_bound(RandomizedMixture(2, 0.12, 0.2), x, 0.01)


def test_kl_bound_rejects_bad_arguments():
    x = _images([1, 4, 4, 1])
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, -0.1, 2, 0.1, 0.1)
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, 0.1, 2, 0.0, 0.1)
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, 0.1, 2, 0.1, 0.1, num_center_samples=1)
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, 0.1, 2, 0.1, 0.1, kl_alpha=0.0)
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, 0.1, 2, 0.1, 0.1, keys=[[1, 2], [3, 4]])  # two keys, one image
    with pytest.raises(ValueError):
        randdisc_kl_bound(x, 0.1, 2, 0.1, 0.1, keys=[[1, 2]], seed=0)
    with pytest.raises(ValueError):
        betting_upper_bound(np.zeros([5]), 1.0)


# ---------------------------------------------------------------- Proposition 2


def _scipy_margin_lower(counts, label, alpha):
    k, n = len(counts), counts.sum()
    level = alpha / k
    lower = [sps.beta.ppf(level, c, n - c + 1) if c > 0 else 0.0 for c in counts]
    upper = [sps.beta.ppf(1 - level, c + 1, n - c) if c < n else 1.0 for c in counts]
    other = max(u for z, u in enumerate(upper) if z != label)
    return lower[label] - min(other, 1 - lower[label])


def test_margin_lower_bound_matches_scipy_clopper_pearson():
    counts = np.array([[950, 30, 20], [400, 350, 250], [0, 1000, 0]])
    labels = np.array([0, 0, 1])
    result = kl_certify(counts, labels, 0.0, alpha=0.01)
    expected = [_scipy_margin_lower(c, y, 0.01) for c, y in zip(counts, labels)]
    np.testing.assert_allclose(result.margin_lower.numpy(), expected, rtol=1e-8)


def test_certified_iff_margin_lower_exceeds_sqrt_two_u_kl():
    counts = np.array([[980, 15, 5], [600, 390, 10], [5, 990, 5]])
    labels = np.array([0, 0, 0])  # the last one is confidently wrong
    margin = kl_certify(counts, labels, 0.0).margin_lower.numpy()
    assert margin[0] > margin[1] > 0 > margin[2]
    u_kl = np.stack([0.5 * margin[:2] ** 2 * 0.99, 0.5 * margin[:2] ** 2 * 1.01])  # [2, 2]
    result = kl_certify(counts[:2], labels[:2], u_kl)
    np.testing.assert_array_equal(result.certified.numpy(), [[True, True], [False, False]])
    np.testing.assert_array_equal(result.certified.numpy(),
                                  result.margin_lower.numpy() > np.sqrt(2 * u_kl))
    delta = result.delta.numpy()
    assert np.all(delta[0] > 0) and np.all(delta[1] < 0)
    # The paper's sign (U_KL − ½ margin² > 0) would certify the wrong row; we do not.
    wrong = kl_certify(counts[2:], labels[2:], 0.01)
    assert not wrong.certified.numpy()[0]
    assert wrong.probability_bound.numpy()[0] == 0.0


def test_eps_grid_broadcasting_and_monotonicity():
    counts = np.array([[990, 10], [900, 100], [700, 300]])
    labels = np.zeros(3, int)
    u_kl = np.array([0.0, 0.01, 0.1, 0.3])[:, None] * np.ones(3)
    result = kl_certify(counts, labels, u_kl)
    assert result.certified.shape == (4, 3) and result.margin_lower.shape == (4, 3)
    certified = result.certified.numpy().astype(int)
    assert np.all(np.diff(certified, axis=0) <= 0)  # larger ε, larger U_KL: never gains
    assert np.all(np.diff(result.probability_bound.numpy(), axis=0) <= 1e-15)


def test_probability_bounds_formulas_and_soundness_for_two_classes():
    counts = np.array([[2000, 0], [1800, 200], [1300, 700]])
    labels = np.array([0, 0, 0])
    u_kl = np.array([0.02, 0.05, 0.005])
    result = kl_certify(counts, labels, u_kl, num_votes=30)
    margin = result.margin_lower.numpy()
    gap = margin - np.sqrt(2 * u_kl)
    np.testing.assert_allclose(result.probability_bound.numpy(), 1 - np.exp(-30 * gap ** 2 / 2))
    delta = 0.5 * margin ** 2 - u_kl
    np.testing.assert_allclose(result.paper_probability_bound.numpy(),
                               np.maximum(1 - 2 * np.exp(-2 * 30 * delta ** 2), 0))
    # Worst case allowed by Pinsker: the perturbed margin is exactly `gap`.  The exact
    # probability that y wins a strict majority of 30 votes is at least our bound.
    p_y = (1 + gap) / 2
    exact = sps.binom.sf(15, 30, p_y)
    assert np.all(result.probability_bound.numpy() <= exact)
    # Where margin + sqrt(2 U) <= 1 the paper's bound is valid and never larger than ours.
    assert np.all(result.certified.numpy())
    valid = margin + np.sqrt(2 * u_kl) <= 1
    assert valid.any() and not valid.all()
    assert np.all(result.paper_probability_bound.numpy()[valid]
                  <= result.probability_bound.numpy()[valid])


def test_failure_probability_adds_the_level_of_the_kl_bound():
    counts, labels = np.array([[950, 50], [700, 300]]), np.array([0, 0])
    x = _images([2, 4, 4, 1], seed=8)
    sampled = randdisc_kl_bound(x, [0.001, 0.01], 2, 0.15, 0.15, num_center_samples=50,
                                kl_alpha=0.002, seed=0)
    fixed = randdisc_kl_bound(x, [0.001, 0.01], 2, 0.15, 0.15, fixed_centers=[[0.2], [0.8]])
    certificate = kl_certify(counts, labels, sampled, alpha=0.001)
    assert certificate.failure_probability == pytest.approx(0.003, rel=1e-12)  # float α + α′
    assert certificate.rigorous
    np.testing.assert_array_equal(certificate.certified.numpy(),
                                  kl_certify(counts, labels, sampled.value).certified.numpy())
    assert kl_certify(counts, labels, fixed, alpha=0.001).failure_probability == 0.001
    assert kl_certify(counts, labels, 0.01, alpha=0.001).failure_probability == 0.001
