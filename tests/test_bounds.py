"""Tests of tfcert.bounds: Rényi (STN Theorem 2), Cohen and PixelDP radii, Gaussian KL bound."""

import mpmath
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import tensorflow as tf

from tfcert import bounds, stats

RADII = [bounds.renyi_radius, bounds.cohen_radius, bounds.pixeldp_radius]

# SPEC §4.3 reference values (σ = 1).
RENYI_REFERENCE = {(0.9, 0.1): 1.031930, (0.99, 0.01): 1.908009, (0.9, 0.05): 1.249374,
                   (0.5, 0.3): 0.227001, (0.97, 0.0): 2.648228}


def reference_exponent(alpha, p1, p2):
    """STN Theorem 2 exponent −(1/α) log(1 − p1 − p2 + 2 M_{1−α}), direct power formula."""
    beta = 1.0 - alpha
    with np.errstate(over="ignore", divide="ignore"):
        mean = ((p1 ** beta + p2 ** beta) / 2.0) ** (1.0 / beta)
    return -np.log(1.0 - p1 - p2 + 2.0 * mean) / alpha


REFERENCE_ALPHAS = 1.0 + np.geomspace(1e-3, 50.0, 3000)


def reference_renyi(p1, p2):
    """Independent brute force: fine α grid, scipy refinement, and the α → 1 limit."""
    values = reference_exponent(REFERENCE_ALPHAS, p1, p2)
    best = int(np.argmax(values))
    bracket = (REFERENCE_ALPHAS[max(best - 1, 0)],
               REFERENCE_ALPHAS[min(best + 1, len(REFERENCE_ALPHAS) - 1)])
    refined = scipy.optimize.minimize_scalar(
        lambda a: -reference_exponent(a, p1, p2), bounds=bracket, method="bounded",
        options={"xatol": 1e-12})
    limit = -np.log(1.0 - (np.sqrt(p1) - np.sqrt(p2)) ** 2)  # M_0 = geometric mean
    return np.sqrt(2.0 * max(values[best], -refined.fun, limit))


def simplex_grid(step=0.01, min_sum=0.0):
    """(p1, p2) with 1 > p1 > p2 >= 0 and min_sum <= p1 + p2 <= 1 on a regular grid."""
    g = np.round(np.arange(0.0, 1.0 + step / 2, step), 12)
    p1, p2 = (v.ravel() for v in np.meshgrid(g, g, indexing="ij"))
    keep = (p1 < 1.0) & (p1 > p2) & (p1 + p2 <= 1.0 + 1e-12) & (p1 + p2 >= min_sum)
    return p1[keep], p2[keep]


def test_renyi_reference_values():
    p1, p2 = np.array(list(RENYI_REFERENCE)).T
    np.testing.assert_allclose(bounds.renyi_radius(p1, p2, 1.0),
                               list(RENYI_REFERENCE.values()), rtol=1e-6)


def test_renyi_matches_brute_force_optimiser():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.05, 1.0, 300)
    p2 = rng.uniform(size=300) * np.minimum(p1, 1.0 - p1)
    keep = p1 - p2 > 0.01  # away from ties, where the direct formula loses precision
    p1, p2 = p1[keep], p2[keep]
    expected = [reference_renyi(a, b) for a, b in zip(p1, p2)]
    np.testing.assert_allclose(bounds.renyi_radius(p1, p2, 1.0), expected, rtol=1e-6)


# 110 digits: the reference evaluates 1 − D with D down to ~1e-60 and raises to powers
# 1/(α − 1) up to e^45, which cost ~60 and ~20 digits; > 25 correct digits remain.
MP_DIGITS = 110


def mp_exponent(gamma, p1, p2):
    """STN Theorem 2 exponent −(1/α) log(1 − p1 − p2 + 2 M_{1−α}) at α = 1 + gamma, in
    MP_DIGITS-digit arithmetic, for the exact values of the float64 inputs."""
    with mpmath.workdps(MP_DIGITS):
        p1, p2, gamma = mpmath.mpf(p1), mpmath.mpf(p2), mpmath.mpf(gamma)
        mean = 0 if p2 == 0 else ((p1 ** -gamma + p2 ** -gamma) / 2) ** (-1 / gamma)
        return -mpmath.log(1 - p1 - p2 + 2 * mean) / (1 + gamma)


