"""Benchmark suite: how fast tfcert certifies, and what bfloat16 and early stopping change.

    python benchmarks/bench.py --model=runs/demo/train/model.keras --output_json=runs/bench.json

Prints a report (docs/PERFORMANCE.md shows one with the machine it ran on):

1. machine: CPU model, cores, SIMD flags (AVX-512 / AMX / BF16), native bfloat16 or
   not (`tfcert.devices.native_bfloat16`), TensorFlow/Keras versions, load average;
2. sampling throughput on the STN MNIST CNN (noisy samples per second), every method
   at the same pass size, interleaved in rounds so that each round's ratios to the bare
   model are measured under the same load (the machine may be shared):
   bare float32 / bfloat16 forward pass (a compiled ``model(x)`` on a fixed batch),
   `SmoothedClassifier.sample_counts` in float32 and bfloat16, ART's
   ``TensorFlowV2RandomizedSmoothing.certify`` (if installed), and a naive loop (one
   eager model call per noisy sample);
3. `sample_counts` throughput at the calibrated default pass size (`tfcert.pass_sizes`),
   at every candidate size and at the memory heuristic's, next to ART's certify; then a
   paired check of the default against the fastest other size (``--verify_rounds``
   fresh rounds, a 95% interval of the ratio: within 1% of the best or not);
4. training cost of every objective (standard, gaussian, stn, consistency, macer,
   smoothadv, pgd, trades): seconds per step and per epoch, and the ratio to standard;
5. radius computation time for 10,000 images;
6. export signature latency for one image at n = 1,000 and 10,000 (if
   `tfcert.export` is importable);
7. with a trained model: bfloat16 vs float32 certificates on the same noise (paired
   seeds), and early stopping (`tfcert.sequential`, every method) vs one fixed-n run at
   a target radius on the same images and seed (``--early_*`` flags: any model and
   dataset, e.g. digits).

The latency of the exported early-stopping signatures is measured by
``benchmarks/export_latency.py``.

``--sections`` runs some of them (e.g. ``--sections=certification``: section 7 alone);
``--quick`` shrinks every workload (a smoke test, not a measurement).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable
from unittest import mock

from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "runs/demo/train/model.keras",
                    "Trained STN MNIST model (.keras) for section 7; throughput sections use "
                    "it too.  If the file is missing, an untrained stn_mnist is used for the "
                    "throughput and section 7 is skipped.")
flags.DEFINE_float("sigma", 0.5, "Noise σ (the model's training σ for section 7).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds of the throughput comparisons.",
                     lower_bound=1)
flags.DEFINE_integer("verify_rounds", 30, "Section 3: rounds of the paired check of the "
                     "default pass size against the sweep's best other size.", lower_bound=3)
flags.DEFINE_integer("passes", 32, "Full passes per method and round in section 2.",
                     lower_bound=1)
flags.DEFINE_integer("pass_size", None, "Noisy inputs per pass (default: the automatic size).")
flags.DEFINE_integer("naive_samples", 64, "Noisy samples of the naive per-sample loop.",
                     lower_bound=1)
flags.DEFINE_integer("num_images", 100, "Test images of the bfloat16 comparison of section 7.",
                     lower_bound=1)
flags.DEFINE_integer("num_samples", 2000, "n of the bfloat16 comparison of section 7.",
                     lower_bound=1)
flags.DEFINE_bool("precision_comparison", True, "Section 7 compares bfloat16 with float32 "
                  "certificates (before the early-stopping table).")
flags.DEFINE_float("target_radius", 0.5, "Section 7 early stopping: target radius (first of "
                   "--early_bounds).", lower_bound=0.0)
flags.DEFINE_string("early_model", None, "Section 7 early stopping: model (default: --model).")
flags.DEFINE_string("early_dataset", "mnist_subset", "Section 7 early stopping: dataset whose "
                    "first --early_images test images are certified.")
flags.DEFINE_float("early_sigma", None, "Section 7 early stopping: σ (default: --sigma).")
flags.DEFINE_integer("early_images", 200, "Section 7 early stopping: test images.", lower_bound=1)
flags.DEFINE_integer("early_max_samples", 10_000, "Section 7 early stopping: n of the fixed-n "
                     "reference run, and the most samples per image of early stopping.",
                     lower_bound=1)
flags.DEFINE_integer("wald_samples", 100_000, "Section 7 early stopping: draws per image of "
                     "the estimate of each image's top-class probability p (the fixed-n run's "
                     "draws continued) behind Wald's bound.", lower_bound=1)
flags.DEFINE_list("early_methods", ["mixture", "betting", "checkpoints"],
                  "Section 7 early stopping: methods (tfcert.sequential.METHODS).")
flags.DEFINE_enum("early_statistics", "simultaneous", ["simultaneous", "cohen"],
                  "Section 7 early stopping: statistics of every run.")
flags.DEFINE_integer("early_selection_samples", 100, "Section 7 early stopping, "
                     "--early_statistics=cohen: selection draws per image of the early-stopping "
                     "runs (counted in their samples); the fixed-n run keeps Cohen's n0 = 100.",
                     lower_bound=1)
flags.DEFINE_list("early_bounds", ["renyi", "cohen"], "Section 7 early stopping: radii; the "
                  "first is compared with --target_radius.")
flags.DEFINE_float("alpha", 0.001, "α of the certificates.")
flags.DEFINE_list("export_samples", ["1000", "10000"], "n of the export latency rows.")
SECTIONS = ("sampling", "pass_sizes", "training", "bounds", "export", "certification")
flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {', '.join(SECTIONS)} "
                  "(2-7 above; the machine report always comes first).")
flags.DEFINE_bool("quick", False, "Tiny workloads: checks that every section runs.")
flags.DEFINE_string("output_json", None, "Also write every number to this JSON file.")

IMAGE_SHAPE = (28, 28, 1)
EARLY_STOPPING_SEED = 2  # noise seed of every run of the early-stopping table


def main(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}")
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    cli.require(not unknown, f"unknown --sections {unknown}; choose from {list(SECTIONS)}")
    if FLAGS.quick:
        for name, value in (("rounds", 1), ("verify_rounds", 3), ("passes", 1),
                            ("naive_samples", 8), ("num_images", 6), ("num_samples", 200),
                            ("pass_size", 64),
                            ("export_samples", ["200"])):
            setattr(FLAGS, name, value)
    report: dict = {"command": " ".join(["python benchmarks/bench.py", *sys.argv[1:]]),
                    "machine": machine()}
    _print_machine(report["machine"])
    model, trained = _model()
    report["model"] = FLAGS.model if trained else "untrained stn_mnist"
    sections: dict[str, Callable] = {
        "sampling": lambda: sampling_throughput(model),
        "pass_sizes": lambda: pass_size_throughput(model),
        "training": training_steps,
        "bounds": bound_speed,
        "export": lambda: export_latency(model),
        "certification": lambda: certification(model),
    }
    # Section 7 needs the trained --model, except for early stopping alone on --early_model.
    certifiable = trained or (FLAGS.early_model and not FLAGS.precision_comparison)
    if not certifiable and "certification" in FLAGS.sections:
        print(f"\n[7] skipped: {FLAGS.model} not found; train one with\n    python train.py "
              "--dataset=mnist_subset --method=stn --sigma=0.5 --epochs=3 "
              "--output_dir=/tmp/perf_model")
    for name in SECTIONS:
        if name in FLAGS.sections and (certifiable or name != "certification"):
            report[name] = {"load_before": os.getloadavg()[0], **sections[name]()}
    report["load_end"] = os.getloadavg()
    if FLAGS.output_json:
        with open(FLAGS.output_json, "w") as f:
            json.dump(report, f, indent=2, default=float)
        print(f"\nwrote {FLAGS.output_json}")


# ------------------------------------------------------------------------- helpers
def machine() -> dict:
    """CPU model, cores, SIMD flags, native bfloat16, library versions, load."""
    import keras
    import tensorflow as tf

    from tfcert.devices import cpu_flags, native_bfloat16

    model_name = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                           if line.startswith("Model name")), model_name)
    except (OSError, subprocess.CalledProcessError):
        pass
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f == "bf16")
    return {"cpu": model_name, "cores": os.cpu_count(), "simd_flags": simd,
            "native_bfloat16": native_bfloat16(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "load_average_start": os.getloadavg()}


def _print_machine(info: dict) -> None:
    print(f"[1] machine: {info['cpu']}, {info['cores']} cores, SIMD {' '.join(info['simd_flags'])}"
          f"\n    native bfloat16: {info['native_bfloat16']}, GPUs: {info['gpus'] or 'none'}, "
          f"TensorFlow {info['tensorflow']}, Keras {info['keras']}, load average "
          f"{' '.join(f'{v:.2f}' for v in info['load_average_start'])}")


def _model():
    """(model, trained?): the --model file, else an untrained STN MNIST CNN."""
    from tfcert.models import stn_mnist

    if os.path.exists(FLAGS.model):
        return cli.load_model(FLAGS.model), True
    return stn_mnist(IMAGE_SHAPE, 10), False


def _test_images(count: int):
    from tfcert import data

    x, y = data.load_arrays("mnist_subset", "test")
    return x[:count], y[:count]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(work: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict:
    """Runs each ``name: (fn, samples)`` once per round, in a random order per round
    (seeded: no entry always runs first or after the same one); after a warm-up call.

    Returns per name: samples/s per round, the median, the median over rounds of the
    ratio to the first entry's rate in the same round (same load), and, from 3 rounds
    on, the geometric mean of those ratios with its 95% Student-t interval (of the mean
    log ratio; the rounds are taken as independent pairs).
    """
    import numpy as np
    from scipy import stats

    for fn, _ in work.values():
        fn()
    seconds = {name: [] for name in work}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for name in order.permutation(list(work)):
            seconds[name].append(_timed(work[name][0]))
    reference = next(iter(work))
    ref_rate = work[reference][1] / np.array(seconds[reference])
    out = {}
    for name, (_, samples) in work.items():
        rate = samples / np.array(seconds[name])
        logs = np.log(rate / ref_rate)
        out[name] = {"samples_per_s": rate.tolist(), "median_samples_per_s": float(np.median(rate)),
                     "ratio_to_reference": float(np.exp(np.median(logs)))}
        if rounds >= 3 and name != reference:
            half = stats.t.ppf(0.975, rounds - 1) * logs.std(ddof=1) / np.sqrt(rounds)
            out[name].update(geometric_mean_ratio=float(np.exp(logs.mean())),
                             ratio_interval_95=[float(np.exp(logs.mean() - half)),
                                                float(np.exp(logs.mean() + half))])
    return out


def _print_rates(title: str, rates: dict, reference: str) -> None:
    print(f"\n{title}")
    print(f"    {'method':44s} {'samples/s (median)':>18s}  {'per round':24s} ratio to {reference}")
    for name, r in rates.items():
        rounds = " ".join(f"{v:.0f}" for v in r["samples_per_s"])
        print(f"    {name:44s} {r['median_samples_per_s']:18.1f}  {rounds:24s} "
              f"{r['ratio_to_reference']:.3f}")


# ------------------------------------------------------------------------ sections
def sampling_throughput(model) -> dict:
    """[2] noisy samples/s of every sampling method at one pass size."""
    import numpy as np
    import tensorflow as tf

    from tfcert.layers import GaussianNoise
    from tfcert.smoothing import SmoothedClassifier

    sigma = FLAGS.sigma
    f32 = SmoothedClassifier(model, 10, GaussianNoise(sigma), batch_size=FLAGS.pass_size)
    size = f32.pass_size(IMAGE_SHAPE)
    bf16 = SmoothedClassifier(model, 10, GaussianNoise(sigma), batch_size=size,
                              compute_dtype="bfloat16")
    images, _ = _test_images(FLAGS.passes)
    samples = FLAGS.passes * size  # images x size draws = `passes` full passes
    batch = tf.constant(np.resize(images, (size, *IMAGE_SHAPE)))

    def bare(m):
        forward = tf.function(lambda x: m(x, training=False))
        return lambda: [forward(batch).numpy() for _ in range(FLAGS.passes)]

    work = {
        "bare model float32 (compiled model(x))": (bare(model), samples),
        "tfcert sample_counts float32": (lambda: f32.sample_counts(images, size), samples),
        "bare model bfloat16": (bare(bf16.inference_model), samples),
        "tfcert sample_counts bfloat16": (lambda: bf16.sample_counts(images, size), samples),
    }
    art_status = _art_work(model, images[:max(1, samples // 1000)], sigma, work)
    rng = np.random.default_rng(0)

    def naive():  # one eager forward pass per noisy sample, votes on the host
        votes = np.zeros(10, np.int64)
        for i in range(FLAGS.naive_samples):
            noisy = images[i % len(images)][None] + rng.normal(0, sigma, (1, *IMAGE_SHAPE))
            votes[int(np.argmax(model(noisy.astype(np.float32), training=False)))] += 1
        return votes

    work["naive loop (eager call per sample)"] = (naive, FLAGS.naive_samples)
    rates = _interleaved(work, FLAGS.rounds)
    _print_rates(f"[2] sampling throughput, STN MNIST CNN, pass size {size} "
                 f"({FLAGS.rounds} interleaved rounds)", rates, "bare float32")
    if art_status:
        print(f"    ART: {art_status}")
    return {"pass_size": size, "rates": rates, "art": art_status or "measured"}


def _art_work(model, images, sigma: float, work: dict) -> str | None:
    """Adds ART's certify of ``images`` at n0 + n = 32 + 968 = 1,000 draws per image to
    ``work`` (ART 1.20 classifies each image's n draws in one call, ignoring
    ``batch_size``); returns why it is not measured, if not."""
    try:
        from art.estimators.certification.randomized_smoothing import \
            TensorFlowV2RandomizedSmoothing
        import statsmodels  # noqa: F401  (ART's certify imports it lazily)
    except ImportError as err:
        return (f"not measured: {err} (pip install adversarial-robustness-toolbox "
                "statsmodels)")
    selection = 32  # ART's default sample_size: n0 selection draws per image
    smoothed = TensorFlowV2RandomizedSmoothing(
        model=model, nb_classes=10, input_shape=IMAGE_SHAPE, clip_values=(0.0, 1.0),
        sample_size=selection, scale=sigma, alpha=FLAGS.alpha)
    work["ART TensorFlowV2RandomizedSmoothing.certify"] = (
        lambda: smoothed.certify(images, n=1000 - selection, batch_size=1000),
        len(images) * 1000)
    return None


def pass_size_throughput(model) -> dict:
    """[3] `sample_counts` samples/s at the calibrated default pass size, at every
    candidate size, at the memory heuristic's size, and ART's certify, interleaved;
    then the paired check of the default against the sweep's best other size
    (`_within_one_percent`).

    The default is calibrated afresh (an empty temporary ``TFCERT_CACHE_DIR``), by the
    first ``sample_counts`` call as a user's would; that call's time is reported too.
    """
    import numpy as np

    from tfcert import pass_sizes
    from tfcert.layers import GaussianNoise
    from tfcert.smoothing import SmoothedClassifier

    noise = GaussianNoise(FLAGS.sigma)
    images, _ = _test_images(8)
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(
            os.environ, {pass_sizes.CACHE_DIR_ENV: cache, pass_sizes.MODE_ENV: "calibrate"}):
        default = SmoothedClassifier(model, 10, noise)
        memory_size = default.pass_size(IMAGE_SHAPE)
        chunks = default.calibration_chunks(IMAGE_SHAPE, len(images))
        sizes, draws = list(chunks), pass_sizes.calibration_draws(chunks.values())
        calibration_seconds = _timed(lambda: default.sample_counts(images, draws))
        chosen = default.pass_size(IMAGE_SHAPE)
    per_image = 128 if FLAGS.quick else 1024  # 8,192 draws per measurement

    def counts_at(size: int | None) -> tuple[Callable[[], object], int]:
        """A measurement of ``sample_counts`` at ``size`` (None: the default)."""
        return lambda: default.sample_counts(images, per_image, size), len(images) * per_image

    work = {f"default (calibrated: {chosen})": counts_at(None)}
    labels = {size: f"pass size {size}" + (" (memory heuristic)" if size == memory_size else "")
              for size in sorted({*sizes, memory_size})}
    work.update({label: counts_at(size) for size, label in labels.items()})
    art_status = _art_work(model, images[:max(1, len(images) * per_image // 1000)],
                           FLAGS.sigma, work)
    rates = _interleaved(work, FLAGS.rounds)
    relative = {name: r["ratio_to_reference"] for name, r in rates.items()}  # same rounds
    best = max((name for name in relative if name.startswith("pass size")), key=relative.get)
    _print_rates(f"[3] sample_counts throughput per pass size, STN MNIST CNN, 8 images x "
                 f"{per_image} draws ({FLAGS.rounds} interleaved rounds)", rates, "default")
    default_rate = rates[next(iter(work))]["median_samples_per_s"]
    print(f"    default / best ({best}), median of per-round ratios: {1 / relative[best]:.3f}; "
          f"calibration: {calibration_seconds:.1f} s for {len(images) * draws} draws "
          f"(the first call's own; at the default's rate {len(images) * draws / default_rate:.1f} s)")
    if art_status:
        print(f"    ART: {art_status}")
    challenger = max((size for size in labels if size != chosen),
                     key=lambda size: relative[labels[size]])
    verify = _within_one_percent(counts_at, chosen, challenger)
    return {"rates": rates, "memory_size": memory_size, "calibrated": chosen,
            "candidates": sizes, "best": best, "calibration_seconds": calibration_seconds,
            "calibration_draws": len(images) * draws, "art": art_status or "measured",
            "verify": verify}


def _within_one_percent(counts_at: Callable, chosen: int, challenger: int) -> dict:
    """[3] Is the default pass size within 1% of the best?  ``--verify_rounds`` fresh
    rounds of the default and the sweep's fastest other size (``challenger``), in random
    order per round: the 95% interval of the challenger's speed over the default's
    decides: at most 1.01 = within 1% (verified), above 1.01 = not within, else
    undecided at this machine's noise.  Fresh rounds, so the sweep's luck in picking
    the challenger does not bias it.  ``counts_at(size)``: a measurement at ``size``
    (None: the default)."""
    work = {f"default (calibrated: {chosen})": counts_at(None),
            f"pass size {challenger} (sweep's best other)": counts_at(challenger)}
    rates = _interleaved(work, FLAGS.verify_rounds)
    other = rates[list(work)[1]]
    low, high = other["ratio_interval_95"]
    verdict = ("verified: within 1%" if high <= 1.01 else
               "not within 1%" if low > 1.01 else "undecided at this noise")
    print(f"    paired check, {FLAGS.verify_rounds} rounds: pass size {challenger} / default "
          f"{other['geometric_mean_ratio']:.4f} (95% interval {low:.4f}-{high:.4f}): "
          f"{verdict}")
    return {"rates": rates, "challenger": challenger, "verdict": verdict}


def training_steps() -> dict:
    """[4] training cost of every objective: seconds per step (batch 128, stn_mnist) and
    per 4,000-image epoch (mnist_subset's train split), each at its class defaults, σ."""
    import keras

    from tfcert import adversarial_training, models, training

    x, y = _test_images(128)
    steps = 1 if FLAGS.quick else 4
    work = {}
    for method in (*training.TRAINING_METHODS, *adversarial_training.ADVERSARIAL_METHODS):
        keras.utils.set_random_seed(0)
        base = models.stn_mnist(IMAGE_SHAPE, 10)
        model = (adversarial_training.wrap(base, method, eps=0.3, seed=0)
                 if method in adversarial_training.ADVERSARIAL_METHODS
                 else training.wrap(base, method, FLAGS.sigma, seed=0))
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        work[method] = (lambda model=model: [model.train_on_batch(x, y) for _ in range(steps)],
                        128 * steps)
    rates = _interleaved(work, FLAGS.rounds)
    print(f"\n[4] training cost per objective (stn_mnist, batch 128, σ = {FLAGS.sigma}, class "
          "defaults; median of rounds)")
    print(f"    {'method':12s} {'s/step':>8s} {'s/epoch (4,000 images)':>24s} {'x standard':>11s}")
    out = {}
    for name, r in rates.items():
        step = 128 / r["median_samples_per_s"]
        out[name] = {"seconds_per_step": step, "seconds_per_4000_images": step * 4000 / 128,
                     "times_standard": 1.0 / r["ratio_to_reference"]}
        print(f"    {name:12s} {step:8.3f} {step * 4000 / 128:24.1f} "
              f"{out[name]['times_standard']:11.2f}")
    return {"rates": rates, "objectives": out}


def bound_speed() -> dict:
    """[5] seconds to compute each radius for 10,000 (p1, p2) pairs (best of 3)."""
    import numpy as np

    from tfcert import bounds

    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.5, 1.0, 10_000)
    p2 = (1.0 - p1) * rng.uniform(0.0, 1.0, 10_000)
    out = {}
    for name in ("renyi_radius", "cohen_radius", "pixeldp_radius"):
        fn = getattr(bounds, name)
        fn(p1[:10], p2[:10], 1.0)
        out[name] = min(_timed(lambda: np.asarray(fn(p1, p2, 1.0))) for _ in range(3))
    print("\n[5] radii for 10,000 images: " + ", ".join(f"{k} {v:.3f} s" for k, v in out.items()))
    return out


