"""SmoothedClassifier: sampling, soundness on a linear classifier with known exact radius."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats as sps

from tfcert.keys import SELECTION, draw_keys, noise_block_size, run_key
from tfcert.layers import GaussianNoise
from tfcert.smoothing import SmoothedClassifier

SHAPE = (4, 4, 1)


def linear_model(w: np.ndarray, b: float) -> keras.Model:
    """Logits [0, w·x + b]: f(x) = 1 iff w·x + b > 0."""
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.layers[-1].set_weights([np.stack([np.zeros_like(w), w], axis=1).astype(np.float32),
                                  np.array([0.0, b], np.float32)])
    return model


@pytest.fixture(scope="module")
def linear_problem():
    rng = np.random.default_rng(0)
    w = rng.normal(size=int(np.prod(SHAPE)))
    w /= np.linalg.norm(w)
    x = rng.random((300, *SHAPE)).astype(np.float32)
    margin = x.reshape(len(x), -1) @ w
    b = -float(np.median(margin))
    signed = margin + b
    return linear_model(w, b), x, (signed > 0).astype(int), np.abs(signed)  # exact radius ‖w‖=1


def test_counts_shape_sum_and_batching_independence():
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(0.5))
    x = np.random.default_rng(1).random((7, *SHAPE)).astype(np.float32)
    for batch_size in (1, 5, 64, 10_000):
        counts = sc.sample_counts(x, 333, batch_size=batch_size, seed=3)
        assert counts.shape == (7, 2) and counts.dtype == np.int64
        np.testing.assert_array_equal(counts.sum(axis=1), 333)
    np.testing.assert_array_equal(sc.sample_counts(x, 100, seed=5), sc.sample_counts(x, 100, seed=5))
    assert not np.array_equal(sc.sample_counts(x, 1000), sc.sample_counts(x, 1000))


def test_noise_of_an_image_depends_only_on_seed_index_and_draw_number(digits_model, digits):
    """Issue: votes changed with images_per_step.  Now the counts of an image are
    bit-identical whatever the batch, the pass size or where a call starts."""
    model = keras.models.load_model(digits_model)
    sc = SmoothedClassifier(model, 10, GaussianNoise(0.5))
    x, indices = digits[2][:7], np.arange(100, 107)
    whole = sc.sample_counts(x, 300, batch_size=37, seed=5, indices=indices)
    for step in (1, 3, 5):  # images per call, pass sizes from one noise block to all draws
        parts = [sc.sample_counts(x[i:i + step], 300, batch_size=size, seed=5,
                                  indices=indices[i:i + step])
                 for i, size in zip(range(0, 7, step), (1, 64, 5000, 256, 17, 100, 64))]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    resumed = (sc.sample_counts(x, 113, seed=5, indices=indices)
               + sc.sample_counts(x, 187, seed=5, indices=indices, first_draw=113))
    np.testing.assert_array_equal(resumed, whole)
    reordered = sc.sample_counts(x[::-1], 300, seed=5, indices=indices[::-1])
    np.testing.assert_array_equal(reordered[::-1], whole)
    # the index, the seed and the stream each change the noise
    assert not np.array_equal(sc.sample_counts(x, 300, seed=5, indices=indices + 1), whole)
    assert not np.array_equal(sc.sample_counts(x, 300, seed=6, indices=indices), whole)
    assert not np.array_equal(
        sc.sample_counts(x, 300, seed=5, indices=indices, stream=SELECTION), whole)


def test_noise_blocks_and_keys():
    assert [noise_block_size(s) for s in ((8, 8, 1), (28, 28, 1), (32, 32, 3),
                                                    (224, 224, 3))] == [64, 16, 4, 1]
    np.testing.assert_array_equal(run_key(7), [7, 0])
    np.testing.assert_array_equal(run_key((3, 4)), [3, 4])
    assert not np.array_equal(run_key(), run_key())  # OS entropy
    with pytest.raises(ValueError, match="pair of ints"):
        run_key(1.5)
    keys = draw_keys([1, 2], 0, [0, 1, 0]).numpy()
    assert keys.shape == (3, 2) and np.array_equal(keys[0], keys[2])
    assert not np.array_equal(keys[0], keys[1])


@pytest.mark.slow
def test_cohen_selection_and_estimation_draws_are_independent_without_a_seed():
    """Issue: with seed=None the selection votes were a subset of the estimation votes.

    2,000 exactly tied images (w·x + b = 0): every certificate is wrong, so the rate of
    certificates is the error rate, ≤ α = 0.05 for independent draws.  Its binomial
    standard error is ≤ sqrt(0.05 · 0.95 / 2000) = 0.0049, so a sound procedure exceeds
    0.05 + 3.8 · 0.0049 = 0.069 with probability < 1e-4; the old code measured 9.2%.
    """
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(1.0))
    x = np.full((2000, *SHAPE), 0.5, np.float32)
    cert = sc.certify(x, 100, alpha=0.05, statistics="cohen", num_selection_samples=100,
                      batch_size=10)
    assert np.mean(cert.prediction >= 0) <= 0.069


def test_vote_frequencies_match_the_analytic_smoothed_probabilities():
    w = np.ones(16) / 4.0
    model = linear_model(w, -2.0)
    sigma, n = 0.5, 20_000
    x = np.random.default_rng(2).random((5, *SHAPE)).astype(np.float32)
    counts = SmoothedClassifier(model, 2, GaussianNoise(sigma)).sample_counts(x, n, seed=0)
    p1 = sps.norm.cdf((x.reshape(5, -1) @ w - 2.0) / sigma)  # ‖w‖ = 1
    assert np.all(np.abs(counts[:, 1] / n - p1) < 5 * np.sqrt(p1 * (1 - p1) / n) + 1e-3)


@pytest.mark.parametrize("statistics", ["simultaneous", "cohen"])
def test_certificates_are_sound_on_a_linear_classifier(linear_problem, statistics):
    model, x, label, exact = linear_problem
    sigma = 0.5
    sc = SmoothedClassifier(model, 2, GaussianNoise(sigma))
    cert = sc.certify(x, 2000, alpha=1e-4, bound=("renyi", "cohen", "pixeldp"),
                      statistics=statistics, seed=7)
    certified = cert.prediction >= 0
    assert np.all(cert.prediction[certified] == label[certified])
    for name, radius in cert.radii.items():
        assert np.all(np.isfinite(radius))
        assert np.all(radius <= exact + 1e-9), name
        assert np.all(radius[~certified] == 0)
    # not trivially small: Cohen's bound is tight for linear classifiers
    easy = exact > 0.3 * sigma
    assert np.mean(cert.radii["cohen"][easy] / exact[easy]) > 0.5
    assert np.mean(cert.radii["renyi"][easy] / exact[easy]) > 0.3
    assert np.all(cert.radii["pixeldp"] <= cert.radii["renyi"] + 1e-12)


def test_certify_abstains_when_undecided_and_never_returns_nan():
    model = linear_model(np.ones(16) / 4, -2.0)  # w·x + b = 0 at x = 0.5
    sc = SmoothedClassifier(model, 2, GaussianNoise(1.0))
    x = np.full((3, *SHAPE), 0.5, np.float32)
    cert = sc.certify(x, 200, alpha=0.001, bound=("renyi", "cohen"), seed=0)
    np.testing.assert_array_equal(cert.prediction, -1)
    np.testing.assert_array_equal(cert.radius, 0.0)
    tiny = sc.certify(np.zeros((2, *SHAPE), np.float32), 1, alpha=0.001, seed=0)
    np.testing.assert_array_equal(tiny.prediction, -1)


def test_predict_agrees_with_the_base_decision_far_from_the_boundary():
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(0.25))
    x = np.concatenate([np.full((2, *SHAPE), 0.1), np.full((2, *SHAPE), 0.9),
                        np.full((2, *SHAPE), 0.5)]).astype(np.float32)
    labels = sc.predict(x, 500, alpha=0.001, seed=1)
    np.testing.assert_array_equal(labels[:4], [0, 0, 1, 1])
    assert np.all(labels[4:] == -1)


def test_input_validation():
    sc = SmoothedClassifier(linear_model(np.ones(16), 0.0), 2, GaussianNoise(0.5))
    with pytest.raises(ValueError, match="height, width, channels"):
        sc.sample_counts(np.zeros((4, 16), np.float32), 10)
    with pytest.raises(ValueError, match="NaN"):
        sc.sample_counts(np.full((1, *SHAPE), np.nan, np.float32), 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sc.sample_counts(np.full((1, *SHAPE), 2.0, np.float32), 10)
    with pytest.raises(ValueError, match="unknown bound"):
        sc.certify(np.zeros((1, *SHAPE), np.float32), 10, bound="lp")
    with pytest.raises(ValueError, match="alpha"):
        sc.certify(np.zeros((1, *SHAPE), np.float32), 10, alpha=0.0)
    with pytest.raises(TypeError, match="randomized layer"):
        SmoothedClassifier(sc.base_model, 2, keras.layers.GaussianNoise(0.1))


def test_sampling_runs_in_one_graph_for_large_n():
    """n = 50,000 with a small pass size: memory stays bounded, counts exact."""
    model = linear_model(np.ones(16) / 4, -2.0)
    sc = SmoothedClassifier(model, 2, GaussianNoise(0.5), batch_size=256)
    counts = sc.sample_counts(np.full((3, *SHAPE), 0.9, np.float32), 50_000, seed=0)
    np.testing.assert_array_equal(counts.sum(axis=1), 50_000)
    assert sc._counter(SHAPE).experimental_get_tracing_count() == 1


def test_radii_use_the_sigma_the_noise_is_drawn_with():
    """σ = 0.12 is 0.11999999731779099 in float32, the σ of the noise actually added:
    radii computed with the float64 0.12 would be 2.2e-8 relatively too large."""
    sc = SmoothedClassifier(linear_model(np.ones(16) / 4, -2.0), 2, GaussianNoise(0.12))
    assert sc.sigma == float(np.float32(0.12)) < 0.12
