"""tfcert.certificate: the one certificate from counts and PREDICT's test, on every path."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats as sps

from tfcert import bounds, stats
from tfcert.certificate import (ABSTAIN, certificate_from_counts, certify_counts,
                                predict_counts)

COUNTS = np.array([[950, 30, 20], [400, 380, 220], [0, 1000, 0], [500, 500, 0]])


@pytest.mark.parametrize("statistics", ["simultaneous", "cohen"])
def test_the_graph_certificate_is_the_python_one(statistics):
    """The exported signatures run certify_counts in a graph; certificate_from_counts runs
    it eagerly: the same numbers."""
    selected = np.argmax(COUNTS, axis=1)
    names = ("renyi", "cohen", "pixeldp")
    eager = certificate_from_counts(COUNTS, 0.001, 0.5, names, statistics, selected)
    graph = tf.function(lambda c: certify_counts(c, 0.001, 0.5, names, statistics, selected))(
        tf.constant(COUNTS))
    np.testing.assert_array_equal(graph["prediction"], eager.prediction)
    for name in names:
        np.testing.assert_array_equal(graph[name], eager.radii[name])


def test_prediction_radius_and_abstention_follow_the_bounds():
    p1, p2, top = (v.numpy() for v in stats.simultaneous_bounds(COUNTS, 0.001))
    cert = certificate_from_counts(COUNTS, 0.001, 0.5, "renyi")
    np.testing.assert_array_equal(cert.prediction, np.where(p1 > p2, top, ABSTAIN))
    np.testing.assert_array_equal(cert.radius, bounds.renyi_radius(p1, p2, 0.5).numpy())
    assert cert.prediction[1] == ABSTAIN and cert.prediction[3] == ABSTAIN  # close / tied
    assert cert.radius[0] > 0 and cert.radius[2] > cert.radius[0]


def test_predict_counts_is_the_two_sided_binomial_test_of_scipy():
    counts = np.array([[60, 40, 0], [70, 30, 0], [0, 5, 0], [20, 20, 20], [3, 90, 1]])
    prediction, p_value = (v.numpy() for v in predict_counts(counts, 0.05))
    top2 = -np.sort(-counts, axis=1)[:, :2]
    reference = [sps.binomtest(int(a), int(a + b)).pvalue for a, b in top2]
    # The p-value is the tail rounded *up* by η = 2**-43 (a + b) <= 1.2e-11 relative for
    # n <= 100 (stats module docstring), so it may exceed scipy's by that, never fall below
    # it by more than scipy's own float64 rounding (a few ulp of values <= 1: 1e-15).
    assert np.all(p_value >= np.array(reference) - 1e-15)
    np.testing.assert_allclose(p_value, reference, rtol=1e-10)  # > η plus rounding
    np.testing.assert_array_equal(prediction, np.where(np.array(reference) <= 0.05,
                                                       np.argmax(counts, axis=1), ABSTAIN))
    per_image = predict_counts(counts[:2], np.array([[0.05], [1e-9]]))[0].numpy()
    assert per_image[0] == ABSTAIN and per_image[1] == ABSTAIN  # 70/30 passes 0.05, not 1e-9
    assert predict_counts(counts[1:2], 0.05)[0].numpy()[0] == 0