def export_latency(model) -> dict:
    """[6] serving_default latency for one image (best of 3 calls after a warm-up)."""
    import tensorflow as tf

    try:
        from tfcert import export
    except ImportError as err:
        print(f"\n[6] export latency: skipped, tfcert.export not importable ({err})")
        return {"skipped": str(err)}
    from tfcert.layers import GaussianNoise
    from tfcert.smoothing import SmoothedClassifier

    smoothed = SmoothedClassifier(model, 10, GaussianNoise(FLAGS.sigma))
    image = tf.constant(_test_images(1)[0])
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for n in (int(v) for v in FLAGS.export_samples):
            path = os.path.join(folder, str(n))
            export.export_saved_model(smoothed, path, n, FLAGS.alpha)
            signature = tf.saved_model.load(path).signatures["serving_default"]
            signature(images=image)
            calls = 1 if n > 5000 else 3
            seconds = min(_timed(lambda: signature(images=image)["radius"].numpy())
                          for _ in range(calls))
            out[n] = {"seconds": seconds, "samples_per_s": n / seconds}
    print("\n[6] export serving_default, one image: " + ", ".join(
        f"n = {n}: {v['seconds']:.2f} s ({v['samples_per_s']:.0f} samples/s)"
        for n, v in out.items()) + f" (pass size {smoothed.pass_size(IMAGE_SHAPE)})")
    return {"latency": out, "calls": "best of 3 (1 for n > 5000)"}


