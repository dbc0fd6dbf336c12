"""Input contracts of the public statistics, radii and certificate API (issue 25).

Every example here turned invalid input into a confident-looking number (or a raw
TensorFlow/numpy error) before the contracts: probabilities outside [0, 1], α shapes,
counts that are not integer votes, classes out of range, σ <= 0 in a graph, and a
second image size on a fully convolutional model.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcert import bounds, kl, stats
from tfcert.layers import GaussianNoise
from tfcert.certificate import certificate_from_counts
from tfcert.smoothing import SmoothedClassifier

RADII = [bounds.renyi_radius, bounds.cohen_radius, bounds.pixeldp_radius]


# ------------------------------------------------------------------ radii
@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("p1, p2, name", [(1.5, 0.1, "p1_lower"), (np.inf, 0.1, "p1_lower"),
                                          (2.0, 2.0, "p1_lower"), (np.nan, 0.1, "p1_lower"),
                                          (0.9, -0.1, "p2_upper"), (0.9, 1.0001, "p2_upper"),
                                          (-0.0001, 0.0, "p1_lower")])
def test_probabilities_outside_the_unit_interval_are_refused(radius, p1, p2, name):
    """renyi_radius(1.5, 0.1, 1) was 7.396 (cohen 8.21, pixeldp 0.56): p1 was clipped."""
    with pytest.raises(ValueError, match=f"{name} must be probabilities in \\[0, 1\\]"):
        radius(p1, p2, 1.0)


@pytest.mark.parametrize("radius", RADII)
def test_a_lower_p1_than_p2_certifies_nothing(radius):
    """renyi_radius(0.6, 0.7, 1) was 0.202 (cohen 0.253): p2 was capped to 1 − p1 before
    the comparison the docstring promises."""
    np.testing.assert_array_equal(radius([0.6, 0.5, 0.0], [0.7, 0.5, 0.0], 1.0), 0.0)
    assert radius(0.6, 0.4, 1.0) > 0.0  # a consistent pair still certifies


@pytest.mark.parametrize("radius", RADII)
def test_graph_mode_refuses_invalid_probabilities_and_sigma(radius):
    """Symbolic inputs (a tf.function / a SavedModel) cannot be checked at once: the
    request fails instead of returning a negative, NaN or inflated radius."""
    compiled = tf.function(lambda p1, p2, sigma: radius(p1, p2, sigma))
    spec = tf.TensorSpec([None], tf.float64)
    fn = compiled.get_concrete_function(spec, spec, tf.TensorSpec([], tf.float64))
    ok = fn(tf.constant([0.9], tf.float64), tf.constant([0.1], tf.float64),
            tf.constant(1.0, tf.float64))
    assert ok.numpy()[0] > 0
    for p1, p2, sigma, message in [(1.5, 0.1, 1.0, "p1_lower"), (0.9, np.nan, 1.0, "p2_upper"),
                                   (0.9, 0.1, -1.0, "sigma"), (0.9, 0.1, 0.0, "sigma"),
                                   (0.9, 0.1, np.inf, "sigma")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            fn(tf.constant([p1], tf.float64), tf.constant([p2], tf.float64),
               tf.constant(sigma, tf.float64))


def test_gaussian_kl_bound_refuses_invalid_arguments():
    for args, name in [((-0.1, 784, 1, 0.5), "eps"), ((np.inf, 784, 1, 0.5), "eps"),
                       ((0.1, 0, 1, 0.5), "num_pixels"), ((0.1, 784, 1.5, 0.5), "channels")]:
        with pytest.raises(ValueError, match=name):
            bounds.gaussian_kl_bound(*args)


# ------------------------------------------------------------------ alpha shapes
COUNTS = np.array([[900, 100], [600, 400]])


def separately(fn, alphas):
    """``fn(row, alpha)`` of each image alone, stacked."""
    return np.concatenate([np.asarray(fn(COUNTS[i:i + 1], a)) for i, a in enumerate(alphas)])


@pytest.mark.parametrize("alpha", [np.array([1e-6, 0.3]), np.array([[1e-6], [0.3]])])
@pytest.mark.parametrize("statistics", ["simultaneous", "cohen"])
def test_one_alpha_per_image_means_the_same_on_every_path(alpha, statistics):
    """The cohen path of certificate_from_counts with alpha [[1e-6], [0.3]] returned [2, 2]
    arrays (image 0 evaluated at image 1's α as well)."""
    cert = certificate_from_counts(COUNTS, alpha, 1.0, ("cohen", "renyi"), statistics, [0, 0])
    assert cert.p1_lower.shape == cert.radius.shape == cert.prediction.shape == (2,)
    for field in ("p1_lower", "p2_upper", "radius"):
        expected = separately(
            lambda c, a: getattr(certificate_from_counts(c, a, 1.0, ("cohen", "renyi"),
                                                         statistics, [0]), field),
            alpha.reshape(-1))
        np.testing.assert_array_equal(getattr(cert, field), expected)
    assert cert.p1_lower[0] < separately(
        lambda c, a: certificate_from_counts(c, a, 1.0, "cohen", statistics, [0]).p1_lower,
        [0.3, 0.3])[0]  # image 0 really used its own, smaller α


@pytest.mark.parametrize("cp", [stats.clopper_pearson, stats.clopper_pearson_graph])
@pytest.mark.parametrize("alpha", [np.array([1e-6, 0.3]), np.array([[1e-6], [0.3]])])
def test_clopper_pearson_reads_a_vector_alpha_per_image(cp, alpha):
    """clopper_pearson(counts [2, 2], n [[1000], [1000]], alpha [1e-6, 0.3]) applied α along
    the classes (image 0's second class at 0.3), not per image."""
    lower, upper = cp(COUNTS, np.array([[1000], [1000]]), alpha)
    for i, a in enumerate(alpha.reshape(-1)):
        ref_lower, ref_upper = cp(COUNTS[i], 1000, a)
        np.testing.assert_array_equal(lower[i], ref_lower)
        np.testing.assert_array_equal(upper[i], ref_upper)


def test_alpha_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="3 levels for 2 images"):
        stats.simultaneous_bounds(COUNTS, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="one level per image"):
        stats.clopper_pearson(COUNTS, 1000, np.full((1, 2), 0.1))
    with pytest.raises(ValueError, match="alpha must lie in \\(0, 1\\)"):
        certificate_from_counts(COUNTS, [0.1, 1.0], 1.0)


