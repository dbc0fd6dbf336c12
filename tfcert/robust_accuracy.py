r"""Robust accuracy of a defense under an attack over a sweep of ε: the work of
`tfcert.runs.attack` (``tfcert-attack``).

The defense is the base model behind a tfcert layer (``defense``: none, gaussian,
randdisc, randmix, smoothed, bitdepth, jpeg, tvm, resizepad).  White-box attacks get its
gradient (EOT over ``eot_samples`` draws for randomized defenses, BPDA through
RandDisc and the transformations' smooth approximations); ``transfer`` attacks
``source_model`` instead (STN: Madry's PGD-trained model); ``boundary`` only queries
labels.  A randomized defense classifies with one draw per image (Zhang & Liang's
setting); ``smoothed`` is STN's Algorithm 1, a majority vote over ``num_votes`` draws of
N(0, σ²) (attacked through its noisy base model with EOT).

A run streams one row per (ε, example) to ``<output_dir>/attack.tsv`` (key, eps, index,
label, clean and adversarial prediction, perturbation norm, robust, seconds) a batch at
a time; rerunning resumes, and adding ε values or examples only computes the new rows.
For the minimum-norm attacks (``cw_l2``, ``boundary``) one attack serves every ε: an
example is robust at ε when its adversarial example is farther than ε or still
classified correctly (else it is judged on the clean image).  At the end: a table on
stdout, ``robust_accuracy.tsv``, ``robust_accuracy.png`` and ``summary.txt``.
`analyze` draws several finished runs on one figure (Zhang & Liang Fig. 2, STN Figs. 2–3).

**Per-example randomness** (``config.json``: ``"randomness": "per-example"``).  Every
random draw of a row (the attack's random start, proposals and EOT draws, the
defense's draws when it classifies, the smoothed defense's votes) comes from stateless
keys of the example alone: `tfcert.keys.draw_keys` of a run key made from
(``--seed``, purpose, ε) and the example's index in the split (`purpose_keys`; ε is left
out for the minimum-norm attacks, whose attack serves every ε, and for the clean
prediction).  So a row does not depend on ``--batch_size``, on the other examples of its
batch or on the worker (``--engine=beam``, `tfcert.beam_pipeline`): up to the last
float32 bits of the model's outputs, which may differ between batch sizes.  Runs made
before (one seed per batch) are refused (`check_randomness`).

The work of a run is an `AttackTask` (`tfcert.runs.steps.StepTask`), computed by the local
or the Beam engine (`tfcert.runs.driver`).  Options are attributes of ``o`` (a
`tfcert.runs.AttackConfig`, or a namespace of a run's configuration, `run_config`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

from tfcert import cli

DEFENSES = ("none", "gaussian", "randdisc", "randmix", "smoothed", "bitdepth", "jpeg", "tvm",
            "resizepad")
RANDOMIZED = ("gaussian", "randdisc", "randmix", "smoothed", "resizepad")
ATTACKS = ("pgd_linf", "pgd_l2", "cw_l2", "boundary", "transfer")
MINIMUM_NORM = ("cw_l2", "boundary")
DEFAULT_STEPS = {"pgd_linf": 40, "pgd_l2": 40, "transfer": 40, "cw_l2": 100, "boundary": 1000}

TSV = "attack.tsv"
SUMMARY_FILES = ("summary.txt", "robust_accuracy.tsv", "robust_accuracy.png")
UNIT = "attacked (ε, example) pairs"
COLUMNS = ["key", "eps", "index", "label", "clean_prediction", "adv_prediction", "distance",
           "robust", "seconds"]
# Flags that never change a row (where and how fast the run goes, which rows are wanted,
# how it is shown); every other flag, including any added later, is the run's identity.
# Models are identified by their SHA-256, not their paths.
OPERATIONAL = frozenset({"output_dir", "model", "source_model", "num_examples", "eps",
                         "download", "analyze", "batch_size", "engine", "beam_options"})
# How the rows' randomness is drawn (config.json "randomness"); a run directory with
# another value (older runs have none: one seed per batch) is refused.
RANDOMNESS = "per-example"
# Purposes of the run keys (`purpose_key`): the attack's draws, the defense's draws when
# it classifies the clean and the adversarial images.
ATTACK, CLEAN, ADVERSARIAL = 0, 1, 2


@dataclasses.dataclass
class Defense:
    """A defended classifier: the model attacks differentiate, and its class scores."""

    attack_model: Callable  # a tfcert.attacks.KeyedDefense: base(layer(x)), keyed draws
    scores: Callable  # (images, run key, indices) -> per-class scores [batch, k] (numpy)

    def classify(self, x, run_key, indices) -> "np.ndarray":
        return self.scores(x, run_key, indices).argmax(axis=1)


def attack_norm(o) -> str:
    """The norm in which perturbations are measured."""
    if o.attack == "transfer":
        return o.transfer_norm
    return "inf" if o.attack == "pgd_linf" else "2"


def key(eps: float, index) -> str:
    return f"{eps:g}/{index}"


def run_config(o, options: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``config.json``: every option (``options``, by name), the models' SHA-256,
    the resolved ``steps`` and ``eot_samples``, and `RANDOMNESS`."""
    return {**options, "model_sha256": cli.file_sha256(o.model),
            "source_model_sha256": cli.file_sha256(o.source_model) if o.source_model else None,
            "steps": o.steps or DEFAULT_STEPS[o.attack],
            "eot_samples": o.eot_samples or (20 if o.defense in RANDOMIZED else 1),
            "randomness": RANDOMNESS}