def certification(model) -> dict:
    """[7] trained model: bfloat16 vs float32 certificates (``--precision_comparison``),
    then early stopping (every method of ``--early_methods``) vs one fixed-n run."""
    out = {"precision": precision_comparison(model)} if FLAGS.precision_comparison else {}
    early = cli.load_model(FLAGS.early_model) if FLAGS.early_model else model
    return {**out, "early_stopping": early_stopping_comparison(early)}


def precision_comparison(model) -> dict:
    """[7] bfloat16 vs float32 certificates of the same images on the same noise."""
    import numpy as np

    from tfcert.layers import GaussianNoise
    from tfcert.smoothing import SmoothedClassifier

    x, y = _test_images(FLAGS.num_images)
    n, alpha, target = FLAGS.num_samples, FLAGS.alpha, FLAGS.target_radius
    runs, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        smoothed = SmoothedClassifier(model, 10, GaussianNoise(FLAGS.sigma), compute_dtype=dtype)
        start = time.perf_counter()
        runs[dtype] = smoothed.certify(x, n, alpha, ("renyi", "cohen"), seed=1)
        seconds[dtype] = time.perf_counter() - start
    f32, bf16 = runs["float32"], runs["bfloat16"]
    accuracy = {k: float(np.mean((c.prediction == y) & (c.radius >= target)))
                for k, c in runs.items()}
    flipped = np.abs(bf16.counts - f32.counts).sum() / 2 / f32.counts.sum()
    out = {
        "images": len(x), "num_samples": n, "alpha": alpha, "sigma": FLAGS.sigma,
        "target_radius": target, "seconds": seconds,
        "samples_per_s": {k: float(runs[k].num_samples.sum() / seconds[k]) for k in runs},
        "certified_accuracy_at_target": accuracy,
        "prediction_agreement": float(np.mean(bf16.prediction == f32.prediction)),
        "votes_changed": float(flipped),
        "mean_abs_radius_change": float(np.mean(np.abs(bf16.radius - f32.radius))),
        "max_abs_radius_change": float(np.max(np.abs(bf16.radius - f32.radius))),
        "mean_radius": {"float32": float(f32.radius.mean()), "bfloat16": float(bf16.radius.mean())},
    }
    print(f"\n[7] trained model, {len(x)} test images, n = {n}, α = {alpha}, σ = {FLAGS.sigma}")
    print(f"    float32 certify  {seconds['float32']:7.1f} s, certified accuracy at r = "
          f"{target} (Rényi) {100 * accuracy['float32']:.1f}%")
    print(f"    bfloat16 certify {seconds['bfloat16']:7.1f} s, certified accuracy "
          f"{100 * accuracy['bfloat16']:.1f}%; same noise as float32: predictions agree "
          f"{100 * out['prediction_agreement']:.1f}%, votes changed "
          f"{100 * out['votes_changed']:.2f}%, |Δ radius| mean {out['mean_abs_radius_change']:.4f}"
          f" max {out['max_abs_radius_change']:.4f}")
    return out