def mp_renyi(p1, p2):
    """sup over α > 1 of the radius at σ = 1 in MP_DIGITS digits: grid in t = log(α − 1)
    over [−45, 12] (wider than renyi_radius' [−40, 10]), 90 golden-section steps (the
    bracket shrinks to < 1e-19 in t, i.e. ~1e-38 in the flat objective) and the α → 1
    limit −log(1 − (√p1 − √p2)²)."""
    with mpmath.workdps(MP_DIGITS):
        def f(t):
            return mp_exponent(mpmath.exp(t), p1, p2)

        grid = [mpmath.mpf(t) for t in np.linspace(-45.0, 12.0, 200)]
        values = [f(t) for t in grid]
        best = max(range(len(grid)), key=lambda i: values[i])
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        ratio = (mpmath.sqrt(5) - 1) / 2
        c, d = high - ratio * (high - low), low + ratio * (high - low)
        fc, fd = f(c), f(d)
        for _ in range(90):
            if fc > fd:
                high, d, fd = d, c, fc
                c = high - ratio * (high - low)
                fc = f(c)
            else:
                low, c, fc = c, d, fd
                d = low + ratio * (high - low)
                fd = f(d)
        limit = -mpmath.log(1 - (mpmath.sqrt(mpmath.mpf(p1)) - mpmath.sqrt(mpmath.mpf(p2))) ** 2)
        return mpmath.sqrt(2 * max(values[best], fc, fd, limit))


# Near-ties (issue 11 item 5: 1.05e-8 returned for a true 2.0e-9 at (0.5 + 1e-9, 0.5 − 1e-9);
# relative error 1.8e-7 at (0.2, 0.19999)), tiny p2, p1 near 1, tiny p1 + p2.
RENYI_HARD_CASES = [(0.5, 0.5 - 1e-9), (0.5 + 1e-9, 0.5 - 1e-9), (0.2, 0.19999),
                    (0.2, 0.2 - 1e-7), (0.3, 0.3 - 1e-12), (0.45, 0.45 - 1e-15),
                    (0.01, 0.0099), (1e-5, 0.99e-5), (0.7, 0.3 - 1e-8), (0.999999, 1e-7),
                    (0.999999999, 0.0), (0.5, 1e-300), (0.5, 1e-20), (1e-12, 5e-13)]

# Documented relative error of renyi_radius below the exact supremum: the 2^-40 rounding
# down of the exponent is 4.5e-13 on the radius; the search itself converges far below.
RENYI_RTOL = 1e-12


def test_renyi_radius_never_above_mpmath_and_within_documented_error():
    points = list(RENYI_REFERENCE) + RENYI_HARD_CASES
    p1, p2 = np.array(points).T
    got = bounds.renyi_radius(p1, p2, 1.0).numpy()
    for (a, b), radius in zip(points, got):
        exact = mp_renyi(a, b)
        # Sound with no slack: mpmath's supremum is converged to ~1e-38 relative.
        assert mpmath.mpf(radius) <= exact, (a, b, radius, exact)
        assert mpmath.mpf(radius) >= exact * (1 - RENYI_RTOL), (a, b, radius, exact)


def test_renyi_exponent_rounding_error_is_covered_by_the_margin():
    """Each evaluation of the exponent must be within its error analysis (50 ulp ≈
    1.1e-14, bounds._RENYI_ROUNDING's comment), 80x below the rounding-down margin."""
    rng = np.random.default_rng(4)
    size = 300
    p1 = rng.uniform(0.0, 1.0, size)
    p2 = rng.uniform(size=size) * np.minimum(p1, 1.0 - p1)
    tie = np.arange(size) % 3 == 1  # relative gaps 1e-15 .. 1e-2
    p2 = np.where(tie, p1 * (1.0 - np.exp(rng.uniform(np.log(1e-15), np.log(1e-2), size))), p2)
    p2 = np.where(np.arange(size) % 3 == 2, np.exp(rng.uniform(-700.0, -5.0, size)), p2)
    t = rng.uniform(bounds._T_MIN, bounds._T_MAX, size)
    p1c, p2c = (v.numpy() for v in bounds._probabilities(p1, p2)[:2])
    got = bounds._renyi_exponent(tf.constant(t), bounds._renyi_terms(p1c, p2c)).numpy()
    gamma = tf.exp(tf.constant(t)).numpy()  # α − 1 exactly as the float64 code evaluated it
    for a, b, g, value in zip(p1c, p2c, gamma, got):
        exact = mp_exponent(g, a, b)
        assert abs(mpmath.mpf(value) - exact) <= 1.1e-14 * abs(exact), (a, b, g)
    assert 1.1e-14 * 80 <= bounds._RENYI_ROUNDING


