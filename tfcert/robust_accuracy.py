r"""Robust accuracy of a defense under an attack over a sweep of ε (SPEC §4.7): the engine of
``tfcert-attack`` / ``python -m tfcert.scripts.attack``.

The defense is the base model behind a tfcert layer (``defense``: none, gaussian,
randdisc, randmix, smoothed, bitdepth, jpeg, tvm, resizepad).  White-box attacks get its
gradient (EOT over ``eot_samples`` draws for randomized defenses, BPDA through
RandDisc and the transformations' smooth approximations); ``transfer`` attacks
``source_model`` instead (STN: Madry's PGD-trained model); ``boundary`` only queries
labels.  A randomized defense classifies with one draw per image (Zhang & Liang's
setting); ``smoothed`` is STN's Algorithm 1, a majority vote over ``num_votes`` draws of
N(0, σ²) (attacked through its noisy base model with EOT).

`sweep` streams one row per (ε, example) to ``<output_dir>/attack.tsv`` (key, eps, index,
label, clean and adversarial prediction, perturbation norm, robust, seconds) a batch at
a time; rerunning resumes, and adding ε values or examples only computes the new rows.
For the minimum-norm attacks (``cw_l2``, ``boundary``) one attack serves every ε: an
example is robust at ε when its adversarial example is farther than ε or still
classified correctly (else it is judged on the clean image).  At the end: a table on
stdout, ``robust_accuracy.tsv``, ``robust_accuracy.png`` and ``summary.txt``.
`analyze` draws several finished runs on one figure (Zhang & Liang Fig. 2, STN Figs. 2–3).

Options are attributes of ``o`` (``absl.flags.FLAGS`` in the script, or a namespace).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from tfcert import cli

DEFENSES = ("none", "gaussian", "randdisc", "randmix", "smoothed", "bitdepth", "jpeg", "tvm",
            "resizepad")
RANDOMIZED = ("gaussian", "randdisc", "randmix", "smoothed", "resizepad")
ATTACKS = ("pgd_linf", "pgd_l2", "cw_l2", "boundary", "transfer")
MINIMUM_NORM = ("cw_l2", "boundary")
DEFAULT_STEPS = {"pgd_linf": 40, "pgd_l2": 40, "transfer": 40, "cw_l2": 100, "boundary": 1000}

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


def eps_grid(o) -> list[float]:
    """--eps as floats ≥ 0 (≤ 1 for ℓ∞ budgets)."""
    try:
        grid = [float(e) for e in o.eps or []]
    except ValueError:
        grid = []
    cli.require(bool(grid) and all(e >= 0 for e in grid),
                f"--eps must be a comma list of budgets >= 0, got {o.eps}")
    cli.require(attack_norm(o) == "2" or max(grid) <= 1,
                f"ℓ∞ budgets are on the [0, 1] pixel scale: --eps={','.join(o.eps)} "
                "has values > 1")
    return sorted(set(grid))


def attack_norm(o) -> str:
    """The norm in which perturbations are measured."""
    if o.attack == "transfer":
        return o.transfer_norm
    return "inf" if o.attack == "pgd_linf" else "2"


def key(eps: float, index) -> str:
    return f"{eps:g}/{index}"


def sweep(o, grid: list[float]) -> None:
    """The resumable loop over (ε, batch) — one attack per batch for minimum-norm attacks."""
    import numpy as np

    from tfcert import results

    indices, images, labels, meta = cli.select_examples(o, shard=False)
    base = cli.load_model(o.model)
    cli.check_model_fits(base, meta, o.model, o.dataset)
    source = cli.load_model(o.source_model) if o.source_model else None
    if source is not None:
        cli.check_model_fits(source, meta, o.source_model, o.dataset)
    config = {**cli.script_flags(), "model_sha256": cli.file_sha256(o.model),
              "source_model_sha256": (cli.file_sha256(o.source_model)
                                      if o.source_model else None),
              "steps": o.steps or DEFAULT_STEPS[o.attack],
              "eot_samples": o.eot_samples or (20 if o.defense in RANDOMIZED else 1)}
    results.prepare_run_dir(o.output_dir, config, OPERATIONAL, cli.flag_defaults())
    table = results.ResultTable(os.path.join(o.output_dir, "attack.tsv"), COLUMNS, "key")
    defense = build_defense(o, base, meta.num_classes)
    attack = make_attack(o, defense, source, config)
    done = table.done
    if o.attack in MINIMUM_NORM:  # one attack per example serves every ε
        jobs = [(grid, chunk) for chunk in batches(o, indices, grid, done)]
    else:
        jobs = [([e], chunk) for e in grid for chunk in batches(o, indices, [e], done)]
    total = len(grid) * len(indices)
    progress = cli.Progress(total, "attacked (ε, example) pairs", len(done & wanted(indices, grid)))
    for eps_values, chunk in jobs:
        began = time.time()
        seed = int(np.random.SeedSequence([o.seed, int(indices[chunk[0]]),
                                           round(eps_values[0] * 1e6)]).generate_state(1)[0])
        x, y = images[chunk], labels[chunk]
        x_adv = np.asarray(attack(x, y, eps_values[0], seed))
        clean, adv = defense.classify(x, seed + 1), defense.classify(x_adv, seed + 2)
        distance = norms(o, x_adv - x)
        seconds = (time.time() - began) / len(chunk)
        rows = [{"key": key(e, indices[p]), "eps": e, "index": indices[p], "label": y[j],
                 "clean_prediction": clean[j], "adv_prediction": adv[j], "distance": distance[j],
                 "robust": int((adv[j] if distance[j] <= e or o.attack not in MINIMUM_NORM
                                else clean[j]) == y[j]), "seconds": seconds}
                for e in eps_values for j, p in enumerate(chunk)
                if key(e, indices[p]) not in done]
        table.append(rows)
        progress.update(progress.done + len(rows))
    summarize(o, table.rows, indices, grid)


def wanted(indices, grid) -> set[str]:
    return {key(e, i) for e in grid for i in indices}


def batches(o, indices, grid, done: set[str]) -> list[list[int]]:
    """Positions of the examples with a row missing for some ε of ``grid``, in batches."""
    todo = [p for p, i in enumerate(indices) if any(key(e, i) not in done for e in grid)]
    return [todo[s:s + o.batch_size] for s in range(0, len(todo), o.batch_size)]


def norms(o, delta):
    """Per-example norm of the perturbations in the attack's norm."""
    import numpy as np

    flat = delta.reshape(len(delta), -1).astype(np.float64)
    return np.linalg.norm(flat, ord=np.inf if attack_norm(o) == "inf" else 2, axis=1)


