r"""Certifies a trained classifier under Gaussian noise (STN Algorithm 1; docs/SOUNDNESS.md).

    python certify.py --model=runs/stn/model.keras --dataset=mnist_subset --sigma=0.7 \
        --num_examples=500 --num_samples=10000 --alpha=0.001 --bounds=renyi,cohen \
        --output_dir=runs/certify_stn

Streams one row per example to ``<output_dir>/certify.tsv`` (index, label, prediction,
correct, radius per bound, p1_lower, p2_upper, counts, seconds) as it goes; rerunning
the same command resumes where it stopped (also after a kill), and a rerun whose
settings differ from the run's ``config.json`` is refused.  At the end it prints and
writes the certified accuracy over a radius grid per bound (``certified_accuracy.tsv``,
``.png``, ``summary.txt``).  ``--num_shards=N --shard_index=j`` certifies every N-th of
the selected examples (one process or machine per shard); ``--merge=D0,D1,...
--output_dir=D`` joins the finished shards into one run with the rows of a single run.
``--analyze=a.tsv,b.tsv`` draws several finished runs on one figure (e.g. several σ, as
STN Fig. 1).  The run logic is :mod:`tfcert.certification`.
"""

from __future__ import annotations

from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Trained base classifier (.keras file giving logits).")
cli.define_data_flags("certify")
flags.DEFINE_float("sigma", None, "Noise std σ of the smoothed classifier ([0, 1] pixel scale).")
flags.DEFINE_integer("num_samples", 1000, "n: noisy samples per example for the bounds.",
                     lower_bound=1)
flags.DEFINE_integer("num_selection_samples", 100,
                     "n0: selection samples of --statistics=cohen (ignored otherwise).",
                     lower_bound=1)
flags.DEFINE_float("alpha", 0.001, "Failure probability α of each certificate.")
flags.DEFINE_list("bounds", ["renyi", "cohen"], "Radii to compute on the same counts: "
                  "renyi (STN Thm. 2), cohen (Cohen et al. 2019), pixeldp (Lecuyer et al.).")
flags.DEFINE_enum("statistics", "simultaneous", ["simultaneous", "cohen"],
                  "simultaneous: Clopper-Pearson bounds over all classes with Bonferroni (STN); "
                  "cohen: n0 samples pick the class, n fresh samples bound it.")
flags.DEFINE_integer("batch_size", None, "Noisy inputs per forward pass (default: from the "
                     "input size).", lower_bound=1)
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "auto"],
                  "Precision of the base model's forward passes: float32; bfloat16 (Keras "
                  "mixed_bfloat16 clone; faster only on hardware with native bfloat16, e.g. "
                  "AVX-512 BF16/AMX CPUs or Ampere+ GPUs; votes may differ slightly); auto "
                  "(bfloat16 iff the hardware has it). See docs/PERFORMANCE.md.")
flags.DEFINE_float("target_radius", None, "Early stopping (tfcert.sequential): stop sampling an "
                   "example once it is certified at this radius (first of --bounds), or once "
                   "that is out of reach; --num_samples is then the most samples per example "
                   "and the TSV gets a samples column. Off by default.", lower_bound=0.0)
flags.DEFINE_float("min_radius_gain", None, "Early stopping, budget mode: stop an example once "
                   "more samples (up to --num_samples) cannot raise its radius by more than "
                   "this. Off by default; combines with --target_radius.", lower_bound=0.0)
flags.DEFINE_enum("stopping_method", "mixture", ["mixture", "betting", "checkpoints"],
                  "Early stopping bounds: mixture (beta-binomial mixture confidence sequence, "
                  "Robbins), betting (Waudby-Smith & Ramdas), checkpoints (Clopper-Pearson at "
                  "geometric checkpoints, α split over them). See docs/PERFORMANCE.md.")
flags.DEFINE_integer("first_checkpoint", 100, "Early stopping: samples at the first look, every "
                     "method (tfcert.sequential's own default for the confidence sequences is "
                     "32; 100 here keeps older run directories resumable).", lower_bound=1)
flags.DEFINE_float("checkpoint_growth", 2.0, "Early stopping with --stopping_method=checkpoints: "
                   "ratio of consecutive checkpoints, > 1 (the confidence sequences look "
                   "every 10% more samples).")
flags.DEFINE_integer("images_per_step", 10, "Examples certified together between writes "
                     "(does not change any result: each example's noise is its own).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed of the noise.")
