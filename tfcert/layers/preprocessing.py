"""`Preprocessing`: the pixel scale a model expects, as its first layer.

tfcert's images, σ and ε are on the [0, 1] scale.  A model trained on [0, 255] pixels or
on normalized inputs takes them through this layer (`tfcert.models.with_preprocessing`),
so the noise is always added on the [0, 1] scale, before the model's own scale.
"""

from __future__ import annotations

from typing import Sequence

import keras


@keras.saving.register_keras_serializable(package="tfcert")
class Preprocessing(keras.layers.Layer):
    """``(scale · x − mean) / std``, per channel: [0, 1] images to a model's input scale.

    Args:
        scale: the model's pixel range over [0, 1] (255.0 for a model of [0, 255] pixels).
        mean: subtracted after scaling: a number or one per channel (None: 0).
        std: divides after that: a number or one per channel (None: 1).
    """

    def __init__(self, scale: float = 255.0, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.mean, self.std = (None if v is None else [float(e) for e in _as_list(v)]
                               for v in (mean, std))
        if self.std is not None and min(abs(e) for e in self.std) == 0:
            raise ValueError(f"std must not be 0, got {std}")

    def call(self, inputs):
        x = inputs * self.scale
        if self.mean is not None:
            x = x - keras.ops.convert_to_tensor(self.mean, x.dtype)
        if self.std is not None:
            x = x / keras.ops.convert_to_tensor(self.std, x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "mean": self.mean,
                "std": self.std}


def _as_list(value: float | Sequence[float]) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
