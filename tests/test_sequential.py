"""Early-stopping certification: schedule, soundness (linear classifier, Monte Carlo), savings."""

import numpy as np
import pytest
from scipy import stats as sps
from test_smoothing import SHAPE, linear_model, linear_problem  # noqa: F401 (fixture)

from tfcert.layers import GaussianNoise
from tfcert.sequential import EarlyStopping, certify_sequential, run_sequential
from tfcert.smoothing import SmoothedClassifier


class PeekingAtFullLevel(EarlyStopping):
    """The invalid procedure: every checkpoint at the full level α (no split)."""

    def levels(self, alpha, num_checkpoints):
        return np.full(num_checkpoints, alpha)


def test_checkpoints_are_geometric_and_levels_sum_to_alpha():
    rule = EarlyStopping(0.5, first_checkpoint=100, growth=2.0, final_share=0.5)
    np.testing.assert_array_equal(rule.checkpoints(1000), [100, 200, 400, 800, 1000])
    np.testing.assert_array_equal(rule.checkpoints(50), [50])
    np.testing.assert_array_equal(EarlyStopping(0, 1, growth=1.1).checkpoints(5), [1, 2, 3, 4, 5])
    levels = rule.levels(0.001, 5)
    np.testing.assert_allclose(levels, [0.000125] * 4 + [0.0005])
    assert levels.sum() == pytest.approx(0.001, rel=1e-12)
    np.testing.assert_array_equal(rule.levels(0.01, 1), [0.01])
    for bad in ({"target_radius": -1.0}, {"target_radius": 0.1, "growth": 1.0},
                {"target_radius": 0.1, "first_checkpoint": 0},
                {"target_radius": 0.1, "final_share": 0.0},
                {"target_radius": 0.1, "final_share": 1.0},  # nothing left for early looks
                {"target_radius": 0.1, "futility_level": 1.0}):
        with pytest.raises(ValueError):
            EarlyStopping(**bad)


def binomial_streams(p, seed):
    """A `Draw` of i.i.d. multinomial votes with class probabilities ``p``."""
    rng = np.random.default_rng(seed)
    return lambda images, first_draw, num_new: rng.multinomial(num_new, p, size=len(images))


@pytest.mark.parametrize("p1", [0.7, 0.9])
def test_monte_carlo_error_rate_stays_below_alpha(p1):
    """Target = the true radius, so every certificate at the target is an error.

    Cohen's statistics use one level-α_j bound per look, so the checkpoints' errors are
    nearly additive: splitting α keeps the error below α, while looking at the full
    level every time (the invalid procedure) exceeds it several times over.
    """
    alpha, streams, sigma = 0.1, 2000, 1.0
    p = np.array([p1, 1.0 - p1])
    true_radius = sigma * sps.norm.ppf(p1)  # Cohen's radius is exact for two classes
    rates = {}
    for rule_type in (EarlyStopping, PeekingAtFullLevel):
        rule = rule_type(true_radius, first_checkpoint=20)
        cert = run_sequential(binomial_streams(p, 0), streams, 2, 1280, rule, alpha, sigma,
                              "cohen", "cohen", selected=np.zeros(streams, np.int64))
        wrong = (cert.prediction >= 0) & ((cert.prediction != 0) | (cert.radius > true_radius))
        assert np.all((cert.p1_lower > p1) == wrong)
        rates[rule_type] = wrong.mean()
    standard_error = np.sqrt(alpha * (1 - alpha) / streams)
    assert rates[EarlyStopping] <= alpha + 3 * standard_error
    assert rates[PeekingAtFullLevel] > alpha + 6 * standard_error


def test_monte_carlo_simultaneous_bounds_hold_at_the_stopping_time():
    """Three classes, simultaneous statistics: both bounds hold w.p. >= 1 − α."""
    alpha, streams = 0.1, 2000
    p = np.array([0.6, 0.3, 0.1])
    rule = EarlyStopping(0.3, first_checkpoint=20)
    cert = run_sequential(binomial_streams(p, 1), streams, 3, 1280, rule, alpha, 1.0, "renyi")
    failed = (cert.p1_lower > p[0]) | (cert.p2_upper < p[1])
    assert failed.mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)
    assert np.all(cert.prediction[cert.prediction >= 0] == 0)


