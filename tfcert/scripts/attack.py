r"""Robust accuracy of a defense under an attack over a sweep of ε.

    tfcert-attack --model=runs/std/model.keras --dataset=mnist_subset \
        --defense=randdisc --sigma=0.15 --attack=pgd_linf --eps=0.05,0.1,0.2,0.3 \
        --steps=40 --eot_samples=20 --output_dir=runs/attack_randdisc

(also ``python -m tfcert.scripts.attack``).  Streams ``attack.tsv`` as it goes and resumes; ends
with ``robust_accuracy.tsv``, ``.png`` and ``summary.txt``; ``--analyze=a.tsv,b.tsv``
draws finished runs on one figure.  ``--engine=beam --beam_options="..."`` computes the
same rows on an Apache Beam pipeline (docs/SCALING.md).  The logic is
:mod:`tfcert.robust_accuracy`.
"""

from __future__ import annotations

import math

from absl import flags

from tfcert import cli, robust_accuracy
from tfcert.robust_accuracy import ATTACKS, DEFENSES

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Base classifier (.keras file giving logits).")
cli.define_data_flags("attack")
flags.DEFINE_enum("defense", "none", list(DEFENSES),
                  "none; gaussian (N(0, σ²) noise, one draw); randdisc / randmix (Zhang & Liang, "
                  "k = --num_clusters, σ, τ); smoothed (majority vote of --num_votes noisy "
                  "draws, STN Alg. 1); bitdepth, jpeg, tvm, resizepad (Zhang & Liang Table 2).")
flags.DEFINE_float("sigma", None, "Noise σ of gaussian / smoothed, pixel noise σ of randdisc / "
                   "randmix ([0, 1] scale; paper MNIST: 0.15 for randdisc).")
flags.DEFINE_float("center_stddev", None, "RandDisc/RandMix center noise τ (default: --sigma).")
flags.DEFINE_integer("num_clusters", 2, "RandDisc/RandMix k (MNIST 2, ImageNet 5).", lower_bound=1)
flags.DEFINE_integer("num_votes", 100, "Noisy draws of the smoothed majority vote.",
                     lower_bound=1)
flags.DEFINE_integer("bits", 2, "Bits per channel of bitdepth.", lower_bound=1, upper_bound=16)
flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of jpeg.", lower_bound=0, upper_bound=100)
flags.DEFINE_float("tvm_weight", 0.2, "Total-variation weight λ of tvm.", lower_bound=0.0)
flags.DEFINE_enum("attack", "pgd_linf", list(ATTACKS),
                  "pgd_linf / pgd_l2 (Madry et al., EOT); cw_l2 (Carlini-Wagner, EOT); boundary "
                  "(Brendel et al., decision-based); transfer (PGD on --source_model).")
flags.DEFINE_list("eps", None, "Perturbation budgets ([0, 1] pixel scale; ℓ∞ for pgd_linf and "
                  "transfer with --transfer_norm=inf, ℓ2 otherwise), e.g. 0.05,0.1,0.2,0.3.")
flags.DEFINE_string("source_model", None, "Model attacked white-box by --attack=transfer (.keras, "
                    "e.g. trained with train.py --method=pgd).")
flags.DEFINE_enum("transfer_norm", "inf", ["inf", "2"], "Norm of the PGD attack on the source.")
flags.DEFINE_integer("steps", None, "Attack iterations (default: PGD 40, C&W 100 per binary-search "
                     "round, boundary 1000).", lower_bound=1)
flags.DEFINE_float("step_size", None, "PGD step (default 2.5·ε/steps).", lower_bound=0.0)
flags.DEFINE_integer("eot_samples", None, "EOT draws per gradient (default: 20 for randomized "
                     "defenses as in Zhang & Liang's MNIST runs, else 1).", lower_bound=1)
flags.DEFINE_enum("loss", "ce", ["ce", "cw"], "PGD loss: cross-entropy or C&W margin.")
flags.DEFINE_float("confidence", 0.0, "κ of cw_l2 and of --loss=cw (the paper variant: 50).",
                   lower_bound=0.0)
flags.DEFINE_float("initial_const", 1e-2, "C&W initial constant c.", lower_bound=0.0)
flags.DEFINE_integer("binary_search_steps", 5, "C&W binary-search rounds over c.", lower_bound=1)
flags.DEFINE_float("learning_rate", 5e-2, "C&W Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("trials", 20, "Boundary-attack proposals per example and step.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 100, "Examples attacked together between writes (a Beam "
                     "step); never changes a row (every draw is keyed per example).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed (attack starts, EOT and defense draws, votes), "
                     "keyed with each example's index.", lower_bound=0)
flags.DEFINE_string("output_dir", "runs/attack", "Run directory (config, TSV, table, plot).")
flags.DEFINE_list("analyze", None, "Only draw these finished attack.tsv files on one figure.")
cli.define_engine_flags("attack")


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    if FLAGS.analyze:
        return robust_accuracy.analyze(FLAGS, FLAGS.analyze)
    cli.require(FLAGS.model is not None, "--model is required (a .keras file from train.py)")
    grid = robust_accuracy.eps_grid(FLAGS)
    for name in ("sigma", "center_stddev", "tvm_weight", "step_size", "confidence",
                 "initial_const", "learning_rate"):  # absl's bounds let inf and NaN through
        value = FLAGS[name].value
        cli.require(value is None or math.isfinite(value),
                    f"--{name} must be a finite number, got {value}")
    needs_sigma = FLAGS.defense in ("gaussian", "smoothed", "randdisc", "randmix")
    cli.require(not needs_sigma or (FLAGS.sigma is not None and FLAGS.sigma > 0),
                f"--defense={FLAGS.defense} needs --sigma > 0")
    cli.require(FLAGS.center_stddev is None or FLAGS.center_stddev > 0,
                "--center_stddev must be > 0")
    cli.require((FLAGS.attack == "transfer") == (FLAGS.source_model is not None),
                "--source_model is needed by --attack=transfer and only by it")
    robust_accuracy.sweep(FLAGS, grid)


def main() -> None:
    """The ``tfcert-attack`` / ``python -m tfcert.scripts.attack`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