def defense_layer(o):
    """The tfcert layer of --defense in front of the base model (None for none)."""
    from tfcert import layers

    tau = o.center_stddev or o.sigma
    builders = {
        "none": lambda: None,
        "gaussian": lambda: layers.GaussianNoise(o.sigma, seed=o.seed),
        "smoothed": lambda: layers.GaussianNoise(o.sigma, seed=o.seed),
        "randdisc": lambda: layers.RandomizedDiscretization(o.num_clusters, o.sigma, tau,
                                                            seed=o.seed),
        "randmix": lambda: layers.RandomizedMixture(o.num_clusters, o.sigma, tau,
                                                    seed=o.seed),
        "bitdepth": lambda: layers.BitDepthReduction(o.bits),
        "jpeg": lambda: layers.JPEGCompression(o.jpeg_quality),
        "tvm": lambda: layers.TotalVariationMinimization(o.tvm_weight),
        "resizepad": lambda: layers.ResizePadding(seed=o.seed),
    }
    return builders[o.defense]()


def build_defense(o, base, num_classes: int) -> Defense:
    import keras
    import tensorflow as tf

    layer = defense_layer(o)
    model = base if layer is None else keras.Sequential([layer, base])
    if o.defense == "smoothed":
        from tfcert.smoothing import SmoothedClassifier

        smoothed = SmoothedClassifier(base, num_classes, defense_layer(o))
        return Defense(model, lambda x, seed: smoothed.sample_counts(x, o.num_votes,
                                                                     seed=seed))
    logits = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return Defense(model, lambda x, seed: logits(tf.constant(x)).numpy())