def test_cohen_radius_never_above_mpmath():
    """Near ties Φ⁻¹(p1) − Φ⁻¹(p2) cancels (the plain float64 difference overshot by up to
    6.5e-16 σ, 11% of such a radius): the radius must stay at or below the exact value."""
    rng = np.random.default_rng(6)
    p1 = rng.uniform(0.01, 0.999, 300)
    p2 = rng.uniform(size=300) * np.minimum(p1, 1.0 - p1)
    tie = np.arange(300) % 2 == 1  # relative gaps 1e-15 .. 1e-2
    p2 = np.where(tie, p1 * (1.0 - np.exp(rng.uniform(np.log(1e-15), np.log(1e-2), 300))), p2)
    got = bounds.cohen_radius(p1, p2, 1.0).numpy()
    p1c, p2c = (v.numpy() for v in bounds._probabilities(p1, p2)[:2])
    with mpmath.workdps(50):
        exact = [(mpmath.erfinv(2 * mpmath.mpf(a) - 1) - mpmath.erfinv(2 * mpmath.mpf(b) - 1))
                 / mpmath.sqrt(2) for a, b in zip(p1c, p2c)]
    assert all(mpmath.mpf(g) <= e for g, e in zip(got, exact))
    # The rounding-down is 2^-46 (|Φ⁻¹(p1)| + |Φ⁻¹(p2)|) <= 2^-46 · 6.2 ≈ 9e-14 here.
    np.testing.assert_allclose(got, np.array(exact, np.float64), rtol=0, atol=1e-13)


def test_pixeldp_uses_only_pairs_the_exact_condition_accepts():
    """p1 within 4e-16 (relative) of the threshold e^{2ε} p2 + (1 + e^ε) δ of a grid pair:
    the float64 condition must not accept a pair that exact arithmetic rejects."""
    eps_grid, delta_grid = np.array([0.1, 0.5, 1.0]), np.array([1e-6, 1e-3, 0.05])
    rng = np.random.default_rng(8)
    e = rng.choice(eps_grid, 120)
    d = rng.choice(delta_grid, 120)
    p2 = rng.uniform(0.0, 0.08, 120)
    threshold = np.exp(2 * e) * p2 + (1 + np.exp(e)) * d
    p1 = threshold * (1 + rng.uniform(-4e-16, 4e-16, 120))
    got = bounds.pixeldp_radius(p1, p2, 1.0, eps_grid=eps_grid, delta_grid=delta_grid).numpy()
    with mpmath.workdps(40):
        pairs = [(mpmath.mpf(ee), mpmath.mpf(dd)) for ee in eps_grid for dd in delta_grid]
        for a, b, radius in zip(p1, p2, got):
            a, b = mpmath.mpf(a), min(mpmath.mpf(b), 1 - mpmath.mpf(a))  # the cap p2 <= 1 - p1
            exact = max([ee / mpmath.sqrt(2 * mpmath.log(mpmath.mpf(1.25) / dd))
                         for ee, dd in pairs
                         if a > mpmath.exp(2 * ee) * b + (1 + mpmath.exp(ee)) * dd], default=0)
            assert mpmath.mpf(radius) <= exact, (a, b, radius, exact)


def test_renyi_objective_is_unimodal_in_alpha():
    """The refined-grid search relies on a single maximum over α > 1."""
    p1, p2 = simplex_grid(0.05)
    for a, b in zip(p1, p2):
        values = reference_exponent(REFERENCE_ALPHAS, a, b)
        steps = np.diff(values)
        signs = np.sign(steps[np.abs(steps) > 1e-12 * np.abs(values).max()])
        assert np.count_nonzero(signs[1:] != signs[:-1]) <= 1, (a, b)


def test_renyi_p2_zero_is_the_alpha_to_one_limit():
    p1 = np.array([0.2, 0.5, 0.97, 0.999999])
    np.testing.assert_allclose(bounds.renyi_radius(p1, 0.0, 0.5),
                               np.sqrt(-2.0 * 0.25 * np.log(1.0 - p1)), rtol=1e-9)


def test_radii_monotone_in_p1_and_p2():
    grid = np.linspace(0.0, 1.0, 101)
    for radius in RADII:
        for fixed in (0.0, 0.05, 0.2, 0.4):
            p1 = grid[grid + fixed <= 1.0]
            r = radius(p1, fixed, 1.0).numpy()
            assert np.all(np.diff(r) >= -1e-12), radius.__name__   # increasing in p1
            p2 = grid[grid <= 1.0 - (fixed + 0.5)]
            r = radius(fixed + 0.5, p2, 1.0).numpy()
            assert np.all(np.diff(r) <= 1e-12), radius.__name__    # decreasing in p2
    p1 = np.linspace(0.3, 0.99, 70)
    assert np.all(np.diff(bounds.renyi_radius(p1, 0.1, 1.0).numpy()) > 0)
    assert np.all(np.diff(bounds.renyi_radius(0.6, np.linspace(0, 0.4, 41), 1.0).numpy()) < 0)