def test_decided_images_drop_out_and_the_rest_keep_sampling():
    # image 0: unanimous (certified at once), 1: a coin (futile), 2: Φ⁻¹(0.75) ≈ 0.67 above
    # the target 0.5 (certified once p1_lower >= Φ(0.5) ≈ 0.69: many votes)
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.75, 0.25]])
    rng = np.random.default_rng(0)
    calls = []

    def draw(images, first_draw, num_new):
        calls.append((first_draw, images.tolist(), num_new))
        return np.stack([rng.multinomial(num_new, p[i]) for i in images])

    rule = EarlyStopping(0.5, first_checkpoint=50)
    cert = run_sequential(draw, 3, 2, 6400, rule, 0.001, 1.0, "cohen")
    assert calls[0] == (0, [0, 1, 2], 50)
    # every call continues where the previous one stopped: no draw is counted twice
    assert all(later[0] == earlier[0] + earlier[2] for earlier, later in zip(calls, calls[1:]))
    assert all(set(later[1]) <= set(earlier[1]) for earlier, later in zip(calls, calls[1:]))
    assert 0 not in calls[1][1] and calls[-1][1] == [2]
    np.testing.assert_array_equal(cert.counts.sum(axis=1), cert.num_samples)
    assert cert.num_samples[0] == 50 and cert.num_samples[1] < cert.num_samples[2]
    assert cert.prediction[0] == 0 and cert.radius[0] >= 0.5
    assert cert.prediction[1] == -1 or cert.radius[1] < 0.5
    assert cert.prediction[2] == 0 and cert.radius[2] >= 0.5


@pytest.mark.parametrize("statistics", ["simultaneous", "cohen"])
def test_early_stopping_is_sound_on_a_linear_classifier_and_saves_samples(linear_problem,
                                                                          statistics):
    model, x, label, exact = linear_problem
    sigma, target, max_samples = 0.5, 0.25, 4000
    sc = SmoothedClassifier(model, 2, GaussianNoise(sigma))
    rule = EarlyStopping(target)
    seq = certify_sequential(sc, x, max_samples, rule, alpha=1e-4, bound=("cohen", "renyi"),
                             statistics=statistics, seed=3)
    certified = seq.prediction >= 0
    assert np.all(seq.prediction[certified] == label[certified])
    for name, radius in seq.radii.items():
        assert np.all(radius <= exact + 1e-9), name
        assert np.all(radius[~certified] == 0)
    extra = 100 if statistics == "cohen" else 0
    np.testing.assert_array_equal(seq.counts.sum(axis=1) + extra, seq.num_samples)
    assert seq.num_samples.max() <= max_samples + extra
    fixed = sc.certify(x, max_samples, alpha=1e-4, bound="cohen", statistics=statistics, seed=4)
    at_target = {name: np.mean((c.prediction == label) & (c.radius >= target))
                 for name, c in (("seq", seq), ("fixed", fixed))}
    assert at_target["seq"] >= at_target["fixed"] - 0.05
    assert seq.num_samples.mean() < 0.5 * (max_samples + extra)


def test_undecidable_inputs_stop_early_and_abstain():
    model = linear_model(np.ones(16) / 4, -2.0)  # w·x + b = 0 at x = 0.5
    sc = SmoothedClassifier(model, 2, GaussianNoise(1.0))
    x = np.full((4, *SHAPE), 0.5, np.float32)
    cert = certify_sequential(sc, x, 10_000, EarlyStopping(0.5), alpha=0.001, seed=0)
    np.testing.assert_array_equal(cert.prediction, -1)
    assert np.all(cert.num_samples <= 400)


def test_seeded_runs_repeat():
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(0.5))
    x = np.random.default_rng(5).random((6, *SHAPE)).astype(np.float32)
    first, second = (certify_sequential(sc, x, 2000, EarlyStopping(0.3), seed=11)
                     for _ in range(2))
    np.testing.assert_array_equal(first.counts, second.counts)
    np.testing.assert_array_equal(first.radius, second.radius)


def test_checkpoint_votes_are_a_fixed_run_truncated():
    """Checkpoint j's votes are draws 0 … n_j − 1 of the fixed-n run with the same seed."""
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(1.0))
    x = np.full((3, *SHAPE), 0.5, np.float32)  # undecidable: runs to the last checkpoint
    rule = EarlyStopping(0.5, first_checkpoint=100)
    seq = certify_sequential(sc, x, 700, rule, alpha=0.001, seed=4, indices=[3, 9, 27])
    fixed = sc.sample_counts(x, 100, seed=4, indices=[3, 9, 27])
    stopped = seq.counts.sum(axis=1) == 100
    np.testing.assert_array_equal(seq.counts[stopped], fixed[stopped])


def test_unseeded_calls_never_reuse_noise():
    """Issue: unseeded calls used to repeat pass i + 1 of the previous call as pass i.

    One tied image (w·x + b = 0), n = 100 draws per call in passes of 10: with a
    fresh run key per call, consecutive calls' votes are independent, so their
    correlation over 400 call pairs is ~N(0, 1/400) (|r| < 0.25 fails with
    probability < 1e-6); the old counter scheme shared 9 of 10 passes (r ≈ 0.9).
    """
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(1.0))
    x = np.full((1, *SHAPE), 0.5, np.float32)
    votes = np.array([sc.sample_counts(x, 100, batch_size=10)[0, 0] for _ in range(401)])
    assert abs(np.corrcoef(votes[:-1], votes[1:])[0, 1]) < 0.25
