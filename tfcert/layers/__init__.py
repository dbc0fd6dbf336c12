"""Keras layers of tfcert: noise, randomized discretization and transformation defenses,
and the pixel scale of a model (`Preprocessing`).

All randomized layers are active at inference, own a ``keras.random.SeedGenerator``,
are registered for serialization, and accept an optional per-call stateless ``seed``
(see :mod:`tfcert.layers.base`).
"""

from tfcert.layers.base import RandomizedLayer
from tfcert.layers.discretization import (PAPER_SETTINGS, RandomizedDiscretization,
                                          RandomizedMixture, downsampling_for_epsilon)
from tfcert.layers.noise import GaussianNoise
from tfcert.layers.preprocessing import Preprocessing
from tfcert.layers.transforms import (BitDepthReduction, JPEGCompression, ResizePadding,
                                      TotalVariationMinimization)

__all__ = ["RandomizedLayer", "GaussianNoise", "RandomizedDiscretization", "RandomizedMixture",
           "downsampling_for_epsilon", "PAPER_SETTINGS", "BitDepthReduction", "JPEGCompression",
           "TotalVariationMinimization", "ResizePadding", "Preprocessing"]