def make_attack(o, defense: Defense, source, config: dict) -> Callable:
    """``attack(x, y, eps, seed) -> x_adv`` for --attack with the run's settings."""
    from tfcert import attacks

    steps, eot = config["steps"], config["eot_samples"]
    pgd_settings = dict(steps=steps, step_size=o.step_size, loss=o.loss,
                        confidence=o.confidence)
    if o.attack == "transfer":
        return lambda x, y, eps, seed: attacks.pgd(source, x, y, eps, norm=o.transfer_norm,
                                                   seed=seed, **pgd_settings)
    if o.attack == "cw_l2":
        return lambda x, y, eps, seed: attacks.carlini_wagner_l2(
            defense.attack_model, x, y, confidence=o.confidence,
            initial_const=o.initial_const, binary_search_steps=o.binary_search_steps,
            steps=steps, learning_rate=o.learning_rate, eot_samples=eot)
    if o.attack == "boundary":
        return lambda x, y, eps, seed: attacks.boundary_attack(
            defense.attack_model, x, y, steps=steps, trials=o.trials, seed=seed)
    return lambda x, y, eps, seed: attacks.pgd(
        defense.attack_model, x, y, eps, norm=attack_norm(o), eot_samples=eot, seed=seed,
        **pgd_settings)


def robust_curve(rows, indices, grid):
    """Robust accuracy per ε of ``grid`` over the examples ``indices`` (NaN if none)."""
    import numpy as np

    by_key = {r["key"]: r for r in rows}
    return np.array([np.mean([by_key[key(e, i)]["robust"] == "1" for i in indices
                              if key(e, i) in by_key] or [np.nan]) for e in grid])


def summarize(o, rows, indices, grid) -> None:
    """Prints and writes the robust-accuracy table, its TSV and plot."""
    import numpy as np

    from tfcert.analysis import format_table, plot_curves

    accuracy = robust_curve(rows, indices, grid)
    name = f"{o.defense}/{o.attack}"
    by_key = {r["key"]: r for r in rows}
    first = [by_key[key(grid[0], i)] for i in indices]
    clean = np.mean([r["clean_prediction"] == r["label"] for r in first])
    header = (f"{len(indices)} examples of {o.dataset}, defense {o.defense}, attack "
              f"{o.attack} (ℓ{'∞' if attack_norm(o) == 'inf' else '2'}); clean accuracy "
              f"{100 * clean:.1f}%")
    xlabel = f"ℓ{'∞' if attack_norm(o) == 'inf' else '2'} ε"
    text = format_table(grid, {name: accuracy}, header="ε")
    print(f"{header}\nrobust accuracy:\n{text}")
    with open(os.path.join(o.output_dir, "summary.txt"), "w") as f:
        f.write(f"{header}\n{text}\n")
    with open(os.path.join(o.output_dir, "robust_accuracy.tsv"), "w") as f:
        f.write("eps\trobust_accuracy\n")
        f.writelines(f"{e:g}\t{a:.6g}\n" for e, a in zip(grid, accuracy))
    plot_curves(grid, {name: accuracy}, os.path.join(o.output_dir, "robust_accuracy.png"),
                xlabel=xlabel, ylabel="robust accuracy", title=header.split(";")[0])
    print(f"wrote {o.output_dir}/attack.tsv, robust_accuracy.tsv, robust_accuracy.png")


def analyze(o, paths: list[str]) -> None:
    """Robust-accuracy curves of several finished runs on one figure (and one table)."""
    import numpy as np

    from tfcert import results
    from tfcert.analysis import format_table, plot_curves

    curves = {}
    for path in paths:
        rows = results.read_tsv(path)
        cli.require(bool(rows), f"{path} has no rows yet")
        config_path = os.path.join(os.path.dirname(path), "config.json")
        config = results.read_config(config_path) if os.path.exists(config_path) else {}
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
    os.makedirs(o.output_dir, exist_ok=True)
    path = os.path.join(o.output_dir, "robust_accuracy_compare.png")
    plot = {name: np.interp(union, grid, acc, left=np.nan, right=np.nan)
            for name, (grid, acc) in curves.items()}
    plot_curves(union, plot, path, xlabel="ε", ylabel="robust accuracy")
    print(f"wrote {path}")

