"""Exports a trained classifier as a certified TF Serving SavedModel.

    tfcert-export --model=runs/stn/model.keras --sigma=0.5 --num_samples=100000 \
        --alpha=0.001 --bound=renyi --base_dir=serving --name=mnist

writes ``serving/mnist/<version>/`` (the next free version unless --version is given),
a SavedModel whose signatures run the noisy sampling loop and the certificate inside
the graph, with TF Serving warmup requests in ``assets.extra/``, and prints its
signatures and path.  ``--serving_device=gpu`` sizes the sampling passes for a GPU
server (``--pass_size`` sets them explicitly); ``--stopping_method``,
``--first_checkpoint`` and ``--checkpoint_growth`` set the bounds and looks of the
early-stopping signatures (``certify_target``; as certify.py's flags of the same names),
``--target_statistics`` and ``--target_selection_samples`` their statistics (as
certify.py's ``--statistics`` and ``--num_selection_samples``).  Serve it with TF
Serving as described in the checkout's export/README.md.  Thin over
:func:`tfcert.export.export_saved_model`.
"""

from __future__ import annotations

from absl import flags

from tfcert import cli
from tfcert.runs.config import DATA_DIR_HELP, IMAGE_SIZE_HELP

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained base classifier (.keras file giving logits).")
flags.DEFINE_string("denoiser", None, "Denoised smoothing (Salman et al. 2020): a denoiser "
                    "(.keras, noisy image -> image, e.g. trained with tfcert.DenoiserModel) in "
                    "front of --model; the export certifies model(denoiser(x + noise)).")
flags.DEFINE_string("dataset", None, "Dataset the model was trained on (tells H, W, C, the "
                    "number of classes and their names, recorded in the export); any source of "
                    "tfcert-certify's --dataset (a name, dir:PATH, npz:PATH); default: the "
                    "model's input shape and output size.")
flags.DEFINE_string("data_dir", None, DATA_DIR_HELP)
flags.DEFINE_list("image_size", None, IMAGE_SIZE_HELP)
flags.DEFINE_enum("defense", "gaussian", ["gaussian", "randdisc", "randmix"],
                  "Noise of the smoothed classifier: gaussian N(0, σ²) (ℓ2 radii); randdisc / "
                  "randmix: randomized discretization / mixture of Zhang & Liang with pixel "
                  "noise --sigma (no ℓ2 radius: --bound=none).")
flags.DEFINE_float("sigma", None, "Noise std σ ([0, 1] pixel scale; 8/255 ≈ 0.031).")
flags.DEFINE_integer("num_clusters", 2, "randdisc/randmix: k centers (paper: MNIST 2, "
                     "ImageNet 5).", lower_bound=1)
flags.DEFINE_float("center_stddev", None, "randdisc/randmix: center noise τ (default: --sigma).")
flags.DEFINE_integer("num_candidates", 100, "randdisc/randmix: candidate pixels s.",
                     lower_bound=1)
flags.DEFINE_integer("num_samples", 100_000, "n: noisy samples per image of a certificate "
                     "(baked into the export).", lower_bound=1)
flags.DEFINE_integer("predict_num_samples", None, "Samples per image of the predict "
                     "signatures (default: --num_samples).", lower_bound=1)
flags.DEFINE_float("alpha", 0.001, "Failure probability α of each certificate (and level of "
                   "the predict test).")
flags.DEFINE_enum("bound", None, ["renyi", "cohen", "pixeldp", "none"],
                  "Radius in the output: renyi (STN Thm. 2), cohen, pixeldp, none (radius 0). "
                  "Default: renyi for gaussian, none otherwise.")
flags.DEFINE_enum("serving_device", "cpu", ["cpu", "gpu"],
                  "Device of the TF Serving server; sets the automatic --pass_size: cpu: "
                  "this machine's last-level CPU cache over the model's activation bytes per "
                  "input (serve on a similar CPU); gpu: a 256 MiB activation budget "
                  "(tfcert.devices.GPU_PASS_MEMORY), whatever this machine has; at most "
                  "4096 either way. Recorded in assets/tfcert_config.json.")
