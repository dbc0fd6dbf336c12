"""Tests of tfcert.stats: Clopper-Pearson bounds (TFP and core-TF) and simultaneous bounds."""

from fractions import Fraction

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf

from tfcert import stats

CP_FUNCTIONS = [stats.clopper_pearson, stats.clopper_pearson_graph]


def exact_lower_quantile(alpha, a, b):
    """x with I_x(a, b) = alpha in float64: scipy.stats.beta.ppf (Boost), polished by two
    Newton steps on scipy.special.betainc (1e-13-accurate: ppf alone stops early, 2.4e-12
    low at a = 1000, b = 1e7 - 999, alpha = 1e-3).  Checked against 50-digit mpmath
    binomial tails on the whole soundness_grid: off by at most 1.3e-16 in x."""
    x = scipy.stats.beta.ppf(alpha, a, b)
    for _ in range(2):
        pdf = scipy.stats.beta.pdf(x, a, b)
        step = np.divide(scipy.special.betainc(a, b, x) - alpha, pdf,
                         out=np.zeros_like(x), where=pdf > 0)
        x = np.clip(x - step, 0.0, 1.0)
    return x


def scipy_clopper_pearson(k, n, alpha):
    """Exact one-sided bounds: lower = Q_alpha(k, n-k+1), upper = 1 - Q_alpha(n-k, k+1)
    (not ppf(1 - alpha), which rounds the level), Q = exact_lower_quantile."""
    k, n, alpha = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (k, n, alpha)))
    lower = np.where(k > 0, exact_lower_quantile(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    upper = np.where(k < n, 1.0 - exact_lower_quantile(alpha, np.maximum(n - k, 1), k + 1),
                     1.0)
    return lower, upper


# Soundness slack against scipy_clopper_pearson: the issue's 1e-12, far above the
# reference's own error (1.3e-16 in x, plus 1.1e-16 for rounding 1 - x).
SOUND_ATOL = 1e-12
# Tightness: the level margin of tfcert.stats (module docstring) moves a bound by
# ≈ η·I/pdf, at most 2.2e-10 on this grid (n = 1e7, alpha = 0.25); 1e-9 leaves 4x room.
TIGHT_ATOL = 1e-9
GRID_N = [1, 2, 10, 100, 10_000, 1_000_000, 10_000_000]
GRID_ALPHA = [0.25, 0.05, 1e-3, 1e-6, 1e-9, 1e-12]


def soundness_grid():
    """Flat (k, n, alpha) over GRID_N x GRID_ALPHA, k in {0, 1, 2, 1000, n/3, n/2, n-2,
    n-1, n}: the edges and the interior; for n = 1e7 also four k where the bisection on
    tf.math.betainc without a margin overshot by 1.7e-12 to 3.3e-12 (alpha = 0.25, 0.05)."""
    extra = {10_000_000: {747_915, 860_931, 999_027, 3_251_118}}
    rows = [(k, n, a) for n in GRID_N for a in GRID_ALPHA
            for k in sorted({0, 1, 2, 1000, n // 3, n // 2, n - 2, n - 1, n} | extra.get(n, set()))
            if 0 <= k <= n]
    k, n, alpha = (np.array(v) for v in zip(*rows))
    return k.astype(np.int64), n.astype(np.int64), alpha.astype(np.float64)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
@pytest.mark.parametrize("n", [1, 2, 7, 100, 10_000, 1_000_000])
@pytest.mark.parametrize("alpha", [0.05, 1e-3, 1e-6])
def test_clopper_pearson_matches_scipy(cp, n, alpha):
    rng = np.random.default_rng(n)
    k = np.concatenate([[0, 1, n - 1, n], rng.integers(0, n + 1, 200)])
    lower, upper = cp(k, n, alpha)
    ref_lower, ref_upper = scipy_clopper_pearson(k, n, alpha)
    assert lower.dtype == tf.float64 and upper.dtype == tf.float64
    np.testing.assert_allclose(lower, ref_lower, rtol=0, atol=1e-10)
    np.testing.assert_allclose(upper, ref_upper, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
def test_clopper_pearson_edge_cases_closed_form(cp):
    n, alpha = np.array([1, 5, 1000]), 0.01
    lower0, upper0 = cp(np.zeros(3, np.int64), n, alpha)
    lower_n, upper_n = cp(n, n, alpha)
    np.testing.assert_array_equal(lower0, 0.0)
    np.testing.assert_array_equal(upper_n, 1.0)
    np.testing.assert_allclose(upper0, 1.0 - alpha ** (1.0 / n), rtol=1e-9)  # Beta(1, n)
    np.testing.assert_allclose(lower_n, alpha ** (1.0 / n), rtol=1e-9)  # Beta(n, 1)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
def test_clopper_pearson_never_on_the_unsafe_side_of_scipy(cp):
    """Issue 11 items 2-3: lower <= exact + 1e-12 and upper >= exact - 1e-12 down to
    alpha = 1e-12 and up to n = 1e7 (TFP's betaincinv was off by 0.06; the bisection's
    upper bound, computed at 1 - alpha, by 2e-7)."""
    k, n, alpha = soundness_grid()
    lower, upper = (b.numpy() for b in cp(k, n, alpha))
    ref_lower, ref_upper = scipy_clopper_pearson(k, n, alpha)
    assert np.all(lower <= ref_lower + SOUND_ATOL), np.max(lower - ref_lower)
    assert np.all(upper >= ref_upper - SOUND_ATOL), np.max(ref_upper - upper)
    np.testing.assert_allclose(lower, ref_lower, rtol=0, atol=TIGHT_ATOL)
    np.testing.assert_allclose(upper, ref_upper, rtol=0, atol=TIGHT_ATOL)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
def test_issue_11_examples(cp):
    # Exact values from closed forms, solved with 40-digit mpmath: lower(n, n) = alpha^(1/n);
    # upper(1, 100) = 1 - x with I_x(99, 2) = 100 x^99 - 99 x^100 = alpha.  (The issue's
    # 0.21387 came from ppf(1 - alpha), itself 2.3e-10 off.)  Tightness 1e-11: the level
    # margin moves these by < 1e-13.
    lower, _ = cp([319], 319, 1e-7)  # betaincinv gave 0.96273
    assert 0.95072831036883278 - 1e-11 < lower.numpy()[0] <= 0.95072831036883278
    _, upper = cp([1], 100, 1e-9)  # betaincinv gave 0.15642
    assert 0.21386563305564211 <= upper.numpy()[0] < 0.21386563305564211 + 1e-11


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
@pytest.mark.parametrize("alpha", [1e-6, 1e-12])
def test_edge_bounds_exact_at_small_alpha(cp, alpha):
    """Closed forms Beta(1, n) and Beta(n, 1): upper(0) = 1 - alpha^(1/n) and
    lower(n) = alpha^(1/n), computed with expm1/exp of log(alpha)/n (relative error
    below 4 ulp ≈ 1e-15, hence the 1e-15 slack on the sound side)."""
    n = np.array([1, 2, 10, 1000, 10**6])
    _, upper0 = cp(np.zeros(len(n), np.int64), n, alpha)
    lower_n, _ = cp(n, n, alpha)
    exact_upper0 = -np.expm1(np.log(alpha) / n)
    exact_lower_n = np.exp(np.log(alpha) / n)
    assert np.all(upper0.numpy() >= exact_upper0 * (1 - 1e-15))
    assert np.all(lower_n.numpy() <= exact_lower_n * (1 + 1e-15))
    # The level margin η = 2^-43 (n + 1) (up to 1.5 η with TFP's check window) moves
    # x = alpha^(1/n) by η·I/pdf = η·x/n <= 1.5 · 2^-43 · 2 ≈ 3.4e-13.
    np.testing.assert_allclose(upper0, exact_upper0, rtol=0, atol=3.5e-13)
    np.testing.assert_allclose(lower_n, exact_lower_n, rtol=0, atol=3.5e-13)


def test_simultaneous_bounds_never_on_the_unsafe_side_of_scipy():
    """simultaneous_bounds (level alpha/(2k) per side) on the soundness grid, as two-class
    counts [k, n - k]."""
    k, n, alpha = soundness_grid()
    counts = np.stack([k, n - k], axis=1)
    p1_lower, p2_upper, top = (v.numpy()
                               for v in stats.simultaneous_bounds(counts, alpha[:, None]))
    rows = np.arange(len(k))
    lower, upper = scipy_clopper_pearson(counts, n[:, None], alpha[:, None] / 4.0)
    ref_p1 = lower[rows, top]
    ref_p2 = np.minimum(upper[rows, 1 - top], 1.0 - ref_p1)
    assert np.all(p1_lower <= ref_p1 + SOUND_ATOL), np.max(p1_lower - ref_p1)
    assert np.all(p2_upper >= ref_p2 - SOUND_ATOL), np.max(ref_p2 - p2_upper)
    np.testing.assert_allclose(p1_lower, ref_p1, atol=TIGHT_ATOL)
    np.testing.assert_allclose(p2_upper, ref_p2, atol=TIGHT_ATOL)


def test_cohen_split_bounds_never_on_the_unsafe_side_of_scipy():
    """cohen_split_bounds (one lower bound at level alpha) on the soundness grid."""
    k, n, alpha = soundness_grid()
    counts = np.stack([k, n - k], axis=1)
    c1_lower, c2_upper = (v.numpy() for v in stats.cohen_split_bounds(counts, np.zeros_like(k),
                                                                        alpha))
    ref_c1, _ = scipy_clopper_pearson(k, n, alpha)
    assert np.all(c1_lower <= ref_c1 + SOUND_ATOL), np.max(c1_lower - ref_c1)
    assert np.all(c2_upper >= 1.0 - ref_c1 - SOUND_ATOL)
    np.testing.assert_allclose(c1_lower, ref_c1, atol=TIGHT_ATOL)


def test_betainc_error_model_holds():
    """The margin of tfcert.stats assumes |betainc - I| <= BETAINC_RELATIVE_ERROR (a + b) I
    for I <= CENTRE_LEVEL; check it for the installed TensorFlow on random tails, a + b up
    to 1e7 (scipy's betainc, Boost, is the reference: 1e-13-accurate there, far below the
    bound of >= 2.3e-13 (a + b))."""
    rng = np.random.default_rng(11)
    size = np.floor(np.exp(rng.uniform(0.0, np.log(1e7), 4000)))
    a = np.maximum(np.floor(rng.uniform(size=size.size) * size), 1.0)
    b = size - a + 1.0
    level = np.exp(rng.uniform(np.log(1e-13), np.log(stats.CENTRE_LEVEL), size.size))
    x = scipy.stats.beta.ppf(level, a, b)
    keep = (x > 0) & (x < 1)
    a, b, x = a[keep], b[keep], x[keep]
    exact = scipy.special.betainc(a, b, x)
    got = tf.math.betainc(tf.constant(a), tf.constant(b), tf.constant(x)).numpy()
    assert np.all(np.abs(got - exact) <= stats.BETAINC_RELATIVE_ERROR * (a + b) * exact)


def test_large_n_levels_are_capped_and_huge_n_refused():
    """Near the centre (CDF ≈ 1/2) tf.math.betainc is off by 3e-3 at n = 1e7: levels above
    1/4 are evaluated at 1/4 there (sound, looser), and n > MAX_TRIALS is refused."""
    n, k = 10**7, 5 * 10**6
    for cp in CP_FUNCTIONS:
        lower, upper = cp([k], n, 0.5)
        ref_lower, ref_upper = scipy_clopper_pearson(k, n, stats.CENTRE_LEVEL)
        np.testing.assert_allclose(lower, [ref_lower], atol=TIGHT_ATOL)
        np.testing.assert_allclose(upper, [ref_upper], atol=TIGHT_ATOL)
        with pytest.raises(tf.errors.InvalidArgumentError, match="MAX_TRIALS"):
            cp([1], stats.MAX_TRIALS + 1, 0.05)


def test_complement_up_never_rounds_down():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(size=2000), np.exp(rng.uniform(-700, 0, 2000)),
                        [0.0, 1.0, 0.5, 2.0 ** -54, 1.0 - 2.0 ** -53]])
    u = stats.complement_up(x).numpy()
    exact = [1 - Fraction(v) for v in x]
    assert all(Fraction(a) >= e for a, e in zip(u, exact))
    # ... and is the nearest float at or above 1 - x (spacing 2^-53 on [1/2, 1]).
    assert all(Fraction(a) - e < Fraction(2) ** -53 for a, e in zip(u, exact))


def test_graph_twin_agrees_with_tfp():
    k = np.arange(0, 201)
    lower, upper = stats.clopper_pearson(k, 200, 1e-4)
    lower_g, upper_g = stats.clopper_pearson_graph(k, 200, 1e-4)
    np.testing.assert_allclose(lower_g, lower, atol=1e-12)
    np.testing.assert_allclose(upper_g, upper, atol=1e-12)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
def test_clopper_pearson_broadcasts_and_accepts_tensors(cp):
    """counts and n broadcast as numpy does; a vector α is one level per image (the
    leading axis, docs/SOUNDNESS.md §2), not broadcast along the last axis."""
    counts = tf.constant([[3], [9]], tf.int32)
    n = tf.constant([10, 20, 30], tf.int64)
    alpha = np.array([0.1, 0.001])
    lower, upper = cp(counts, n, alpha)
    assert lower.shape == (2, 3) and upper.shape == (2, 3)
    ref_lower, ref_upper = scipy_clopper_pearson(np.array([[3], [9]]), np.array([10, 20, 30]),
                                                 alpha[:, None])
    np.testing.assert_allclose(lower, ref_lower, atol=1e-10)
    np.testing.assert_allclose(upper, ref_upper, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_narrow_count_dtypes_do_not_wrap_around(dtype):
    """Issue: uint8 / int16 counts were summed and compared in their own dtype, so n = 300
    became 44 (and 70,000 became 4,464): lower bounds far above scipy's, unsound."""
    counts = np.array([[250, 50], [5, 0]])
    wide = [v.numpy() for v in stats.simultaneous_bounds(counts.astype(np.int64), 0.01)]
    narrow = [v.numpy() for v in stats.simultaneous_bounds(counts.astype(dtype), 0.01)]
    for a, b in zip(wide, narrow):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(stats.clopper_pearson(dtype(5), 300, 0.1)[0].numpy(),
                                  stats.clopper_pearson(5, 300, 0.1)[0].numpy())
    np.testing.assert_array_equal(
        stats.cohen_split_bounds(counts.astype(dtype), [0, 0], 0.01)[0].numpy(),
        stats.cohen_split_bounds(counts, [0, 0], 0.01)[0].numpy())


def test_one_alpha_per_image_applies_to_its_row():
    """Issue: a [batch] alpha was broadcast along the class axis (per class, not per image)."""
    counts = np.array([[900, 100], [900, 100]])
    per_image = stats.simultaneous_bounds(counts, np.array([0.1, 1e-9]))[0].numpy()
    separately = [stats.simultaneous_bounds(counts[i:i + 1], a)[0].numpy()[0]
                  for i, a in enumerate([0.1, 1e-9])]
    np.testing.assert_array_equal(per_image, separately)
    assert per_image[0] > per_image[1]


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        stats.clopper_pearson_graph([1], 2, 1.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="counts must be <= n"):
        stats.clopper_pearson_graph([3], 2, 0.05)
    with pytest.raises(tf.errors.InvalidArgumentError, match="counts must be >= 0"):
        stats.clopper_pearson([-1], 2, 0.05)


@pytest.mark.parametrize("cp", CP_FUNCTIONS)
def test_one_sided_coverage_exact(cp):
    """P(p < lower) <= alpha and P(p > upper) <= alpha, summed exactly over the binomial."""
    n, alpha = 25, 0.1
    k = np.arange(n + 1)
    lower, upper = (b.numpy() for b in cp(k, n, alpha))
    for p in np.linspace(0.005, 0.995, 199):
        pmf = scipy.stats.binom.pmf(k, n, p)
        assert pmf[lower > p].sum() <= alpha + 1e-9
        assert pmf[upper < p].sum() <= alpha + 1e-9


def mc_tolerance(alpha, draws):
    return alpha + 3.0 * np.sqrt(alpha * (1 - alpha) / draws)


@pytest.mark.parametrize("p", [0.03, 0.5, 0.93])
def test_one_sided_coverage_monte_carlo(p):
    rng = np.random.default_rng(1234)
    n, alpha, draws = 40, 0.1, 20_000
    k = rng.binomial(n, p, size=draws)
    for cp in CP_FUNCTIONS:
        lower, upper = cp(k, n, alpha)
        assert np.mean(lower.numpy() > p) <= mc_tolerance(alpha, draws)
        assert np.mean(upper.numpy() < p) <= mc_tolerance(alpha, draws)


@pytest.mark.parametrize("probs", [
    [0.35, 0.35, 0.1, 0.1, 0.1],          # tied top classes: the top is data-dependent
    [0.8, 0.1, 0.05, 0.05],
    [0.28, 0.27, 0.25, 0.2],
    [0.2] + [0.8 / 9] * 9,
])
def test_simultaneous_bounds_coverage_monte_carlo(probs):
    rng = np.random.default_rng(7)
    probs = np.asarray(probs) / np.sum(probs)
    alpha, draws = 0.2, 4000
    counts = rng.multinomial(60, probs, size=draws)
    p1_lower, p2_upper, top = (v.numpy() for v in stats.simultaneous_bounds(counts, alpha))
    others = np.where(np.eye(len(probs), dtype=bool)[top], -1.0, probs)
    failed = (probs[top] < p1_lower) | (others.max(axis=1) > p2_upper)
    assert np.mean(failed) <= mc_tolerance(alpha, draws)


def test_simultaneous_bounds_definition():
    counts = np.array([[70, 20, 10, 0], [3, 40, 40, 17], [0, 0, 0, 100], [1, 0, 0, 0]])
    alpha, k = 0.01, counts.shape[1]
    p1_lower, p2_upper, top = stats.simultaneous_bounds(counts, alpha)
    lower, upper = scipy_clopper_pearson(counts, counts.sum(1, keepdims=True), alpha / (2 * k))
    rows = np.arange(len(counts))
    expected_top = np.argmax(counts, axis=1)
    np.testing.assert_array_equal(top, expected_top)
    assert top.dtype == tf.int64
    np.testing.assert_allclose(p1_lower, lower[rows, expected_top], atol=1e-10)
    masked = np.where(np.eye(k, dtype=bool)[expected_top], 0.0, upper)
    np.testing.assert_allclose(
        p2_upper, np.minimum(masked.max(1), 1 - lower[rows, expected_top]), atol=1e-10)
    # Tie between classes 1 and 2: the certificate is empty.
    assert p1_lower[1] < p2_upper[1]


def test_simultaneous_bounds_degenerate_counts():
    p1_lower, p2_upper, top = stats.simultaneous_bounds(np.zeros((2, 3), np.int64), 0.05)
    np.testing.assert_array_equal(p1_lower, 0.0)
    assert np.all(p2_upper >= p1_lower) and np.all(np.isfinite(p2_upper))
    p1_lower, p2_upper, _ = stats.simultaneous_bounds([[1, 0], [2, 0]], 0.05)  # tiny n
    assert np.all(np.isfinite(p1_lower)) and np.all(p1_lower <= p2_upper)


def test_cohen_split_bounds_match_scipy():
    counts = np.array([[95, 3, 2], [10, 80, 10], [0, 0, 100], [33, 33, 34]])
    selected = np.array([0, 1, 0, 2])
    alpha = 0.001
    p1_lower, p2_upper = stats.cohen_split_bounds(counts, selected, alpha)
    k = counts[np.arange(4), selected]
    ref, _ = scipy_clopper_pearson(k, counts.sum(1), alpha)
    np.testing.assert_allclose(p1_lower, ref, atol=1e-10)
    np.testing.assert_allclose(p2_upper, 1.0 - ref, atol=1e-10)
    assert p1_lower[2] == 0.0


def test_graph_mode_with_unknown_shapes():
    counts_spec = tf.TensorSpec([None, None], tf.int64)

    @tf.function(input_signature=[counts_spec, tf.TensorSpec([None], tf.int64)])
    def certify_stats(counts, selected):
        return (stats.simultaneous_bounds(counts, 0.001),
                stats.cohen_split_bounds(counts, selected, 0.001))

    counts = np.array([[90, 10, 0], [50, 50, 0], [0, 0, 100]])
    selected = np.array([0, 1, 2])
    (p1, p2, top), (c1, c2) = certify_stats(counts, selected)
    eager = stats.simultaneous_bounds(counts, 0.001)
    for got, want in zip((p1, p2, top), eager):
        np.testing.assert_allclose(got, want, atol=1e-14)
    np.testing.assert_allclose(c1, stats.cohen_split_bounds(counts, selected, 0.001)[0])
    op_types = graph_op_types(certify_stats.get_concrete_function())
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    assert "Betainc" in op_types


def graph_op_types(concrete_function):
    """Op types of a traced function, including the bodies of its loops."""
    graph_def = concrete_function.graph.as_graph_def()
    return {node.op for node in graph_def.node} | {
        node.op for function in graph_def.library.function for node in function.node_def}


def test_binomial_test_pvalue_never_below_exact():
    """PREDICT rejects when p <= alpha: a p-value must not be low.  Tails from 1e-12 to
    0.1 for n up to 1e7 (tf.math.betainc alone is 3e-8 low at some of them).  Reference:
    scipy.special.betainc (Boost), within 8e-13 relative of 50-digit mpmath at n = 1e7
    (scipy_clopper_pearson's check), hence the 1e-12 slack."""
    n = np.repeat([100, 10_000, 1_000_000, 10_000_000], 12).astype(np.float64)
    tails = np.tile(np.geomspace(1e-12, 0.1, 12), 4)
    # the largest m with P(X >= m) >= tail, X ~ Binomial(n, 1/2): m = isf + 1
    m = np.maximum(scipy.stats.binom.isf(tails, n, 0.5) + 1, np.ceil(n / 2) + 1)
    exact = np.minimum(2 * scipy.special.betainc(m, n - m + 1, 0.5), 1.0)
    got = stats.binomial_test_pvalue(m, n).numpy()
    assert np.all(got >= exact * (1 - 1e-12)), np.min(got / exact - 1)
    # rounded up by η = 2^-43 (n + 1) <= 1.14e-6, plus betainc's own error (< 0.08 η)
    np.testing.assert_allclose(got, exact, rtol=1.3e-6)


def test_binomial_test_pvalue_matches_scipy():
    n = np.array([0, 1, 2, 10, 10, 10, 10, 100, 100, 1000])
    k = np.array([0, 1, 1, 0, 3, 5, 10, 60, 41, 530])
    expected = [scipy.stats.binomtest(a, b).pvalue if b else 1.0 for a, b in zip(k, n)]
    np.testing.assert_allclose(stats.binomial_test_pvalue(k, n), expected, rtol=1e-9)
