r"""Robust accuracy of a defense under an attack over a sweep of ε (SPEC §4.7).

    python -m tfcert.attack --model=runs/std/model.keras --dataset=mnist_subset \
        --defense=randdisc --sigma=0.15 --attack=pgd_linf --eps=0.05,0.1,0.2,0.3 \
        --steps=40 --eot_samples=20 --output_dir=runs/attack_randdisc

The defense is the base model behind a tfcert layer (``--defense``: none, gaussian,
randdisc, randmix, smoothed, bitdepth, jpeg, tvm, resizepad).  White-box attacks get its
gradient (EOT over ``--eot_samples`` draws for randomized defenses, BPDA through
RandDisc and the transformations' smooth approximations); ``transfer`` attacks
``--source_model`` instead (STN: Madry's PGD-trained model); ``boundary`` only queries
labels.  A randomized defense classifies with one draw per image (Zhang & Liang's
setting); ``smoothed`` is STN's Algorithm 1, a majority vote over ``--num_votes`` draws of
N(0, σ²) (attacked through its noisy base model with EOT).

Streams one row per (ε, example) to ``<output_dir>/attack.tsv`` (key, eps, index, label,
clean and adversarial prediction, perturbation norm, robust, seconds) a batch at a
time; rerunning the command resumes, and adding ε values or examples only computes the
new rows.  For the minimum-norm attacks (``cw_l2``, ``boundary``) one attack serves every
ε: an example is robust at ε when its adversarial example is farther than ε or still
classified correctly (else it is judged on the clean image).  At the end: a table on
stdout, ``robust_accuracy.tsv``, ``robust_accuracy.png`` and ``summary.txt``.
``--analyze=a.tsv,b.tsv`` draws several finished runs on one figure (Zhang & Liang
Fig. 2, STN Figs. 2–3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
DEFENSES = ("none", "gaussian", "randdisc", "randmix", "smoothed", "bitdepth", "jpeg", "tvm",
            "resizepad")
RANDOMIZED = ("gaussian", "randdisc", "randmix", "smoothed", "resizepad")
ATTACKS = ("pgd_linf", "pgd_l2", "cw_l2", "boundary", "transfer")
MINIMUM_NORM = ("cw_l2", "boundary")
DEFAULT_STEPS = {"pgd_linf": 40, "pgd_l2": 40, "transfer": 40, "cw_l2": 100, "boundary": 1000}

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
flags.DEFINE_integer("batch_size", 100, "Examples attacked together between writes.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Random seed (defense layers, attack starts, votes).")
flags.DEFINE_string("output_dir", "runs/attack", "Run directory (config, TSV, table, plot).")
flags.DEFINE_list("analyze", None, "Only draw these finished attack.tsv files on one figure.")

COLUMNS = ["key", "eps", "index", "label", "clean_prediction", "adv_prediction", "distance",
           "robust", "seconds"]
# Flags that never change a row (where the run goes, which rows are wanted, how it is
# shown); every other flag, including any added later, is the run's identity.  Models are
# identified by their SHA-256, not their paths.  (--batch_size is not operational: an
# attack draws the random starts of a batch from one seed.)
OPERATIONAL = frozenset({"output_dir", "model", "source_model", "num_examples", "eps",
                         "download", "analyze"})


@dataclasses.dataclass
class Defense:
    """A defended classifier: the model attacks differentiate, and its class scores."""

    attack_model: Callable  # images -> logits (randomized: one draw)
    scores: Callable  # (images, seed) -> per-class scores [batch, k] (numpy)

    def classify(self, x, seed: int):
        return self.scores(x, seed).argmax(axis=1)


def main(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    if FLAGS.analyze:
        return analyze(FLAGS.analyze)
    cli.require(FLAGS.model is not None, "--model is required (a .keras file from train.py)")
    grid = eps_grid()
    needs_sigma = FLAGS.defense in ("gaussian", "smoothed", "randdisc", "randmix")
    cli.require(not needs_sigma or (FLAGS.sigma is not None and FLAGS.sigma > 0),
                f"--defense={FLAGS.defense} needs --sigma > 0")
    cli.require(FLAGS.center_stddev is None or FLAGS.center_stddev > 0,
                "--center_stddev must be > 0")
    cli.require((FLAGS.attack == "transfer") == (FLAGS.source_model is not None),
                "--source_model is needed by --attack=transfer and only by it")
    sweep(grid)


def eps_grid() -> list[float]:
    """--eps as floats ≥ 0 (≤ 1 for ℓ∞ budgets)."""
    try:
        grid = [float(e) for e in FLAGS.eps or []]
    except ValueError:
        grid = []
    cli.require(bool(grid) and all(e >= 0 for e in grid),
                f"--eps must be a comma list of budgets >= 0, got {FLAGS.eps}")
    cli.require(attack_norm() == "2" or max(grid) <= 1,
                f"ℓ∞ budgets are on the [0, 1] pixel scale: --eps={','.join(FLAGS.eps)} "
                "has values > 1")
    return sorted(set(grid))


def attack_norm() -> str:
    """The norm in which perturbations are measured."""
    if FLAGS.attack == "transfer":
        return FLAGS.transfer_norm
    return "inf" if FLAGS.attack == "pgd_linf" else "2"


def key(eps: float, index) -> str:
    return f"{eps:g}/{index}"


def sweep(grid: list[float]) -> None:
    """The resumable loop over (ε, batch) — one attack per batch for minimum-norm attacks."""
    import numpy as np

    from tfcert import results

    indices, images, labels, meta = cli.select_examples(FLAGS, shard=False)
    base = cli.load_model(FLAGS.model)
    cli.check_model_fits(base, meta, FLAGS.model, FLAGS.dataset)
    source = cli.load_model(FLAGS.source_model) if FLAGS.source_model else None
    if source is not None:
        cli.check_model_fits(source, meta, FLAGS.source_model, FLAGS.dataset)
    config = {**cli.script_flags(), "model_sha256": cli.file_sha256(FLAGS.model),
              "source_model_sha256": (cli.file_sha256(FLAGS.source_model)
                                      if FLAGS.source_model else None),
              "steps": FLAGS.steps or DEFAULT_STEPS[FLAGS.attack],
              "eot_samples": FLAGS.eot_samples or (20 if FLAGS.defense in RANDOMIZED else 1)}
    results.prepare_run_dir(FLAGS.output_dir, config, OPERATIONAL, cli.flag_defaults())
    table = results.ResultTable(os.path.join(FLAGS.output_dir, "attack.tsv"), COLUMNS, "key")
    defense = build_defense(base, meta.num_classes)
    attack = make_attack(defense, source, config)
    done = table.done
    if FLAGS.attack in MINIMUM_NORM:  # one attack per example serves every ε
        jobs = [(grid, chunk) for chunk in batches(indices, grid, done)]
    else:
        jobs = [([e], chunk) for e in grid for chunk in batches(indices, [e], done)]
    total = len(grid) * len(indices)
    progress = cli.Progress(total, "attacked (ε, example) pairs", len(done & wanted(indices, grid)))
    for eps_values, chunk in jobs:
        began = time.time()
        seed = int(np.random.SeedSequence([FLAGS.seed, int(indices[chunk[0]]),
                                           round(eps_values[0] * 1e6)]).generate_state(1)[0])
        x, y = images[chunk], labels[chunk]
        x_adv = np.asarray(attack(x, y, eps_values[0], seed))
        clean, adv = defense.classify(x, seed + 1), defense.classify(x_adv, seed + 2)
        distance = norms(x_adv - x)
        seconds = (time.time() - began) / len(chunk)
        rows = [{"key": key(e, indices[p]), "eps": e, "index": indices[p], "label": y[j],
                 "clean_prediction": clean[j], "adv_prediction": adv[j], "distance": distance[j],
                 "robust": int((adv[j] if distance[j] <= e or FLAGS.attack not in MINIMUM_NORM
                                else clean[j]) == y[j]), "seconds": seconds}
                for e in eps_values for j, p in enumerate(chunk)
                if key(e, indices[p]) not in done]
        table.append(rows)
        progress.update(progress.done + len(rows))
    summarize(table.rows, indices, grid)


def wanted(indices, grid) -> set[str]:
    return {key(e, i) for e in grid for i in indices}


def batches(indices, grid, done: set[str]) -> list[list[int]]:
    """Positions of the examples with a row missing for some ε of ``grid``, in batches."""
    todo = [p for p, i in enumerate(indices) if any(key(e, i) not in done for e in grid)]
    return [todo[s:s + FLAGS.batch_size] for s in range(0, len(todo), FLAGS.batch_size)]


def norms(delta):
    """Per-example norm of the perturbations in the attack's norm."""
    import numpy as np

    flat = delta.reshape(len(delta), -1).astype(np.float64)
    return np.linalg.norm(flat, ord=np.inf if attack_norm() == "inf" else 2, axis=1)