flags.DEFINE_integer("pass_size", None, "Noisy inputs per forward pass inside the graph "
                     "(bounds memory); overrides the automatic size of --serving_device.",
                     lower_bound=1)
flags.DEFINE_enum("stopping_method", "mixture", ["mixture", "betting", "checkpoints"],
                  "certify_target signatures (early stopping): bounds at each look, as "
                  "certify.py's: mixture / betting confidence sequences (anytime-valid), or "
                  "Clopper-Pearson at checkpoints with a Bonferroni split of alpha.")
flags.DEFINE_integer("first_checkpoint", None, "certify_target signatures: draws per image "
                     "at the first look (default: the method's, "
                     "tfcert.sequential.SCHEDULES: 32, or 100 for checkpoints).", lower_bound=1)
flags.DEFINE_float("checkpoint_growth", None, "certify_target signatures: each look at "
                   "least this many times the previous look's draws (> 1), the last at "
                   "--num_samples (default: the method's, 1.1, or 2 for checkpoints).")
flags.DEFINE_enum("target_statistics", "simultaneous", ["simultaneous", "cohen"],
                  "certify_target signatures: statistics, as certify.py's --statistics: "
                  "simultaneous (every class bounded at alpha/(2k), as the fixed-n "
                  "signatures) or cohen (a class selected on --target_selection_samples "
                  "separate draws gets one lower bound, p2_upper = 1 - p1_lower).")
flags.DEFINE_integer("target_selection_samples", 100, "certify_target signatures with "
                     "--target_statistics=cohen: selection draws per image (counted in "
                     "num_samples; with early stopping a few suffice, e.g. 8).", lower_bound=1)
flags.DEFINE_string("base_dir", "serving", "TF Serving model base folder.")
flags.DEFINE_string("name", "tfcert", "Model name (the folder under --base_dir and the name "
                    "in /v1/models/<name>).")
flags.DEFINE_integer("version", None, "Version folder (default: the next free integer).",
                     lower_bound=0)


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    cli.require(FLAGS.model is not None, "--model is required (a .keras file from train.py)")
    cli.require(FLAGS.sigma is not None and FLAGS.sigma > 0, "--sigma must be > 0")
    cli.require(0 < FLAGS.alpha < 1, "--alpha must be in (0, 1)")
    cli.require(FLAGS.checkpoint_growth is None or FLAGS.checkpoint_growth > 1,
                "--checkpoint_growth must be > 1")
    bound = FLAGS.bound or ("renyi" if FLAGS.defense == "gaussian" else "none")
    cli.require(FLAGS.defense == "gaussian" or bound == "none",
                f"--bound={bound} is an ℓ2 radius of Gaussian noise; with --defense="
                f"{FLAGS.defense} use --bound=none (its certificate is the ℓ∞ KL bound of "
                "certify.py, computable from the exported counts)")
    from tfcert import export
    from tfcert.sequential import StoppingRule
    from tfcert.smoothing import SmoothedClassifier

    try:
        path = export.versioned_path(FLAGS.base_dir, FLAGS.name, FLAGS.version)
    except (ValueError, OSError) as err:
        raise cli.CliError(str(err)) from err
    model = cli.load_model(FLAGS.model)
    metadata = {"model": FLAGS.model, "model_sha256": cli.file_sha256(FLAGS.model),
                "flags": cli.script_flags()}
    if FLAGS.denoiser is not None:
        _, model = cli.denoised_model(model, FLAGS.denoiser)
        metadata.update(denoiser=FLAGS.denoiser,
                        denoiser_sha256=cli.file_sha256(FLAGS.denoiser))
    image_shape, num_classes, class_names = model_geometry(model)
    if class_names is not None:
        metadata["class_names"] = list(class_names)
    smoothed = SmoothedClassifier(model, num_classes, noise_layer())
    try:
        config = export.export_saved_model(
            smoothed, path, FLAGS.num_samples, FLAGS.alpha, bound, FLAGS.pass_size,
            predict_num_samples=FLAGS.predict_num_samples, image_shape=image_shape,
            serving_device=FLAGS.serving_device, model_name=FLAGS.name, metadata=metadata,
            early_stopping=StoppingRule(0.0, FLAGS.stopping_method,
                                        first_look=FLAGS.first_checkpoint,
                                        growth=FLAGS.checkpoint_growth),
            target_statistics=FLAGS.target_statistics,
            target_selection_samples=FLAGS.target_selection_samples)
    except (ValueError, OSError) as err:  # OSError: version taken, --base_dir not a folder
        raise cli.CliError(str(err)) from err
    print(export.signature_summary(path))
    print(f"baked in: n={config.num_samples}, predict n={config.predict_num_samples}, "
          f"alpha={config.alpha}, bound={config.bound}, sigma={config.sigma}, "
          f"pass_size={config.pass_size} (serving_device={config.serving_device}), "
          f"classes={config.num_classes}, images={list(config.image_shape)}, "
          f"certify_target: {config.stopping_method}, {len(config.target_looks)} looks "
          f"{_abridged(config.target_looks)}{_selection(config)}")
    print(f"warmup: {export.WARMUP_FILE}, one request per signature for model "
          f"'{config.model_name}'")
    print(f"SavedModel written to {path}")