def test_radii_scale_with_sigma_and_broadcast():
    sigma = np.array([[0.12], [0.25], [1.0]])
    p1, p2 = np.array([0.9, 0.8, 0.6]), np.array([0.05, 0.1, 0.3])
    for radius in RADII:
        r = radius(p1, p2, sigma)
        assert r.shape == (3, 3) and r.dtype == tf.float64
        np.testing.assert_allclose(r, sigma * radius(p1, p2, 1.0).numpy(), rtol=1e-12)


def test_cohen_closed_form():
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0.3, 0.999, 500)
    p2 = rng.uniform(size=500) * np.minimum(p1, 1.0 - p1)
    sigma = 0.25
    expected = sigma / 2 * (scipy.stats.norm.ppf(p1) - scipy.stats.norm.ppf(p2))
    np.testing.assert_allclose(bounds.cohen_radius(p1, p2, sigma), expected, rtol=1e-9)
    p1 = np.linspace(0.51, 0.9999, 50)
    np.testing.assert_allclose(bounds.cohen_radius(p1, 1.0 - p1, sigma),
                               sigma * scipy.stats.norm.ppf(p1), rtol=1e-9)


def test_cohen_is_tighter_than_renyi():
    np.testing.assert_allclose(bounds.cohen_radius(0.9, 0.1, 1.0), 1.281552, rtol=1e-6)
    assert bounds.cohen_radius(0.9, 0.1, 1.0) > bounds.renyi_radius(0.9, 0.1, 1.0)
    p1, p2 = simplex_grid(0.02)
    assert np.all(bounds.cohen_radius(p1, p2, 1.0) >= bounds.renyi_radius(p1, p2, 1.0))


def test_pixeldp_below_renyi_over_stn_simplex():
    """STN Fig. 4 over its region p1 >= p2 >= 0, 0.2 <= p1 + p2 <= 1: Rényi is higher."""
    p1, p2 = simplex_grid(0.01, min_sum=0.2)
    renyi = bounds.renyi_radius(p1, p2, 1.0).numpy()
    pixeldp = bounds.pixeldp_radius(p1, p2, 1.0).numpy()
    assert np.all(renyi > pixeldp)
    assert np.all(renyi[pixeldp > 0] / pixeldp[pixeldp > 0] > 1.2)
    assert np.count_nonzero(pixeldp) > 0.99 * len(p1)


def test_pixeldp_is_the_exact_grid_maximum():
    eps = np.linspace(0.05, 1.0, 20)
    delta = np.geomspace(1e-8, 0.4, 30)
    rng = np.random.default_rng(2)
    p1 = rng.uniform(0.2, 1.0, 50)
    p2 = rng.uniform(size=50) * np.minimum(p1, 1.0 - p1)
    e, d = eps[:, None], delta[None, :]
    expected = [np.max(np.where(a > np.exp(2 * e) * b + (1 + np.exp(e)) * d,
                                e / np.sqrt(2 * np.log(1.25 / d)), 0.0))
                for a, b in zip(p1, p2)]
    got = bounds.pixeldp_radius(p1, p2, 1.0, eps_grid=eps, delta_grid=delta)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_pixeldp_single_pair_condition_keeps_the_delta_term():
    eps, delta = 0.5, 0.05
    threshold = np.exp(2 * eps) * 0.1 + (1 + np.exp(eps)) * delta  # SPEC correction
    radius = eps / np.sqrt(2 * np.log(1.25 / delta))
    got = bounds.pixeldp_radius([threshold + 1e-9, threshold - 1e-9], 0.1, 2.0,
                                eps_grid=[eps], delta_grid=[delta])
    np.testing.assert_allclose(got, [2.0 * radius, 0.0], rtol=1e-12)


@pytest.mark.parametrize("radius", RADII)
def test_empty_certificates_and_edge_cases(radius):
    p1 = np.array([0.5, 0.3, 0.0, 0.0, 0.4, 1.0, 1.0, 1e-300, 0.7])
    p2 = np.array([0.5, 0.6, 0.0, 1.0, 0.4, 0.0, 1e-3, 0.0, 0.3])
    r = radius(p1, p2, 1.0).numpy()
    assert np.all(np.isfinite(r)) and np.all(r >= 0)
    np.testing.assert_array_equal(r[:5], 0.0)  # p1 <= p2: abstain
    assert np.all(r[5:7] > 0) and np.all(r[5:7] < 9.0)  # p1 = 1 is clipped: finite