def test_predict_and_certify_take_one_alpha_per_image():
    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    sc = SmoothedClassifier(model, 2, GaussianNoise(0.5, seed=0))
    x = np.full((2, 2, 2, 1), 0.5, np.float32)
    per_image = sc.certify(x, 100, alpha=np.array([[1e-6], [0.3]]), seed=0)
    assert per_image.p1_lower.shape == (2,)
    assert sc.predict(x, 100, alpha=np.array([[1e-6], [0.3]]), seed=0).shape == (2,)
    with pytest.raises(ValueError, match="levels for 2 images"):
        sc.certify(x, 100, alpha=[0.1, 0.1, 0.1], seed=0)


# ------------------------------------------------------------------ counts and classes
@pytest.mark.parametrize("counts, message", [
    (np.array([900, 100]), "shape \\[batch, classes\\]"),         # was a numpy AxisError
    (np.array([[900.5, 99.5]]), "non-negative integers"),        # was truncated to 900, 99
    (np.array([[np.nan, 100.0]]), "non-negative integers"),
    (np.array([[-1, 100]]), ">= 0"),
    (np.array([["a", "b"]]), "integers"),
])
def test_counts_must_be_integer_votes_of_shape_batch_classes(counts, message):
    with pytest.raises(ValueError, match=message):
        certificate_from_counts(counts, 0.01, 1.0)
    with pytest.raises(ValueError, match=message):
        stats.simultaneous_bounds(counts, 0.01)


def test_integer_valued_float_counts_are_accepted():
    cert = certificate_from_counts(COUNTS.astype(np.float32), 0.01, 1.0)
    np.testing.assert_array_equal(cert.p1_lower, certificate_from_counts(COUNTS, 0.01, 1.0).p1_lower)


@pytest.mark.parametrize("num_samples, message", [(1000.5, "whole numbers"),
                                                  (999, ">= the votes"),
                                                  ([1000, 1000, 1000], "one per image")])
def test_num_samples_is_checked_not_truncated(num_samples, message):
    with pytest.raises(ValueError, match=message):
        certificate_from_counts(COUNTS, 0.01, 1.0, num_samples=num_samples)
    cert = certificate_from_counts(COUNTS, 0.01, 1.0, num_samples=1100)
    np.testing.assert_array_equal(cert.num_samples, [1100, 1100])


@pytest.mark.parametrize("selected, message", [([0, 2], "in \\[0, 2\\)"), ([0, -1], "in \\[0, 2\\)"),
                                               ([0.0, 1.0], "integer"), ([0], "1 classes for 2")])
def test_selected_classes_out_of_range_are_refused(selected, message):
    """An out-of-range ``selected`` raised a raw GatherV2 error."""
    with pytest.raises(ValueError, match=message):
        certificate_from_counts(COUNTS, 0.01, 1.0, "renyi", "cohen", selected)


def test_binomial_test_refuses_impossible_counts():
    for successes, trials in [(5, 3), (-1, 3), (2.5, 5)]:
        with pytest.raises(ValueError):
            stats.binomial_test_pvalue(successes, trials)


def test_clopper_pearson_refuses_a_fractional_n_for_integer_counts():
    """n = 100.5 with integer counts was truncated to 100 (a tighter, unfounded bound)."""
    with pytest.raises(ValueError, match="n must be an integer"):
        stats.clopper_pearson(np.array([50]), 100.5, 0.05)
    projected = stats.clopper_pearson(np.array([50.5]), 100.0, 0.05)[0]  # projections: real k
    assert 0.0 < float(projected[0]) < 0.505


def test_kl_certify_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels"):
        kl.kl_certify(COUNTS, [0, 2], 0.01)


# ------------------------------------------------------------------ image sizes
def test_a_fully_convolutional_model_serves_every_image_size_it_accepts():
    """A second image size on the same classifier failed with "count_votes needs a static
    image shape" (one tf.function with reduce_retracing had generalised the shape)."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 3),
                              keras.layers.GlobalMaxPooling2D()])
    sc = SmoothedClassifier(model, 3, GaussianNoise(0.25))
    for side in (6, 9, 6, 12):
        counts = sc.sample_counts(np.full((2, side, side, 1), 0.5, np.float32), 20, seed=0)
        np.testing.assert_array_equal(counts.sum(axis=1), 20)
    cert = sc.certify(np.full((1, 7, 7, 1), 0.5, np.float32), 50, seed=0)
    assert cert.prediction.shape == (1,)


def test_confidence_sequences_refuse_impossible_votes_and_levels():
    from tfcert import confidence_sequences as cs

    for args in [(5.0, 3.0, 0.05), (-1.0, 3.0, 0.05), (1.0, 3.0, 1.0), (1.0, 3.0, [0.1, 0.2])]:
        with pytest.raises(ValueError, match="successes must be|trials - successes|alpha must"):
            cs.mixture_lower(*args)
    with pytest.raises(ValueError, match="trials - successes must be >= 0"):
        cs.betting_lower(np.array([[3.0, 50.0]]), np.array([10.0, 40.0]), 0.05)