def _selection(config) -> str:
    """", Cohen's statistics with s selection draws" where they apply."""
    if config.target_statistics != "cohen":
        return ""
    return f", Cohen's statistics with {config.target_selection_samples} selection draws"


def _abridged(looks: tuple[int, ...]) -> str:
    """The looks as a list, the middle elided beyond eight."""
    shown = [str(n) for n in looks] if len(looks) <= 8 else [
        *map(str, looks[:4]), "…", *map(str, looks[-3:])]
    return f"[{', '.join(shown)}]"


def model_geometry(model) -> tuple[tuple[int, int, int], int, tuple[str, ...] | None]:
    """(H, W, C), the number of classes and their names (None if unknown), from --dataset or
    the model, checked to agree."""
    from tfcert import data

    shape, classes = tuple(model.input_shape[1:]), model.output_shape[-1]
    if FLAGS.dataset is None:
        cli.require(len(shape) == 3 and all(isinstance(d, int) for d in shape),
                    f"cannot tell the image size from the model's input shape "
                    f"{model.input_shape}: pass --dataset")
        cli.require(isinstance(classes, int) and classes >= 2,
                    f"cannot tell the number of classes from the model's output shape "
                    f"{model.output_shape}: pass --dataset")
        return shape, classes, None
    meta = data.info(FLAGS.dataset, FLAGS.data_dir, FLAGS.image_size)
    cli.check_model_fits(model, meta, FLAGS.model, FLAGS.dataset)
    return meta.image_shape, meta.num_classes, meta.class_names


def noise_layer():
    """The randomized layer of --defense (fresh noise per call; seeds come per request)."""
    if FLAGS.defense == "gaussian":
        from tfcert.layers.noise import GaussianNoise

        return GaussianNoise(FLAGS.sigma)
    from tfcert.layers import discretization

    layer = {"randdisc": discretization.RandomizedDiscretization,
             "randmix": discretization.RandomizedMixture}[FLAGS.defense]
    cli.require(FLAGS.center_stddev is None or FLAGS.center_stddev > 0,
                "--center_stddev must be > 0")
    return layer(FLAGS.num_clusters, FLAGS.sigma, FLAGS.center_stddev or FLAGS.sigma,
                 num_candidates=FLAGS.num_candidates)


def main() -> None:
    """The ``tfcert-export`` / ``python export`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