def check_randomness(output_dir: str) -> None:
    """Refuses a run directory whose rows were drawn another way than `RANDOMNESS` (runs of
    tfcert before per-example seeding drew one seed per batch)."""
    from tfcert import results

    path = os.path.join(output_dir, "config.json")
    if not os.path.exists(path):
        return
    found = results.read_config(path).get("randomness", "per-batch")
    if found != RANDOMNESS:
        raise results.RunConfigMismatchError(
            f"the run in {output_dir} was made by an older tfcert-attack that seeded the "
            f"attack randomness per batch ({found}), and this one seeds it per example: its "
            "rows cannot be continued; use another --output_dir (or delete it to rerun)")


def plan(o, grid, indices, todo: set[str]) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
    """The steps of work: (ε values, indices of at most ``--batch_size`` examples) with a
    row of ``todo`` among them; one ε per step, or the whole grid for a minimum-norm
    attack (one attack serves every ε)."""
    groups = [tuple(grid)] if o.attack in MINIMUM_NORM else [(e,) for e in grid]
    steps = []
    for eps_values in groups:
        missing = [int(i) for i in indices if any(key(e, i) in todo for e in eps_values)]
        steps += [(eps_values, tuple(missing[s:s + o.batch_size]))
                  for s in range(0, len(missing), o.batch_size)]
    return steps


def purpose_key(seed: int, purpose: int, eps: float | None = None) -> "np.ndarray":
    """The stateless run key (int64 [2]) of (seed, purpose, ε): from
    `numpy.random.SeedSequence` of the seed, the purpose and ε's float64 bits."""
    import numpy as np

    from tfcert.keys import run_key

    entropy = [seed, purpose] + ([] if eps is None else [int(np.float64(eps).view(np.int64))])
    return run_key(np.random.SeedSequence(entropy).generate_state(2, np.uint64).view(np.int64))


def purpose_keys(seed: int, purpose: int, eps: float | None, indices) -> "tf.Tensor":
    """Per-example keys int64 [batch, 2] of a purpose: `tfcert.keys.draw_keys` of the
    run key `purpose_key` and the examples' indices (what `SmoothedClassifier.sample_counts`
    derives from that run key and the indices)."""
    from tfcert.keys import ESTIMATION, draw_keys

    return draw_keys(purpose_key(seed, purpose, eps), ESTIMATION, indices)