def early_stopping_comparison(model) -> dict:
    """[7] early stopping at ``--target_radius`` with each method vs a fixed-n run, and
    Wald's bound.

    Every run certifies the same ``--early_images`` test images with the same seed, so a
    sequential run's first n votes of an image are the fixed run's first n.  Rows: mean
    samples per image (selection draws included), its ratio to the fixed run and to
    Wald's bound, certified accuracy at the target (first bound) and its difference to
    the fixed run in percentage points, images that used every sample, seconds (shared
    machine: compare samples, not seconds).  Then the samples by class of image
    (`_image_classes`).
    """
    import numpy as np

    from tfcert import data
    from tfcert.layers import GaussianNoise
    from tfcert.sequential import StoppingRule, certify_sequential
    from tfcert.smoothing import SmoothedClassifier

    images, n = (6, 400) if FLAGS.quick else (FLAGS.early_images, FLAGS.early_max_samples)
    x, y = data.load_arrays(FLAGS.early_dataset, "test")
    x, y = x[:images], y[:images]
    sigma, target = FLAGS.early_sigma or FLAGS.sigma, FLAGS.target_radius
    smoothed = SmoothedClassifier(model, data.info(FLAGS.early_dataset).num_classes,
                                  GaussianNoise(sigma))
    options = dict(alpha=FLAGS.alpha, bound=FLAGS.early_bounds,
                   statistics=FLAGS.early_statistics, seed=EARLY_STOPPING_SEED)
    runs, seconds = {}, {}
    start = time.perf_counter()
    runs[f"fixed n = {n}"] = smoothed.certify(x, n, **options)
    seconds[f"fixed n = {n}"] = time.perf_counter() - start
    fixed = next(iter(runs.values()))
    wald = _wald(smoothed, x, fixed, n, sigma, target)
    for method in FLAGS.early_methods:
        start = time.perf_counter()
        runs[method] = certify_sequential(
            smoothed, x, n, StoppingRule(target, method),
            num_selection_samples=FLAGS.early_selection_samples, **options)
        seconds[method] = time.perf_counter() - start
    rows = {name: _early_stopping_row(cert, fixed, y, target, seconds[name], n, wald["samples"])
            for name, cert in runs.items()}
    selection = (f" (selection draws: fixed n 100, early stopping "
                 f"{FLAGS.early_selection_samples})" if FLAGS.early_statistics == "cohen" else "")
    print(f"\n[7] early stopping at r = {target} ({FLAGS.early_bounds[0]}), {FLAGS.early_dataset}, "
          f"{len(x)} test images, σ = {sigma}, α = {FLAGS.alpha}, {FLAGS.early_statistics} "
          f"statistics{selection}, at most {n} samples, seed {EARLY_STOPPING_SEED}")
    print(f"    Wald's bound: p* = {wald['p_star']:.4f}, p from {wald['draws']} draws per image, "
          f"{np.mean(wald['samples']):.1f} samples per image")
    print(f"    {'method':16s} {'samples/image':>13s} {'fewer':>7s} {'x Wald':>7s} "
          f"{'cert. acc. at r':>15s} {'Δ points':>8s} {'at max':>6s} {'seconds':>8s}")
    for name, r in rows.items():
        print(f"    {name:16s} {r['mean_samples']:13.1f} {r['fewer_than_fixed']:6.1f}x "
              f"{r['times_wald']:6.2f}x {100 * r['certified_accuracy']:14.1f}% "
              f"{r['points_vs_fixed']:+8.1f} {r['images_at_max']:6d} {r['seconds']:8.1f}")
    classes = _image_classes(runs, fixed, y, target, wald)
    return {"dataset": FLAGS.early_dataset, "images": len(x), "max_samples": n,
            "alpha": FLAGS.alpha, "sigma": sigma, "target_radius": target,
            "statistics": FLAGS.early_statistics, "bounds": FLAGS.early_bounds,
            "selection_samples": FLAGS.early_selection_samples,
            "seed": EARLY_STOPPING_SEED, "runs": rows, "image_classes": classes,
            "wald": {"p_star": wald["p_star"], "draws": wald["draws"],
                     "mean_samples": float(np.mean(wald["samples"])),
                     "p": wald["p"].tolist(), "samples": wald["samples"].tolist()}}


