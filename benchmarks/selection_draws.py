"""Held-out choice of the statistics of early stopping: simultaneous, or Cohen's with s
selection draws.

    python benchmarks/selection_draws.py --model=runs/bench/stn_demo/model.keras \
        --dataset=mnist_subset --sigma=0.5 --target_radius=0.5 --images=200:400 \
        --output_json=runs/tune30/stn_heldout.json

Certifies the test images ``--images`` (held out: not the first 200 that
``benchmarks/bench.py`` section 7 reports) with early stopping at ``--target_radius``
(`tfcert.sequential.certify_sequential`, the default mixture rule, at most
``--max_samples`` draws, α = ``--alpha``, seed 2), once with the simultaneous statistics
and once with Cohen's for each ``--selection`` count s of selection draws, and prints the
mean samples per image (the selection draws included) and the certified accuracy at the
target (first of ``--bounds``).  Cohen's statistics bound one class at the look's level
instead of every class on both sides at α/(2k), so clear images stop sooner; the table
shows what the s selection draws cost and what certificates ``p2_upper = 1 − p1_lower``
gives up.
"""

from __future__ import annotations

import json
import time

from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained classifier (.keras).")
flags.DEFINE_string("dataset", "mnist_subset", "Dataset whose test images are certified.")
flags.DEFINE_float("sigma", None, "Noise σ (the model's training σ).")
flags.DEFINE_float("target_radius", 0.5, "Target radius of early stopping.", lower_bound=0.0)
flags.DEFINE_string("images", "200:400", "Test images start:stop (held out from the "
                    "benchmark's first 200).")
flags.DEFINE_list("selection", ["1", "2", "4", "8", "16", "32", "100"],
                  "Selection draws s of the runs with Cohen's statistics.")
flags.DEFINE_list("bounds", ["renyi", "cohen"], "Radii; the first meets the target.")
flags.DEFINE_integer("max_samples", 10_000, "Most draws per image.", lower_bound=1)
flags.DEFINE_float("alpha", 0.001, "α of the certificates.")
flags.DEFINE_string("output_json", None, "Also write the table to this JSON file.")
SEED = 2


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}")
    cli.require(FLAGS.model is not None and FLAGS.sigma is not None,
                "--model and --sigma are required")
    start, stop = (int(v) for v in FLAGS.images.split(":"))
    import numpy as np

    from tfcert import data
    from tfcert.layers import GaussianNoise
    from tfcert.sequential import StoppingRule, certify_sequential
    from tfcert.smoothing import SmoothedClassifier

    x, y = data.load_arrays(FLAGS.dataset, "test")
    x, y = x[start:stop], y[start:stop]
    smoothed = SmoothedClassifier(cli.load_model(FLAGS.model),
                                  data.info(FLAGS.dataset).num_classes, GaussianNoise(FLAGS.sigma))
    rule = StoppingRule(FLAGS.target_radius)
    print(f"{FLAGS.dataset} test images {start}-{stop - 1}, σ = {FLAGS.sigma}, target r = "
          f"{FLAGS.target_radius} ({FLAGS.bounds[0]}), α = {FLAGS.alpha}, mixture, seed {SEED}")
    print(f"    {'statistics':22s} {'samples/image':>13s} {'cert. acc. at r':>15s} {'seconds':>8s}")
    out = {}
    for statistics, selection in [("simultaneous", 1)] + [("cohen", int(s))
                                                          for s in FLAGS.selection]:
        began = time.perf_counter()
        cert = certify_sequential(smoothed, x, FLAGS.max_samples, rule, FLAGS.alpha,
                                  FLAGS.bounds, statistics, selection, seed=SEED,
                                  indices=np.arange(start, stop))
        name = statistics if statistics == "simultaneous" else f"cohen, s = {selection}"
        out[name] = {"mean_samples": float(cert.num_samples.mean()),
                     "certified_accuracy": float(np.mean((cert.prediction == y) &
                                                         (cert.radius >= FLAGS.target_radius))),
                     "seconds": time.perf_counter() - began}
        print(f"    {name:22s} {out[name]['mean_samples']:13.1f} "
              f"{100 * out[name]['certified_accuracy']:14.1f}% {out[name]['seconds']:8.1f}",
              flush=True)
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump({"flags": cli.script_flags(), "runs": out}, f, indent=2)


if __name__ == "__main__":
    cli.run(run)