class Attacker:
    """The rows of steps of work: holds the examples, the defense and the attack.

    Args:
        o: the run's configuration (`run_config`) as attributes (``steps`` and
            ``eot_samples`` resolved).
        examples: the selected examples.
        base, source: the base model and (``transfer``) the source model.
    """

    def __init__(self, o, examples: cli.Selection, base, source):
        self.o, self.examples = o, examples
        self.defense = build_defense(o, base, examples.meta.num_classes)
        self.attack = make_attack(o, self.defense, source)

    def rows(self, eps_values: tuple[float, ...], step: tuple[int, ...]) -> list[dict]:
        """Every row (each ε of ``eps_values`` × each example of ``step``) of a step."""
        import numpy as np

        o = self.o
        examples = self.examples.subset(step)
        began = time.time()
        x, y, ids = examples.images, examples.labels, np.asarray(step, np.int64)
        eps = None if o.attack in MINIMUM_NORM else eps_values[0]
        x_adv = np.asarray(self.attack(x, y, eps_values[0],
                                       purpose_keys(o.seed, ATTACK, eps, ids)))
        clean = self.defense.classify(x, purpose_key(o.seed, CLEAN), ids)
        adv = self.defense.classify(x_adv, purpose_key(o.seed, ADVERSARIAL, eps), ids)
        distance = norms(o, x_adv - x)
        seconds = (time.time() - began) / len(step)
        return [{"key": key(e, i), "eps": e, "index": i, "label": y[j],
                 "clean_prediction": clean[j], "adv_prediction": adv[j],
                 "distance": distance[j],
                 "robust": int((adv[j] if distance[j] <= e or o.attack not in MINIMUM_NORM
                                else clean[j]) == y[j]), "seconds": seconds}
                for e in eps_values for j, i in enumerate(step)]


class AttackTask:
    """The sweep as a `tfcert.runs.steps.StepTask`: the driver plans the steps; the engine
    (each Beam worker) builds an `Attacker` once and computes steps.

    Args:
        options: the run's configuration (`run_config`) as a namespace.
        grid: the ε values.
        indices: the selected examples' indices.
    """

    columns, key, unit = COLUMNS, "key", UNIT

    def __init__(self, options, grid: list[float], indices):
        self.options = options
        self.grid, self.indices = list(grid), [int(i) for i in indices]
        self.models = {"model": (options.model, options.model_sha256)}
        if options.source_model:
            self.models["source_model"] = (options.source_model, options.source_model_sha256)
        self.models.update(cli.denoiser_file(options))

    def steps(self, todo: list[str]) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
        return plan(self.options, self.grid, self.indices, set(todo))

    def label(self, step) -> str:
        """The part-file label: the first index and a digest of the step (ε values, indices)."""
        import hashlib

        digest = hashlib.sha256(repr(step).encode()).hexdigest()[:12]
        return f"{step[1][0]:010d}-{digest}"

    def size(self, step) -> int:
        return len(step[0]) * len(step[1])

    def example_indices(self, step) -> tuple[int, ...]:
        return step[1]

    def order(self, row_key: str) -> tuple[float, int]:
        eps, index = row_key.split("/")
        return float(eps), int(index)

    def select(self) -> cli.Selection:
        return cli.select_examples(self.options, shard=False)

    def setup(self, models: Mapping[str, Any], examples: cli.Selection) -> None:
        from tfcert.models import with_denoiser

        self.attacker = Attacker(self.options, examples,
                                 with_denoiser(models["model"], models.get("denoiser")),
                                 models.get("source_model"))

    def run(self, step) -> list[dict]:
        return self.attacker.rows(*step)


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
    """The defense of ``--defense`` around ``base``: keyed per example (`Defense.classify`
    of a randomized defense draws example b's noise from its key, one draw per image;
    ``smoothed`` counts ``--num_votes`` keyed votes, STN Algorithm 1)."""
    import tensorflow as tf

    from tfcert import smoothing
    from tfcert.attacks import KeyedDefense
    from tfcert.keys import ESTIMATION, draw_keys

    model = KeyedDefense(base, defense_layer(o))
    if o.defense == "smoothed":
        smoothed = smoothing.SmoothedClassifier(base, num_classes, defense_layer(o))
        return Defense(model, lambda x, run_key, indices: smoothed.sample_counts(
            x, o.num_votes, seed=run_key, indices=indices))
    logits = tf.function(lambda x, keys: model.group_logits(x[:, None], keys, 0)[:, 0],
                         reduce_retracing=True)

    def scores(x, run_key, indices):
        keys = draw_keys(run_key, ESTIMATION, indices)
        return logits(tf.constant(x), keys).numpy()

    return Defense(model, scores)


