"""The one bisection helper (tfcert.bisection): its rounding direction and its width."""

import numpy as np
import tensorflow as tf

from tfcert.bisection import STEPS, bisect


def test_low_holds_high_fails_and_the_bracket_is_narrow():
    rng = np.random.default_rng(0)
    switch = np.concatenate([rng.random(200), [0.0, 1e-300, 0.5, 1.0]])
    low, high = (v.numpy() for v in bisect(lambda x: x < switch, np.zeros(204), np.ones(204)))
    # low is 0 or a point where `x < switch` was evaluated true; high a point where false
    assert np.all((low < switch) | (low == 0.0)) and np.all(high >= switch)
    # 64 halvings of [0, 1]: 2**-64, or one float64 spacing of the switch (float rounding)
    assert np.all(high - low <= np.maximum(2.0 ** -STEPS, 2 * np.spacing(switch)))


def test_a_numpy_predicate_runs_eagerly_and_a_tensor_one_in_a_graph():
    switch = np.array([0.25, 0.75])
    eager, _ = bisect(lambda x: np.asarray(x) < switch, np.zeros(2), np.ones(2), steps=30)
    graph = tf.function(lambda s: bisect(lambda x: x < s, tf.zeros_like(s), tf.ones_like(s),
                                         steps=30)[0])(tf.constant(switch))
    np.testing.assert_array_equal(eager, graph)
    assert np.all(switch - eager.numpy() <= 2.0 ** -30)  # 30 halvings of [0, 1]
