"""Times a tfcert export the way TF Serving runs it (see export/README.md, section 3).

    python export/latency.py --export=serving/tfcert/1 --images=images.npy --batch 1 8

loads the SavedModel into a TF1 session (the server's path), replays its warmup file
``assets.extra/tf_serving_warmup_requests`` in order (what the server does at load:
the first call of each signature, cold), then times warm requests of each signature
with the first B images of the ``.npy`` file for every ``--batch`` B.  Prints JSON:
wall-clock and process CPU seconds (CPU time is the steadier number on a busy
machine).  Use it to choose ``--rest_api_timeout_in_ms`` and the batching parameters.
Needs TensorFlow and tensorflow-serving-api (for ``PredictionLog``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
TARGET_RADIUS = 0.25  # target of the timed certify_target requests (--target_radius)


class Timer:
    """Runs signatures of a SavedModel in a TF1 session and times each call."""

    def __init__(self, export_dir: str):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            self.signatures = tf.compat.v1.saved_model.load(
                self.session, ["serve"], export_dir).signature_def

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Runs ``signature`` on ``inputs`` once: ``{"wall_s": ..., "cpu_s": ...}``."""
        sig = self.signatures[signature]
        fetches = {name: info.name for name, info in sig.outputs.items()}
        feeds = {sig.inputs[name].name: value for name, value in inputs.items()}
        wall, cpu = time.perf_counter(), time.process_time()
        self.session.run(fetches, feeds)
        return {"wall_s": round(time.perf_counter() - wall, 3),
                "cpu_s": round(time.process_time() - cpu, 3)}


def warmup_requests(export_dir: str) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(signature name, inputs) of every record of the export's warmup file, in order."""
    requests = []
    for record in tf.data.TFRecordDataset(os.path.join(export_dir, WARMUP_FILE)):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        requests.append((request.model_spec.signature_name,
                         {name: tf.make_ndarray(value) for name, value in request.inputs.items()}))
    return requests


def measure(export_dir: str, images: np.ndarray, batches: list[int], repeats: int,
            target_radius: float = TARGET_RADIUS) -> dict:
    """Load time, the warmup replay (cold calls) and median warm times per signature and
    batch size (seeded signatures get seeds 0 … B − 1, certify_target ones the target
    ``target_radius`` for every image)."""
    start = time.perf_counter()
    timer = Timer(export_dir)
    report: dict = {"load_s": round(time.perf_counter() - start, 3), "warmup": {}, "warm": {}}
    for signature, inputs in warmup_requests(export_dir):
        report["warmup"][signature] = timer.run(signature, inputs)
    report["warmup_total_wall_s"] = round(sum(t["wall_s"] for t in report["warmup"].values()), 3)
    for signature in sorted(report["warmup"]):
        names = timer.signatures[signature].inputs
        for batch in batches:
            inputs = {"images": images[:batch]}
            if "seed" in names:
                inputs["seed"] = np.arange(batch, dtype=np.int64)
            if "target_radius" in names:
                inputs["target_radius"] = np.full(batch, target_radius, np.float32)
            runs = [timer.run(signature, inputs) for _ in range(repeats)]
            report["warm"][f"{signature} batch={batch}"] = {
                key: round(float(np.median([r[key] for r in runs])), 3)
                for key in ("wall_s", "cpu_s")}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="SavedModel version directory")
    parser.add_argument("--images", required=True, help=".npy file, float32 [batch, H, W, C]")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per batch size")
    parser.add_argument("--target_radius", type=float, default=TARGET_RADIUS,
                        help="target radius of the certify_target requests")
    args = parser.parse_args(argv)
    images = np.load(args.images)
    if max(args.batch) > len(images) or min(args.batch) < 1 or args.repeats < 1:
        parser.error(f"--batch must be in [1, {len(images)}] (images in --images), "
                     "--repeats >= 1")
    print(json.dumps(measure(args.export, images, args.batch, args.repeats,
                             args.target_radius), indent=1))


if __name__ == "__main__":
    main()
