"""TF Serving warmup requests of an export (``assets.extra/tf_serving_warmup_requests``),
encoded in the protobuf wire format so that exporting needs TensorFlow only."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from tfcert.export.reading import graph_defs

# TF Serving's SavedModel warmup file (read at load when --enable_model_warmup, the default).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_PIXEL = 0.5  # every pixel of a warmup image (inside [0, 1], so the request is valid)
# Warmup values of the other inputs, by name (integer inputs not listed get 0).
WARMUP_VALUES = {"seed": 0, "target_radius": 0.0}


def write_warmup_requests(path: str, model_name: str) -> None:
    """Writes :data:`WARMUP_FILE` into the SavedModel at ``path``: one ``PredictionLog``
    per signature (sorted by name), each a request for one image of
    :data:`WARMUP_PIXEL` (and :data:`WARMUP_VALUES` for the other inputs), its inputs
    built from the saved signature defs."""
    (meta_graph,) = graph_defs(path)
    names = sorted(k for k in meta_graph.signature_def if not k.startswith("__"))
    os.makedirs(os.path.dirname(os.path.join(path, WARMUP_FILE)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(path, WARMUP_FILE)) as writer:
        for name in names:
            inputs = {key: _warmup_tensor(key, info)
                      for key, info in meta_graph.signature_def[name].inputs.items()}
            writer.write(prediction_log(model_name, name, inputs))


def prediction_log(model_name: str, signature_name: str,
                   inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized ``tensorflow.serving.PredictionLog`` holding a ``PredictRequest``.

    Encoded directly in the protobuf wire format (so TensorFlow alone suffices), with
    the field numbers of tensorflow_serving/apis: ``PredictionLog.predict_log`` = 6,
    ``PredictLog.request`` = 1, ``PredictRequest.model_spec`` = 1 and ``.inputs`` = 2
    (a map: entries of key = 1, value = 2, a ``TensorProto``), ``ModelSpec.name`` = 1
    and ``.signature_name`` = 3.  tests/test_export.py parses the records with
    tensorflow-serving-api's own ``PredictionLog``.
    """
    spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    entries = b"".join(
        _field(2, _field(1, key.encode()) +
               _field(2, tf.make_tensor_proto(value).SerializeToString()))
        for key, value in sorted(inputs.items()))
    return _field(6, _field(1, _field(1, spec) + entries))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): tag, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer (protobuf wire format)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _warmup_tensor(name: str, info: meta_graph_pb2.TensorInfo) -> np.ndarray:
    """A valid warmup value of the signature input ``name`` (a ``TensorInfo``): batch 1,
    filled with its :data:`WARMUP_VALUES` entry (seed 0, target radius 0), else pixels
    of :data:`WARMUP_PIXEL` for float inputs (images) and 0 for integer ones."""
    dtype = tf.dtypes.as_dtype(info.dtype)
    shape = [1 if d.size < 0 else d.size for d in info.tensor_shape.dim]
    value = WARMUP_VALUES.get(name, WARMUP_PIXEL if dtype.is_floating else 0)
    return np.full(shape, value, dtype.as_numpy_dtype)