def make_attack(o, defense: Defense, source) -> Callable:
    """``attack(x, y, eps, keys) -> x_adv`` for --attack with the run's settings (``o``:
    `run_config`, ``keys``: the examples' stateless keys [batch, 2])."""
    from tfcert import attacks

    steps, eot = o.steps, o.eot_samples
    pgd_settings = dict(steps=steps, step_size=o.step_size, loss=o.loss,
                        confidence=o.confidence)
    if o.attack == "transfer":
        return lambda x, y, eps, keys: attacks.pgd(source, x, y, eps, norm=o.transfer_norm,
                                                   seed=keys, **pgd_settings)
    if o.attack == "cw_l2":
        return lambda x, y, eps, keys: attacks.carlini_wagner_l2(
            defense.attack_model, x, y, confidence=o.confidence,
            initial_const=o.initial_const, binary_search_steps=o.binary_search_steps,
            steps=steps, learning_rate=o.learning_rate, eot_samples=eot, seed=keys)
    if o.attack == "boundary":
        return lambda x, y, eps, keys: attacks.boundary_attack(
            defense.attack_model, x, y, steps=steps, trials=o.trials, seed=keys)
    return lambda x, y, eps, keys: attacks.pgd(
        defense.attack_model, x, y, eps, norm=attack_norm(o), eot_samples=eot, seed=keys,
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

    from tfcert import results
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
    results.write_atomic(os.path.join(o.output_dir, "summary.txt"), f"{header}\n{text}\n")
    results.write_tsv(os.path.join(o.output_dir, "robust_accuracy.tsv"),
                      ["eps", "robust_accuracy"],
                      [{"eps": float(e), "robust_accuracy": float(a)}
                       for e, a in zip(grid, accuracy)])
    plot_curves(grid, {name: accuracy}, os.path.join(o.output_dir, "robust_accuracy.png"),
                xlabel=xlabel, ylabel="robust accuracy", title=header.split(";")[0])
    print(f"wrote {o.output_dir}/attack.tsv, robust_accuracy.tsv, robust_accuracy.png")


def finished_rows(path: str) -> list[dict[str, str]]:
    """The complete rows of an ``attack.tsv`` (`results.read_tsv`), refused with a
    one-line error if the file is not one or if its ε values cover different examples
    (an interrupted run: its curve would mix ε values measured on different images)."""
    from tfcert import results

    rows = results.read_tsv(path)
    cli.require(bool(rows), f"{path} has no rows yet")
    cli.require(set(COLUMNS) <= set(rows[0]), f"{path} is not an {TSV} of tfcert-attack "
                f"(columns {', '.join(rows[0])})")
    examples: dict[str, set[str]] = {}
    for r in rows:
        examples.setdefault(r["eps"], set()).add(r["index"])
    cli.require(len({frozenset(v) for v in examples.values()}) == 1,
                f"{path} is unfinished (rows per ε: " + ", ".join(
                    f"{e}: {len(v)}" for e, v in examples.items())
                + "): rerun its command to finish it, then analyze")
    return rows


def analyze(o, paths: list[str]) -> None:
    """Robust-accuracy curves of several finished runs on one figure (and one table)."""
    import numpy as np

    from tfcert import results
    from tfcert.analysis import format_table, plot_curves

    curves = {}
    for path in paths:
        rows = finished_rows(path)
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

