"""REST client of a tfcert model served by TensorFlow Serving (see export/README.md).

    python export/client_rest.py --images=images.npy --seed 7 8 \
        --url=http://localhost:8501 --model=tfcert --signature=certify_seeded
    python export/client_rest.py --images=images.npy --target_radius 0.25 \
        --signature=certify_target

sends ``POST <url>/v1/models/<model>:predict`` with the images (a ``.npy`` file of float32
``[batch, H, W, C]`` in [0, 1]) and prints one JSON line per image.  Needs numpy and
requests only.  ``--local=<SavedModel dir>`` answers the same request body in-process
through ``tf.saved_model.load`` with TF Serving's JSON mapping (needs TensorFlow; no
server), which is how the request/response contract is tested here.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

import numpy as np

SIGNATURES = ("serving_default", "certify_seeded", "predict", "predict_seeded",
              "certify_target", "certify_target_seeded")


def request_body(images: np.ndarray, seeds: np.ndarray | None = None,
                 signature: str = "serving_default", form: str = "instances",
                 target_radius: np.ndarray | float | None = None) -> dict:
    """The JSON body of a TF Serving predict request.

    Args:
        images: float32 [batch, H, W, C] in [0, 1].
        seeds: int [batch], one per image, for the ``*_seeded`` signatures.
        signature: signature name (``serving_default`` certifies with fresh noise).
        form: ``instances`` (row format: one object per image) or ``inputs`` (columnar).
        target_radius: the ``certify_target*`` signatures' target radius, one per image
            (one number is used for every image).
    """
    columns: dict[str, Any] = {"images": np.asarray(images, np.float32).tolist()}
    columns.update({name: value.tolist() for name, value in
                    extra_inputs(signature, images, seeds, target_radius).items()})
    if form == "inputs":
        return {"signature_name": signature, "inputs": columns}
    if form != "instances":
        raise ValueError(f"form must be 'instances' or 'inputs', got {form!r}")
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return {"signature_name": signature, "instances": rows}


def extra_inputs(signature: str, images, seeds, target_radius) -> dict[str, np.ndarray]:
    """The inputs of ``signature`` besides ``images``: ``seed`` (int64, one per image,
    exactly for ``*_seeded``) and ``target_radius`` (float32, one per image, exactly for
    ``certify_target*``; one number is repeated for every image); `ValueError` otherwise."""
    inputs = {}
    for name, value, wanted, dtype in (
            ("seed", seeds, signature.endswith("_seeded"), np.int64),
            ("target_radius", target_radius, signature.startswith("certify_target"), np.float32)):
        if wanted != (value is not None):
            raise ValueError(f"signature {signature!r} takes " + (f"one {name} per image"
                                                                  if wanted else f"no {name}"))
        if value is None:
            continue
        value = np.asarray(value, dtype)
        if name == "target_radius" and value.ndim == 0:
            value = np.full(len(images), value, dtype)
        if value.shape != (len(images),):
            raise ValueError(f"got {value.size} {name} values for {len(images)} images")
        inputs[name] = value
    return inputs


def parse_response(body: dict) -> dict[str, np.ndarray]:
    """Output name → numpy array (batch first) from either response form; raises
    `RuntimeError` with the server's message for an error response."""
    if "error" in body:
        raise RuntimeError(body["error"])
    if "outputs" in body:
        return {name: np.asarray(values) for name, values in body["outputs"].items()}
    rows = body["predictions"]
    return {name: np.asarray([row[name] for row in rows]) for name in (rows[0] if rows else {})}


def target_values(values: list[float] | None) -> np.ndarray | float | None:
    """``--target_radius`` as given: None, one number for every image, or one per image."""
    return values[0] if values and len(values) == 1 else values


def print_rows(outputs: dict[str, np.ndarray]) -> None:
    """Prints one JSON object per image."""
    for i in range(len(next(iter(outputs.values()), []))):
        print(json.dumps({name: values[i].tolist() for name, values in sorted(outputs.items())}))


def post(url: str, model: str, body: dict, timeout: float = 600.0) -> dict:
    """Sends ``body`` to ``<url>/v1/models/<model>:predict``; returns the JSON response."""
    import requests

    endpoint = f"{url.rstrip('/')}/v1/models/{model}:predict"
    try:
        return requests.post(endpoint, json=body, timeout=timeout).json()
    except requests.RequestException as err:
        raise RuntimeError(f"POST {endpoint} failed: {err}") from err


def local_predict(saved_model_dir: str, body: dict) -> dict:
    """Answers a request body like TF Serving's REST API, without the server.

    The JSON is mapped to tensors of the signature's input dtypes (row format: the
    instances are stacked per input; columnar: each input as given), the signature is
    run, and the outputs are returned as ``predictions`` (one object per row) or
    ``outputs``.  A failed request returns ``{"error": message}`` as the server does.
    """
    _import_tensorflow_quietly()
    import tensorflow as tf

    signature = _load(saved_model_dir).signatures[body.get("signature_name", "serving_default")]
    specs = signature.structured_input_signature[1]
    if "instances" in body:
        rows = body["instances"]
        columns = ({name: [row[name] for row in rows] for name in specs}
                   if rows and isinstance(rows[0], dict) else {next(iter(specs)): rows})
    else:
        columns = body["inputs"] if isinstance(body["inputs"], dict) else {
            next(iter(specs)): body["inputs"]}
    try:
        inputs = {name: tf.constant(columns[name], specs[name].dtype) for name in specs}
        outputs = {name: value.numpy().tolist()
                   for name, value in sorted(signature(**inputs).items())}
    except (tf.errors.InvalidArgumentError, KeyError, TypeError, ValueError) as err:
        return {"error": getattr(err, "message", str(err))}
    if "instances" in body:
        return {"predictions": [dict(zip(outputs, values)) for values in zip(*outputs.values())]}
    return {"outputs": outputs}


@functools.lru_cache(maxsize=4)
def _load(saved_model_dir: str):
    import tensorflow as tf

    return tf.saved_model.load(saved_model_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help=".npy file, float32 [batch, H, W, C]")
    parser.add_argument("--seed", type=int, nargs="*", help="one seed per image (*_seeded)")
    parser.add_argument("--target_radius", type=float, nargs="*", help="certify_target*: "
                        "one target radius per image, or one for every image")
    parser.add_argument("--signature", default="serving_default", choices=SIGNATURES)
    parser.add_argument("--form", default="instances", choices=("instances", "inputs"))
    parser.add_argument("--url", default="http://localhost:8501")
    parser.add_argument("--model", default="tfcert", help="model name in models.config")
    parser.add_argument("--local", help="answer in-process from this SavedModel directory")
    args = parser.parse_args(argv)
    try:
        body = request_body(np.load(args.images), args.seed, args.signature, args.form,
                            target_values(args.target_radius))
    except ValueError as err:
        parser.error(str(err))
    try:
        outputs = parse_response(local_predict(args.local, body) if args.local
                                 else post(args.url, args.model, body))
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    print_rows(outputs)


def _import_tensorflow_quietly() -> None:
    """TensorFlow without its C++ start-up lines where tfcert is installed (else as is)."""
    try:
        from tfcert import cli
    except ImportError:
        return
    cli.import_tensorflow_quietly()


if __name__ == "__main__":
    main()
