"""Latency of the exported early-stopping signature against the fixed-n one.

    python benchmarks/export_latency.py --model=runs/bench/stn_demo/model.keras \
        --dataset=mnist_subset --sigma=0.5 --target_radius=0.5 \
        --output_json=runs/bench/export_latency_stn.json

Exports the smoothed classifier once per ``--methods`` value (``--num_samples`` n, the
early-stopping rule `tfcert.sequential.StoppingRule(0, method)` with the library's
schedule, or ``method:first_look:growth``) and ``--target_statistics`` value, loads
every export in this process (``tf.saved_model.load``: the graph TF Serving runs,
without its RPC layer) and sends the same requests to ``certify_seeded`` (fixed n, from
the first export) and to each export's ``certify_target_seeded`` (target
``--target_radius``), interleaved (every signature
answers request r before any answers request r + 1, so all see the same machine load),
after one warm-up request of each shape per signature:

* single-image requests: test image i alone with seed i, i < ``--single_requests``;
* batches of ``--batch_size`` images: request r holds images ``r·B … r·B + B − 1``
  (after the single ones) with their indices as seeds, r < ``--batch_requests``.

Reported per signature and request kind: median and mean latency, the ratio of the
median to ``certify_seeded``'s, draws per image, certified accuracy at the target, the
looks a request ran (up to its last image's stop), and the cost of one look besides its
draws: the median time of the compiled `tfcert.sequential.look` (the function every look
of the graph runs: the certificate's bisections, the futility rule, the radius searches)
on the votes of the request's images after the first look, undecided, i.e. with the
futility rule evaluated.  Without ``--model`` the
digits small_cnn is trained first, with Gaussian noise of σ = ``--sigma`` (``tfcert-train
--dataset=digits --model=small_cnn --method=gaussian --epochs=10``, seed 0, through
`tfcert.runs.train`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Base classifier (.keras, logits); default: small_cnn "
                    "trained on digits with Gaussian noise of --sigma.")
flags.DEFINE_string("dataset", "digits", "Test images (tfcert.data name).")
flags.DEFINE_float("sigma", 0.25, "σ of the Gaussian noise.")
flags.DEFINE_float("target_radius", 0.1, "Target ℓ2 radius of every certify_target request.")
flags.DEFINE_integer("num_samples", 10_000, "n of both signatures.", lower_bound=1)
flags.DEFINE_float("alpha", 0.001, "Failure probability α.")
flags.DEFINE_list("methods", ["mixture", "checkpoints"], "Early-stopping rules, one export "
                  "each: a method of tfcert.sequential.METHODS with the library's schedule, "
                  "or method:first_look:growth (e.g. mixture:100:2).")
flags.DEFINE_list("target_statistics", ["simultaneous"], "Statistics of certify_target, "
                  "one export per method and statistics: simultaneous and/or cohen (with "
                  "--target_selection_samples selection draws).")
flags.DEFINE_integer("target_selection_samples", 8, "Selection draws of the exports with "
                     "Cohen's statistics.", lower_bound=1)
flags.DEFINE_integer("single_requests", 20, "Single-image requests.", lower_bound=1)
flags.DEFINE_integer("batch_requests", 3, "Batch requests.", lower_bound=0)
flags.DEFINE_integer("batch_size", 20, "Images per batch request.", lower_bound=1)
flags.DEFINE_string("output_json", None, "Also write every number to this JSON file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from absl import logging

    from tfcert import cli

    cli.import_tensorflow_quietly()
    logging.set_verbosity(logging.WARNING)  # SavedModel writing logs every signature
    import numpy as np
    import tensorflow as tf

    from tfcert import data, export
    from tfcert.layers import GaussianNoise
    from tfcert.smoothing import SmoothedClassifier

    meta = data.info(FLAGS.dataset)
    model = cli.load_model(FLAGS.model or _trained_digits_model(FLAGS.sigma))
    smoothed = SmoothedClassifier(model, meta.num_classes, GaussianNoise(FLAGS.sigma))
    x, y = data.load_arrays(FLAGS.dataset, "test")
    single = [(np.arange(i, i + 1)) for i in range(FLAGS.single_requests)]
    start = FLAGS.single_requests
    batches = [np.arange(start + r * FLAGS.batch_size, start + (r + 1) * FLAGS.batch_size)
               for r in range(FLAGS.batch_requests)]
    report = {"command": " ".join(["python benchmarks/export_latency.py", *sys.argv[1:]]),
              "model": FLAGS.model or f"digits small_cnn, gaussian σ = {FLAGS.sigma}",
              "dataset": FLAGS.dataset, "sigma": FLAGS.sigma,
              "target_radius": FLAGS.target_radius, "num_samples": FLAGS.num_samples,
              "alpha": FLAGS.alpha, "load_before": os.getloadavg()[0], "results": {}}
    with tempfile.TemporaryDirectory() as folder:
        signatures, looks = {}, {}
        for index, (method, statistics) in enumerate(
                (m, s) for m in FLAGS.methods for s in FLAGS.target_statistics):
            path = os.path.join(folder, str(index))
            config = export.export_saved_model(
                smoothed, path, FLAGS.num_samples, FLAGS.alpha, early_stopping=_rule(method),
                target_statistics=statistics,
                target_selection_samples=FLAGS.target_selection_samples)
            loaded = tf.saved_model.load(path).signatures
            if not signatures:
                signatures["certify_seeded"] = _request(loaded["certify_seeded"], x)
                report["pass_size"] = config.pass_size
            name = f"certify_target_seeded ({method}" + (
                f", cohen s = {config.target_selection_samples})" if statistics == "cohen" else ")")
            signatures[name] = _request(loaded["certify_target_seeded"], x, FLAGS.target_radius)
            looks[name] = config
        for kind, requests in (("single image", single), (f"batch of {FLAGS.batch_size}", batches)):
            if not requests:
                continue
            timings = _interleaved(signatures, requests)
            fixed_median = float(np.median(timings["certify_seeded"][0]))
            rows = {name: _row(seconds, answers, requests, y, fixed_median)
                    for name, (seconds, answers) in timings.items()}
            for name, config in looks.items():
                rows[name].update(_look_cost(smoothed, config, x[requests[0]], timings[name][1]))
            report["results"][kind] = rows
            _print(kind, rows)
    report["load_end"] = os.getloadavg()[0]
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {FLAGS.output_json}")


def _trained_digits_model(sigma: float) -> str:
    """The .keras file of small_cnn trained on digits with Gaussian noise of σ = ``sigma``
    (kept in runs/bench/, trained once)."""
    from tfcert import runs

    output_dir = os.path.join("runs", "bench", f"digits_small_cnn_gaussian_{sigma:g}")
    path = os.path.join(output_dir, "model.keras")
    if not os.path.exists(path):
        runs.train(runs.TrainConfig(dataset="digits", model="small_cnn", method="gaussian",
                                    sigma=sigma, epochs=10, seed=0, output_dir=output_dir,
                                    verbose="0"))
    return path


def _rule(spec: str):
    """The `StoppingRule` of a ``--methods`` entry (target 0: each request brings one)."""
    from tfcert.sequential import StoppingRule

    method, *schedule = spec.split(":")
    if schedule and len(schedule) != 2:
        raise app.UsageError(f"--methods entry {spec!r}: method or method:first_look:growth")
    first, growth = (int(schedule[0]), float(schedule[1])) if schedule else (None, None)
    return StoppingRule(0.0, method, first_look=first, growth=growth)


def _request(signature, x, target: float | None = None) -> Callable:
    """``request(images)``: ``signature`` on ``x[images]`` with seeds ``images``."""
    import tensorflow as tf

    def request(images) -> dict:
        extra = {} if target is None else {
            "target_radius": tf.fill([len(images)], tf.constant(target, tf.float32))}
        outputs = signature(images=tf.constant(x[images]), seed=tf.constant(images, tf.int64),
                            **extra)
        return {key: value.numpy() for key, value in outputs.items()}

    return request


def _interleaved(signatures: dict[str, Callable], requests: list) -> dict:
    """One warm-up call per signature, then request by request every signature in turn:
    name → (seconds per request, answer per request)."""
    for request in signatures.values():
        request(requests[0])
    out = {name: ([], []) for name in signatures}
    for images in requests:
        for name, request in signatures.items():
            start = time.perf_counter()
            answer = request(images)
            out[name][0].append(time.perf_counter() - start)
            out[name][1].append(answer)
    return out


def _row(seconds: list, answers: list, requests: list, labels, fixed_median: float) -> dict:
    """Latency, draws and certified accuracy of one signature's answers."""
    import numpy as np

    n = FLAGS.num_samples
    draws = np.concatenate([a.get("num_samples", np.full(len(a["prediction"]), n))
                            for a in answers])
    predictions = np.concatenate([a["prediction"] for a in answers])
    radii = np.concatenate([a["radius"] for a in answers])
    truth = labels[np.concatenate(requests)]
    return {"median_s": float(np.median(seconds)), "mean_s": float(np.mean(seconds)),
            "median_ratio": fixed_median / float(np.median(seconds)),
            "mean_draws_per_image": float(draws.mean()), "images_at_n": int(np.sum(draws >= n)),
            "certified_accuracy": float(np.mean((predictions == truth)
                                                & (radii >= FLAGS.target_radius)))}