def defense_layer():
    """The tfcert layer of --defense in front of the base model (None for none)."""
    from tfcert import layers

    tau = FLAGS.center_stddev or FLAGS.sigma
    builders = {
        "none": lambda: None,
        "gaussian": lambda: layers.GaussianNoise(FLAGS.sigma, seed=FLAGS.seed),
        "smoothed": lambda: layers.GaussianNoise(FLAGS.sigma, seed=FLAGS.seed),
        "randdisc": lambda: layers.RandomizedDiscretization(FLAGS.num_clusters, FLAGS.sigma, tau,
                                                            seed=FLAGS.seed),
        "randmix": lambda: layers.RandomizedMixture(FLAGS.num_clusters, FLAGS.sigma, tau,
                                                    seed=FLAGS.seed),
        "bitdepth": lambda: layers.BitDepthReduction(FLAGS.bits),
        "jpeg": lambda: layers.JPEGCompression(FLAGS.jpeg_quality),
        "tvm": lambda: layers.TotalVariationMinimization(FLAGS.tvm_weight),
        "resizepad": lambda: layers.ResizePadding(seed=FLAGS.seed),
    }
    return builders[FLAGS.defense]()


def build_defense(base, num_classes: int) -> Defense:
    import keras
    import tensorflow as tf

    layer = defense_layer()
    model = base if layer is None else keras.Sequential([layer, base])
    if FLAGS.defense == "smoothed":
        from tfcert.smoothing import SmoothedClassifier

        smoothed = SmoothedClassifier(base, num_classes, defense_layer())
        return Defense(model, lambda x, seed: smoothed.sample_counts(x, FLAGS.num_votes,
                                                                     seed=seed))
    logits = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return Defense(model, lambda x, seed: logits(tf.constant(x)).numpy())


