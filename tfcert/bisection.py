"""Bisection of a monotone predicate, the one root-finder of tfcert's statistics.

Every bound that tfcert inverts numerically (Clopper-Pearson quantiles in
:mod:`tfcert.stats`, the confidence sequences of :mod:`tfcert.confidence_sequences`, the
betting bound on U_KL in :mod:`tfcert.kl`) is the switching point of a predicate that is
true below it and false above it, *as evaluated* in float64.  `bisect` keeps a bracket
``[low, high]`` with ``holds`` evaluated true at ``low`` and false at ``high`` (or the
starting ends), so the rounding direction is the caller's choice of end:

* ``low`` never lies above the switching point: a sound *lower* bound when ``holds(x)``
  means "x is still rejected / below the quantile";
* ``high`` never lies below it: a sound *upper* bound.

Neither end depends on how accurately the midpoints are computed; the width after ``steps``
halvings is ``(high − low) · 2^−steps``.  Core TensorFlow (a ``tf.while_loop``), so it runs
inside ``tf.function`` and exported SavedModels; called eagerly, ``holds`` may also be a
numpy function of the midpoints (the loop then runs in Python).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

# Halvings by default: a bracket of [0, 1] ends narrower than 2**-64 ≈ 5e-20, below the
# float64 spacing of any point >= 2**-11.
STEPS = 64


def bisect(holds: Callable[[tf.Tensor], tf.Tensor | np.ndarray], low: tf.Tensor,
           high: tf.Tensor, steps: int = STEPS) -> tuple[tf.Tensor, tf.Tensor]:
    """``(low, high)`` after ``steps`` halvings of the bracket, elementwise.

    Args:
        holds: non-increasing predicate of the points (true, then false), elementwise.
        low, high: float64 starting ends (any shape, broadcast together).
        steps: number of halvings.

    Returns:
        ``low``: a point where ``holds`` was evaluated true, or the starting ``low``;
        ``high``: a point where it was evaluated false, or the starting ``high``.
    """
    low, high = (tf.convert_to_tensor(end, tf.float64) for end in (low, high))
    low, high = low + tf.zeros_like(high), high + tf.zeros_like(low)

    def halve(low, high):
        middle = 0.5 * (low + high)
        below = holds(middle)
        return tf.where(below, middle, low), tf.where(below, high, middle)

    return tf.while_loop(lambda low, high: True, halve, (low, high), maximum_iterations=steps)