def _look_cost(smoothed, config, images, answers: list) -> dict:
    """Looks per request, and the median seconds of one compiled `tfcert.sequential.look`
    on ``images``' votes after the first look, with the target unreached (+inf: the
    futility rule runs); under Cohen's statistics with each image's top class selected."""
    import numpy as np
    import tensorflow as tf

    from tfcert.sequential import look

    looks = np.array(config.target_looks)
    spent = config.target_selection_samples  # selection draws, in num_samples
    ran = [int(np.searchsorted(looks, a["num_samples"].max() - spent) + 1) for a in answers]
    trials = np.diff(looks, prepend=0)
    votes = smoothed.sample_counts(images, int(looks[0]), seed=0)[:, None, :]
    selected = tf.constant(votes[:, 0].argmax(axis=1), tf.int64)
    final = config.target_final_level
    step = tf.function(lambda v: look(
        config.stopping_rule(), v, trials[:1], trials[1:],
        tf.constant([config.target_levels[0], config.target_levels[-1]], tf.float64),
        tf.constant([0.0, final], tf.float64), tf.fill([len(images)], np.float64(np.inf)),
        config.sigma, ("renyi",), config.target_statistics,
        selected if config.target_statistics == "cohen" else None))
    step(votes)
    seconds = []
    for _ in range(20):
        start = time.perf_counter()
        step(votes)
        seconds.append(time.perf_counter() - start)
    return {"mean_looks": float(np.mean(ran)), "look_ms": 1e3 * float(np.median(seconds))}


def _print(kind: str, rows: dict) -> None:
    print(f"\n{kind} requests, {FLAGS.dataset}, σ = {FLAGS.sigma}, n = {FLAGS.num_samples}, "
          f"α = {FLAGS.alpha}, target r = {FLAGS.target_radius} (Rényi)")
    print(f"  {'signature':44s} {'median s':>9s} {'mean s':>8s} {'ratio':>6s} "
          f"{'draws/image':>11s} {'at n':>5s} {'cert. acc.':>10s} {'looks':>6s} "
          f"{'ms/look':>8s}")
    for name, r in rows.items():
        extra = (f"{r['mean_looks']:6.1f} {r['look_ms']:8.2f}"
                 if "mean_looks" in r else f"{'':6s} {'':8s}")
        print(f"  {name:44s} {r['median_s']:9.4f} {r['mean_s']:8.4f} {r['median_ratio']:5.1f}x "
              f"{r['mean_draws_per_image']:11.1f} {r['images_at_n']:5d} "
              f"{100 * r['certified_accuracy']:9.1f}% {extra}")


if __name__ == "__main__":
    app.run(main)