def make_attack(defense: Defense, source, config: dict) -> Callable:
    """``attack(x, y, eps, seed) -> x_adv`` for --attack with the run's settings."""
    from tfcert import attacks

    steps, eot = config["steps"], config["eot_samples"]
    pgd_settings = dict(steps=steps, step_size=FLAGS.step_size, loss=FLAGS.loss,
                        confidence=FLAGS.confidence)
    if FLAGS.attack == "transfer":
        return lambda x, y, eps, seed: attacks.pgd(source, x, y, eps, norm=FLAGS.transfer_norm,
                                                   seed=seed, **pgd_settings)
    if FLAGS.attack == "cw_l2":
        return lambda x, y, eps, seed: attacks.carlini_wagner_l2(
            defense.attack_model, x, y, confidence=FLAGS.confidence,
            initial_const=FLAGS.initial_const, binary_search_steps=FLAGS.binary_search_steps,
            steps=steps, learning_rate=FLAGS.learning_rate, eot_samples=eot)
    if FLAGS.attack == "boundary":
        return lambda x, y, eps, seed: attacks.boundary_attack(
            defense.attack_model, x, y, steps=steps, trials=FLAGS.trials, seed=seed)
    return lambda x, y, eps, seed: attacks.pgd(
        defense.attack_model, x, y, eps, norm=attack_norm(), eot_samples=eot, seed=seed,
        **pgd_settings)


