"""gRPC client of a tfcert model served by TensorFlow Serving (see export/README.md).

    python export/client_grpc.py --images=images.npy --seed 7 8 \
        --server=localhost:8500 --model=tfcert --signature=certify_seeded
    python export/client_grpc.py --images=images.npy --target_radius 0.25 \
        --signature=certify_target

sends a ``PredictionService/Predict`` request (``tensorflow_serving.apis.PredictRequest``)
and prints one JSON line per image.  Needs ``pip install tensorflow-serving-api`` (which
brings TensorFlow and grpcio).
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
import tensorflow as tf
from client_rest import SIGNATURES, extra_inputs, print_rows, target_values  # beside this file
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


def build_request(model: str, images: np.ndarray, seeds: np.ndarray | None = None,
                  signature: str = "serving_default", version: int | None = None,
                  target_radius: np.ndarray | float | None = None):
    """A ``PredictRequest`` for ``signature`` of ``model`` (latest version unless given).

    Args:
        model: model name of models.config.
        images: float32 [batch, H, W, C] in [0, 1].
        seeds: int [batch], one per image, for the ``*_seeded`` signatures.
        signature: signature name.
        version: optional model version.
        target_radius: the ``certify_target*`` signatures' target radius, one per image
            (one number is used for every image).
    """
    extra = extra_inputs(signature, images, seeds, target_radius)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.asarray(images, np.float32)))
    for name, value in extra.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def parse_response(response) -> dict[str, np.ndarray]:
    """Output name → numpy array of a ``PredictResponse``."""
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict(server: str, request, timeout: float = 600.0):
    """Sends ``request`` to the TF Serving gRPC port ``server`` (host:port)."""
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(request, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help=".npy file, float32 [batch, H, W, C]")
    parser.add_argument("--seed", type=int, nargs="*", help="one seed per image (*_seeded)")
    parser.add_argument("--target_radius", type=float, nargs="*", help="certify_target*: "
                        "one target radius per image, or one for every image")
    parser.add_argument("--signature", default="serving_default", choices=SIGNATURES)
    parser.add_argument("--server", default="localhost:8500")
    parser.add_argument("--model", default="tfcert", help="model name in models.config")
    parser.add_argument("--version", type=int, help="model version (default: latest)")
    args = parser.parse_args(argv)
    try:
        request = build_request(args.model, np.load(args.images), args.seed, args.signature,
                                args.version, target_values(args.target_radius))
    except ValueError as err:
        parser.error(str(err))
    try:
        outputs = parse_response(predict(args.server, request))
    except grpc.RpcError as err:  # e.g. INVALID_ARGUMENT for a bad request
        sys.exit(f"error: {err.code().name}: {err.details()}")
    print_rows(outputs)


if __name__ == "__main__":
    main()