def _wald(smoothed, x, fixed, n: int, sigma: float, target: float) -> dict:
    """Each image's top-class probability p, estimated from ``--wald_samples`` draws (the
    fixed run's n continued on the same seed), the probability p* the target radius
    needs (p2 = 1 − p1) and Wald's bound on the draws of each image
    (`tfcert.sequential.wald_samples`)."""
    import numpy as np

    from tfcert.sequential import required_probability, wald_samples

    draws = max(FLAGS.wald_samples, n) if not FLAGS.quick else 2 * n
    counts = fixed.counts.copy()
    if draws > n:
        counts += smoothed.sample_counts(x, draws - n, seed=EARLY_STOPPING_SEED, first_draw=n)
    p = counts.max(axis=1) / draws
    p_star = required_probability(FLAGS.early_bounds[0], target, sigma)
    return {"p": p, "p_star": p_star, "draws": draws, "top": counts.argmax(axis=1),
            "samples": wald_samples(p, p_star, FLAGS.alpha, n)}


def _image_classes(runs: dict, fixed, labels, target: float, wald: dict) -> dict:
    """Samples per image by class of image: clear (p > p* and Wald's bound <= 1,000),
    near the target (p > p*, bound > 1,000), out of reach (p <= p*), misclassified
    (the top class is not the label); each with its images, the certified images of
    each run at the target, and the mean samples of each run and of Wald's bound."""
    import numpy as np

    p, samples = wald["p"], wald["samples"]
    correct = wald["top"] == labels
    reachable = p > wald["p_star"]
    masks = {"clear": correct & reachable & (samples <= 1000),
             "near the target": correct & reachable & (samples > 1000),
             "out of reach": correct & ~reachable, "misclassified": ~correct}
    out = {}
    print(f"    {'images':24s} {'count':>5s} {'Wald':>8s} " +
          " ".join(f"{name[:12]:>12s}" for name in runs) + "   (mean samples; certified)")
    for name, mask in masks.items():
        row = {"images": int(mask.sum()), "wald": float(samples[mask].mean()) if mask.any() else 0.0}
        for run, cert in runs.items():
            hit = (cert.prediction == labels) & (cert.radius >= target)
            row[run] = {"mean_samples": float(cert.num_samples[mask].mean()) if mask.any() else 0.0,
                        "total_samples": int(cert.num_samples[mask].sum()),
                        "certified": int(hit[mask].sum())}
        out[name] = row
        print(f"    {name:24s} {row['images']:5d} {row['wald']:8.1f} " + " ".join(
            f"{row[run]['mean_samples']:7.0f};{row[run]['certified']:4d}" for run in runs))
    return out


def _early_stopping_row(cert, fixed, labels, target: float, seconds: float, n: int,
                        wald) -> dict:
    """One row of the early-stopping table (see `early_stopping_comparison`)."""
    import numpy as np

    def accuracy(c) -> float:
        return float(np.mean((c.prediction == labels) & (c.radius >= target)))

    mean = float(cert.num_samples.mean())
    return {"mean_samples": mean, "median_samples": float(np.median(cert.num_samples)),
            "fewer_than_fixed": float(fixed.num_samples.mean() / mean),
            "times_wald": float(mean / np.mean(wald)),
            "certified_accuracy": accuracy(cert),
            "points_vs_fixed": 100 * (accuracy(cert) - accuracy(fixed)),
            "images_at_max": int(np.sum(cert.counts.sum(axis=1) >= n)),
            "clean_accuracy": float(np.mean(cert.prediction == labels)),
            "abstained": float(np.mean(cert.prediction < 0)), "seconds": seconds}


if __name__ == "__main__":
    cli.run(main)