@pytest.mark.parametrize("radius", RADII)
def test_inconsistent_p2_is_capped_at_one_minus_p1(radius):
    np.testing.assert_allclose(radius(0.6, 0.5, 1.0), radius(0.6, 0.4, 1.0), rtol=1e-12)


@pytest.mark.parametrize("radius", RADII)
def test_radii_from_tiny_sample_counts(radius):
    counts = np.array([[1, 0], [2, 0], [3, 1], [1, 1], [0, 0]])
    p1, p2, _ = stats.simultaneous_bounds(counts, 0.05)
    r = radius(p1, p2, 0.5).numpy()
    assert np.all(np.isfinite(r))
    np.testing.assert_array_equal(r, 0.0)  # too few samples for any certificate


@pytest.mark.parametrize("radius", RADII)
def test_radii_in_tf_function_with_unknown_batch(radius):
    spec = tf.TensorSpec([None], tf.float64)

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([], tf.float64)])
    def graph_radius(p1, p2, sigma):
        return radius(p1, p2, sigma)

    p1, p2 = simplex_grid(0.05)
    np.testing.assert_allclose(graph_radius(p1, p2, 0.7), radius(p1, p2, 0.7), rtol=1e-12)
    np.testing.assert_allclose(graph_radius(p1[:3], p2[:3], 0.7), radius(p1[:3], p2[:3], 0.7))


@pytest.mark.parametrize("radius", RADII)
def test_accepts_floats_arrays_and_tensors(radius):
    expected = radius(np.array(0.9), np.array(0.05), np.array(0.5))
    for args in [(0.9, 0.05, 0.5), (tf.constant(0.9, tf.float64), 0.05, tf.constant(0.5)),
                 ([0.9], np.float32(0.05), 0.5)]:
        got = radius(*args)
        assert isinstance(got, tf.Tensor) and got.dtype == tf.float64
        np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6)


@pytest.mark.parametrize("radius", RADII)
def test_ten_thousand_radii(radius):
    rng = np.random.default_rng(3)
    p1 = rng.uniform(size=10_000)
    p2 = rng.uniform(size=10_000) * (1.0 - p1)
    r = radius(p1, p2, 0.25).numpy()
    assert r.shape == (10_000,) and np.all(np.isfinite(r)) and np.all(r >= 0)
    assert np.all(p1[r > 0] > p2[r > 0])
    assert np.all(r[p1 <= p2] == 0)


def test_gaussian_kl_bound_closed_form():
    np.testing.assert_allclose(bounds.gaussian_kl_bound(0.1, 28 * 28, 1, 0.15),
                               784 * 0.01 / (2 * 0.0225), rtol=1e-14)
    eps = np.array([0.0, 8 / 255, 16 / 255])
    got = bounds.gaussian_kl_bound(eps, 224 * 224, 3, tf.constant(32 / 255))
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got, 224 * 224 * 3 * eps ** 2 / (2 * (32 / 255) ** 2),
                               rtol=1e-6)  # σ passed as a float32 tensor


def test_average_certified_radius_counts_only_correct_certificates():
    from tfcert.analysis import average_certified_radius, certified_accuracy

    radius = np.array([0.5, 1.0, 0.0, 2.0])
    correct = np.array([True, True, False, False])  # the last is certified but wrong
    assert average_certified_radius(radius, correct) == pytest.approx((0.5 + 1.0) / 4)
    # ACR is the area under the certified-accuracy curve: ∫_0^∞ acc(r) dr.
    grid = np.linspace(0, 3, 30001)
    area = np.sum(certified_accuracy(radius, correct, grid)[:-1]) * (grid[1] - grid[0])
    assert area == pytest.approx(average_certified_radius(radius, correct), abs=1e-4)  # grid step
    assert average_certified_radius(np.array([]), np.array([], bool)) == 0.0


@pytest.mark.parametrize("sigma", [0.0, -0.5, float("nan"), float("inf")])
def test_a_noise_sigma_that_is_not_positive_and_finite_is_refused(sigma):
    """Issue: σ <= 0 gave negative (and NaN σ NaN) radii for a "certified" prediction."""
    for radius in (bounds.renyi_radius, bounds.cohen_radius, bounds.pixeldp_radius):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            radius(0.9, 0.1, sigma)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        bounds.gaussian_kl_bound(0.1, 784, 1, sigma)