def robust_curve(rows, indices, grid):
    """Robust accuracy per ε of ``grid`` over the examples ``indices`` (NaN if none)."""
    import numpy as np

    by_key = {r["key"]: r for r in rows}
    return np.array([np.mean([by_key[key(e, i)]["robust"] == "1" for i in indices
                              if key(e, i) in by_key] or [np.nan]) for e in grid])


def summarize(rows, indices, grid) -> None:
    """Prints and writes the robust-accuracy table, its TSV and plot."""
    import numpy as np

    from tfcert.analysis import format_table, plot_curves

    accuracy = robust_curve(rows, indices, grid)
    name = f"{FLAGS.defense}/{FLAGS.attack}"
    by_key = {r["key"]: r for r in rows}
    first = [by_key[key(grid[0], i)] for i in indices]
    clean = np.mean([r["clean_prediction"] == r["label"] for r in first])
    header = (f"{len(indices)} examples of {FLAGS.dataset}, defense {FLAGS.defense}, attack "
              f"{FLAGS.attack} (ℓ{'∞' if attack_norm() == 'inf' else '2'}); clean accuracy "
              f"{100 * clean:.1f}%")
    xlabel = f"ℓ{'∞' if attack_norm() == 'inf' else '2'} ε"
    text = format_table(grid, {name: accuracy}, header="ε")
    print(f"{header}\nrobust accuracy:\n{text}")
    with open(os.path.join(FLAGS.output_dir, "summary.txt"), "w") as f:
        f.write(f"{header}\n{text}\n")
    with open(os.path.join(FLAGS.output_dir, "robust_accuracy.tsv"), "w") as f:
        f.write("eps\trobust_accuracy\n")
        f.writelines(f"{e:g}\t{a:.6g}\n" for e, a in zip(grid, accuracy))
    plot_curves(grid, {name: accuracy}, os.path.join(FLAGS.output_dir, "robust_accuracy.png"),
                xlabel=xlabel, ylabel="robust accuracy", title=header.split(";")[0])
    print(f"wrote {FLAGS.output_dir}/attack.tsv, robust_accuracy.tsv, robust_accuracy.png")


def analyze(paths: list[str]) -> None:
    """Robust-accuracy curves of several finished runs on one figure (and one table)."""
    import numpy as np

    from tfcert.analysis import format_table, plot_curves
    from tfcert.results import read_tsv

    curves = {}
    for path in paths:
        rows = read_tsv(path)
        cli.require(bool(rows), f"{path} has no rows yet")
        config_path = os.path.join(os.path.dirname(path), "config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        label = (f"{config['defense']}/{config['attack']}" if "defense" in config
                 else os.path.basename(os.path.dirname(os.path.abspath(path))))
        grid = sorted({float(r["eps"]) for r in rows})
        indices = sorted({r["index"] for r in rows}, key=int)
        curves[label if label not in curves else f"{label} ({path})"] = (
            grid, robust_curve(rows, indices, grid))
    union = sorted({e for grid, _ in curves.values() for e in grid})
    table = {name: np.array([dict(zip(grid, acc)).get(e, np.nan) for e in union])
             for name, (grid, acc) in curves.items()}
    print(format_table(union, table, header="ε") + "\n(nan: ε not run)")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    path = os.path.join(FLAGS.output_dir, "robust_accuracy_compare.png")
    plot = {name: np.interp(union, grid, acc, left=np.nan, right=np.nan)
            for name, (grid, acc) in curves.items()}
    plot_curves(union, plot, path, xlabel="ε", ylabel="robust accuracy")
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