flags.DEFINE_bool("stn_factor", False, "Report certified accuracy × (1 − α), STN's convention "
                  "('multiply 95%'); the TSV rows are unaffected.")
flags.DEFINE_float("max_radius", None, "Largest radius of the accuracy table/plot "
                   "(default: 4σ, or the largest radius seen with --analyze).")
flags.DEFINE_integer("grid_points", 11, "Radii in the table (the plot uses 200).", lower_bound=2)
flags.DEFINE_string("output_dir", "runs/certify", "Run directory (config, TSV, table, plot).")
flags.DEFINE_list("analyze", None, "Only analyse these finished certify.tsv files together.")
flags.DEFINE_list("merge", None, "Only join these finished shard run directories (--num_shards "
                  "runs of one command) into --output_dir, as one run.")
cli.define_shard_flags()
cli.define_engine_flags("certify")
flags.DEFINE_enum("defense", "gaussian", ["gaussian", "randdisc", "randdisc_downsampled"],
                  "gaussian: ℓ2 radii of the Gaussian-smoothed classifier (--bounds); randdisc / "
                  "randdisc_downsampled: ℓ∞ KL certificates of randomized discretization "
                  "(Zhang & Liang Prop. 1-2) over --eps, with --sigma as the pixel noise σ.")
flags.DEFINE_list("eps", ["0.01", "0.02", "0.05", "0.1"], "ℓ∞ budgets of the KL certificate.")
flags.DEFINE_integer("num_clusters", 2, "RandDisc k (paper: MNIST 2, ImageNet 5).", lower_bound=1)
flags.DEFINE_float("center_stddev", None, "RandDisc center noise τ (default: --sigma).")
flags.DEFINE_integer("num_candidates", 100, "RandDisc candidate pixels s.", lower_bound=1)
flags.DEFINE_list("fixed_centers", None, "Image-independent RandDisc centers (grayscale), one "
                  "per cluster, e.g. 0,1; removes Prop. 1's center term.")
flags.DEFINE_integer("num_center_samples", 5000, "Center sets per example for the (1 − α′) "
                     "betting upper bound on Prop. 1's expectation over the centers.",
                     lower_bound=2)
flags.DEFINE_float("kl_alpha", 0.001, "Failure probability α′ of U_KL's Monte-Carlo part "
                   "(Prop. 1); a KL certificate fails with probability ≤ α + α′.")



def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    from tfcert import certification

    if FLAGS.analyze:
        return certification.analyze(FLAGS.analyze, FLAGS)
    if FLAGS.merge:
        display = {k: FLAGS[k].value for k in ("stn_factor", "max_radius", "grid_points")}
        return certification.merge_runs(FLAGS.merge, FLAGS.output_dir, display)
    cli.require(FLAGS.model is not None, "--model is required (a .keras file from train.py)")
    cli.require(FLAGS.sigma is not None and FLAGS.sigma > 0, "--sigma must be > 0")
    cli.require(0 < FLAGS.alpha < 1, "--alpha must be in (0, 1)")
    from tfcert.certificate import RADII

    early = FLAGS.target_radius is not None or FLAGS.min_radius_gain is not None
    cli.require(not early or FLAGS.defense == "gaussian",
                "--target_radius/--min_radius_gain (early stopping) need --defense=gaussian")
    cli.require(FLAGS.checkpoint_growth > 1, "--checkpoint_growth must be > 1")
    if FLAGS.defense == "gaussian":
        bad = [b for b in FLAGS.bounds if b not in RADII]
        cli.require(not bad and bool(FLAGS.bounds),
                    f"unknown --bounds {bad}; choose from {', '.join(sorted(RADII))}")
    else:
        certification.eps_grid(FLAGS)
        cli.require(FLAGS.center_stddev is None or FLAGS.center_stddev > 0,
                    "--center_stddev must be > 0")
        cli.require(0 < FLAGS.kl_alpha < 1, "--kl_alpha must be in (0, 1)")
    if FLAGS.engine == "beam":
        from tfcert import beam_pipeline

        return beam_pipeline.certify_dataset(FLAGS, cli.script_flags(), cli.flag_defaults())
    certification.certify_dataset(FLAGS, cli.script_flags(), cli.flag_defaults())


def main() -> None:
    """The ``tfcert-certify`` / ``python certify.py`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
