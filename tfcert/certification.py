"""Certification runs over a dataset: resumable, shardable, mergeable (`tfcert.runs.certify`).

A run certifies the examples that the data options select and streams one row
per example to ``<output_dir>/certify.tsv``; at the end it writes the certified-accuracy
table (``summary.txt``, ``certified_accuracy.tsv``) and plot (``certified_accuracy.png``).
What makes a finished run trustworthy:

- **Identity.** ``config.json`` records every option.  All of them except `OPERATIONAL`
  ones (scheduling, output and display options, which never change a row) are the run's
  identity; a rerun into the same directory with another identity is refused before
  anything is written (growing or shrinking ``num_examples`` only changes which rows
  are wanted).
- **Per-example noise.** The noise of an example is keyed by (seed, its index in the
  split, draw number) (`tfcert.keys.draw_keys`), so its row does not depend on the
  batch, the pass size, a resume point or a shard.
- **Shards.** ``num_shards = N, shard_index = j`` certifies the selected positions
  i ≡ j (mod N); `merge_runs` joins the shard directories into one run whose rows are
  those of a single run.
- **Kill safety.** Rows are appended and synced a step at a time, the TSV header and
  the config are written atomically, a torn last line is dropped with a warning and
  recomputed, stale summaries are removed before new work, and a lock keeps two
  processes out of one run directory.

The work of a run is a `CertifyTask` (`tfcert.runs.steps.StepTask`), computed by the local
or the Beam engine (`tfcert.runs.driver`).  Options are attributes of ``options`` (a
`tfcert.runs.CertifyConfig`, or a namespace of a run's ``config.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tfcert import cli, results

TSV, SELECTION_FILE = "certify.tsv", "selection.json"
SUMMARY_FILES = ("summary.txt", "certified_accuracy.tsv", "certified_accuracy.png")
# Options that never change a row: where and how fast a run goes, and how it is shown.
# Every other option (including any added later) is part of the run's identity; the model
# is identified by its SHA-256 (``model_sha256``), not by its path.
OPERATIONAL = frozenset({
    "output_dir", "model", "num_examples", "images_per_step", "batch_size", "num_shards",
    "shard_index", "download", "stn_factor", "max_radius", "grid_points", "analyze", "merge",
    "engine", "beam_options"})


def merge_runs(run_dirs: Sequence[str], output_dir: str,
               options_override: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """Joins the shard runs ``run_dirs`` into one run in ``output_dir``.

    Checks that the shards' configurations agree except for the shard index, that
    their shard indices are 0 … N − 1 once each, and that every shard has all the rows
    of its selection; then writes ``certify.tsv`` sorted by index (the rows of a single
    run), its ``config.json`` and the summary, table and plot.

    Args:
        run_dirs: the shards' run directories.
        output_dir: the merged run's directory.
        options_override: display options (e.g. ``grid_points``) that replace the shards'.

    Returns:
        The merged rows, sorted by index.
    """
    require = cli.require
    require(len(run_dirs) >= 1, "--merge needs the shard run directories, e.g. --merge=D1,D2")
    configs = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "config.json")
        require(os.path.exists(path), f"{run_dir} is not a certify.py run (no config.json)")
        configs.append(results.read_config(path))
    first = configs[0]
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        changed = [k for k in sorted(set(first) | set(config))
                   if k not in OPERATIONAL - {"num_shards"} and first.get(k) != config.get(k)]
        require(not changed, f"{run_dir} is not a shard of the run in {run_dirs[0]}: "
                + ", ".join(f"--{k} ({first.get(k)} -> {config.get(k)})" for k in changed))
    shards = sorted(c.get("shard_index", 0) for c in configs)
    total = first.get("num_shards", 1)
    require(shards == list(range(total)),
            f"--merge needs each of the {total} shards once, got shard indices {shards}")
    rows, columns = {}, None
    for run_dir in run_dirs:
        table_path = os.path.join(run_dir, TSV)
        selection_path = os.path.join(run_dir, SELECTION_FILE)
        require(os.path.exists(table_path) and os.path.exists(selection_path),
                f"{run_dir} has not started: run its certify.py command first")
        with open(selection_path) as f:
            selection = [str(i) for i in json.load(f)["indices"]]
        shard_rows = {r["index"]: r for r in results.read_tsv(table_path)}
        missing = [i for i in selection if i not in shard_rows]
        require(not missing, f"{run_dir} lacks rows for {len(missing)} of its examples "
                f"(first: index {missing[0] if missing else ''}): rerun its command to finish it")
        repeated = sorted(set(selection) & set(rows), key=int)
        require(not repeated, f"index {repeated[0] if repeated else ''} is in two shards")
        rows.update({i: shard_rows[i] for i in selection})
        columns = columns or list(next(iter(shard_rows.values())))
    merged = {**first, "num_shards": 1, "shard_index": 0, "merge": list(run_dirs),
              "output_dir": output_dir}
    ordered = [rows[i] for i in sorted(rows, key=int)]
    with results.locked_run_dir(output_dir):
        results.prepare_run_dir(output_dir, merged, OPERATIONAL)  # refuses another run's folder
        results.write_tsv(os.path.join(output_dir, TSV), columns, ordered)
        write_selection(output_dir, [int(r["index"]) for r in ordered])
        options = argparse.Namespace(**{**merged, **(options_override or {})})
        make_certifier(options).summarize(ordered, output_dir)
    return ordered


def write_selection(output_dir: str, indices: Iterable[int]) -> None:
    """Writes ``selection.json``: the indices of the examples a run (or shard) wants."""
    results.write_atomic(os.path.join(output_dir, SELECTION_FILE),
                         json.dumps({"indices": [int(i) for i in indices]}) + "\n")


def table_columns(certifier) -> list[str]:
    """The columns of ``certify.tsv`` for ``certifier``."""
    return ["index", "label", *certifier.columns, "seconds"]


def certify_step(certifier, images: np.ndarray, labels: np.ndarray,
                 indices: np.ndarray) -> list[dict[str, Any]]:
    """The TSV rows of one step (every engine's unit of work): index, label, the
    certifier's columns and the step's seconds per example."""
    began = time.time()
    rows = certifier.certify(images, labels, indices)
    seconds = (time.time() - began) / len(indices)
    return [{"index": index, "label": label, **row, "seconds": seconds}
            for index, label, row in zip(indices, labels, rows)]


def make_certifier(options):
    """The certifier of ``options.defense``: ℓ2 radii for gaussian, KL otherwise."""
    return L2Certifier(options) if options.defense == "gaussian" else KLCertifier(options)


class CertifyTask:
    """Certification as a `tfcert.runs.steps.StepTask`: steps of ``images_per_step``
    indices, certified with `certify_step` (rows keyed by index).

    Args:
        options: the run's options (a namespace with every option and ``model_sha256``).
        columns: the TSV columns (`table_columns`).
        images_per_step: examples per step.
    """

    key, unit = "index", "certified"

    def __init__(self, options: Any, columns: Sequence[str], images_per_step: int):
        self.options, self.columns, self.images_per_step = options, list(columns), images_per_step
        self.models = {"model": (options.model, options.model_sha256),
                       **cli.denoiser_file(options)}

    def steps(self, todo: list[str]) -> list[tuple[int, ...]]:
        return [tuple(int(i) for i in todo[s:s + self.images_per_step])
                for s in range(0, len(todo), self.images_per_step)]

    def label(self, step: tuple[int, ...]) -> str:
        # the first index names the step: it has no row yet, so no earlier part has it
        return f"{step[0]:010d}"

    def size(self, step: tuple[int, ...]) -> int:
        return len(step)

    def example_indices(self, step: tuple[int, ...]) -> tuple[int, ...]:
        return step

    def order(self, key: str) -> int:
        return int(key)

    def select(self) -> cli.Selection:
        return cli.select_examples(self.options)

    def setup(self, models: Mapping[str, Any], examples: cli.Selection) -> None:
        self.examples = examples
        self.certifier = make_certifier(self.options)
        from tfcert.models import with_denoiser

        self.certifier.setup(with_denoiser(models["model"], models.get("denoiser")),
                             examples.meta.num_classes)

    def run(self, step: tuple[int, ...]) -> list[dict[str, Any]]:
        e = self.examples.subset(step)
        return certify_step(self.certifier, e.images, e.labels, e.indices)


class L2Certifier:
    """ℓ2 certificates of the Gaussian-smoothed classifier (STN Thm. 2, Cohen, PixelDP).

    With ``target_radius`` or ``min_radius_gain`` set, each example stops sampling early
    (`tfcert.sequential.certify_sequential` with ``stopping_method``), ``num_samples`` is
    the most samples per example, and the rows record the samples spent (``samples``).
    """

    def __init__(self, options):
        self.o = options

    @property
    def early_stopping(self) -> bool:
        # getattr: a merge rebuilds the options from config.json files that may predate
        # the budget mode (and --stopping_method, whose only method then was checkpoints)
        return (self.o.target_radius is not None
                or getattr(self.o, "min_radius_gain", None) is not None)

    @property
    def columns(self) -> list[str]:
        early = ["samples"] if self.early_stopping else []
        return ["prediction", "correct", *[f"radius_{b}" for b in self.o.bounds],
                "p1_lower", "p2_upper", "counts", *early]

    def setup(self, model, num_classes: int) -> None:
        from tfcert.layers import GaussianNoise
        from tfcert.smoothing import SmoothedClassifier

        self.smoothed = SmoothedClassifier(model, num_classes, GaussianNoise(self.o.sigma),
                                           batch_size=self.o.batch_size,
                                           compute_dtype=self.o.compute_dtype)

    def rule(self):
        """The `tfcert.sequential.StoppingRule` rule of the options."""
        from tfcert.sequential import StoppingRule

        o = self.o
        growth = o.checkpoint_growth if o.stopping_method == "checkpoints" else None
        return StoppingRule(o.target_radius, o.stopping_method, o.min_radius_gain,
                             first_look=o.first_checkpoint, growth=growth)

    def certify(self, images, labels, indices) -> list[dict]:
        o = self.o
        options = dict(alpha=o.alpha, bound=o.bounds, statistics=o.statistics,
                       num_selection_samples=o.num_selection_samples, seed=o.seed,
                       indices=indices)
        if self.early_stopping:
            from tfcert.sequential import certify_sequential

            cert = certify_sequential(self.smoothed, images, o.num_samples, self.rule(),
                                      **options)
        else:
            cert = self.smoothed.certify(images, o.num_samples, **options)
        return [{"prediction": cert.prediction[j], "correct": int(cert.prediction[j] == label),
                 **{f"radius_{b}": float(cert.radii[b][j]) for b in o.bounds},
                 "p1_lower": float(cert.p1_lower[j]), "p2_upper": float(cert.p2_upper[j]),
                 "counts": cert.counts[j].tolist(),
                 **({"samples": int(cert.num_samples[j])} if self.early_stopping else {})}
                for j, label in enumerate(labels)]

    def summarize(self, rows, output_dir: str) -> None:
        o = self.o
        summarize_l2(rows, o, output_dir)
        if self.early_stopping:
            spent = sum(int(r["samples"]) for r in rows)
            goal = (f"r = {o.target_radius}" if o.target_radius is not None
                    else f"a radius gain <= {o.min_radius_gain}")
            caveat = ("; radii above the target are not pursued" if o.target_radius is not None
                      else "")
            print(f"early stopping at {goal} ({getattr(o, 'stopping_method', 'checkpoints')}): "
                  f"{spent / max(len(rows), 1):.0f} samples per example on average (at most "
                  f"{o.num_samples}){caveat}")


class KLCertifier:
    """ℓ∞ KL certificates of randomized discretization (Zhang & Liang Props. 1–2).

    Per example and ε: the votes of f(RandDisc(x)) give a sound lower bound on the
    margin (Clopper-Pearson at α); U_KL is Prop. 1's bound, whose expectation over the
    random centers is bounded by a betting confidence bound over ``num_center_samples``
    center sets at level α′ (``kl_alpha``), so a certificate fails with probability at
    most α + α′ per example and ε (`tfcert.kl`).  For colour images (q > 1) the
    assignment probabilities are Monte-Carlo estimates and U_KL is not a bound: those
    rows say ``rigorous = 0``.  The down-sampled defense uses the Table 1 pooling of each
    ε, so each ε has its own votes.
    """

    def __init__(self, options):
        self.o = options
        self.eps = cli.eps_grid(options.eps, "inf")

    @property
    def columns(self) -> list[str]:
        per_eps = [f"{name}_{e:g}" for e in self.eps
                   for name in ("certified", "u_kl", "margin", "failure_probability")]
        return ["prediction", "correct", *per_eps, "rigorous", "counts"]

    def setup(self, model, num_classes: int) -> None:
        from tfcert.layers import RandomizedDiscretization, downsampling_for_epsilon
        from tfcert.smoothing import SmoothedClassifier

        o = self.o
        fixed = None
        if o.fixed_centers:
            fixed = [[float(v)] for v in o.fixed_centers]
            cli.require(len(fixed) == o.num_clusters,
                        "--fixed_centers needs one value per cluster (--num_clusters)")
        pools = ([downsampling_for_epsilon(e) for e in self.eps]
                 if o.defense == "randdisc_downsampled" else [(1, 1)] * len(self.eps))
        self.defenses = {}  # (pool, stride) -> smoothed classifier with that RandDisc layer
        for pool in dict.fromkeys(pools):
            layer = RandomizedDiscretization(
                o.num_clusters, o.sigma, o.center_stddev or o.sigma,
                num_candidates=o.num_candidates, fixed_centers=fixed,
                pool_size=pool[0], pool_strides=pool[1])
            self.defenses[pool] = SmoothedClassifier(model, num_classes, layer,
                                                     batch_size=o.batch_size,
                                                     compute_dtype=o.compute_dtype)
        self.pools = pools

    def certify(self, images, labels, indices) -> list[dict]:
        from tfcert import kl
        from tfcert.keys import draw_keys, run_key

        o = self.o
        keys = draw_keys(run_key(o.seed), kl.CENTER_STREAM, indices)
        rows = [{} for _ in labels]
        for pool, smoothed in self.defenses.items():
            counts = smoothed.sample_counts(images, o.num_samples, seed=o.seed, indices=indices)
            eps = [e for e, p in zip(self.eps, self.pools) if p == pool]
            bound = kl.layer_kl_bound(smoothed.noise, images, eps,
                                      num_center_samples=o.num_center_samples,
                                      kl_alpha=o.kl_alpha, keys=keys)
            cert = kl.kl_certify(counts, labels, bound, o.alpha)
            certified = np.asarray(cert.certified)
            margin = np.broadcast_to(np.asarray(cert.margin_lower), certified.shape)
            u_kl = np.asarray(bound.value)
            for j, row in enumerate(rows):
                if pool == self.pools[0]:
                    prediction = int(np.argmax(counts[j]))
                    row.update(prediction=prediction, correct=int(prediction == labels[j]),
                               counts=counts[j].tolist(), rigorous=int(bound.rigorous))
                for e_i, e in enumerate(eps):
                    row.update({f"certified_{e:g}": int(certified[e_i, j]),
                                f"u_kl_{e:g}": float(u_kl[e_i, j]),
                                f"margin_{e:g}": float(margin[e_i, j]),
                                f"failure_probability_{e:g}": float(cert.failure_probability)})
        return rows

    def summarize(self, rows, output_dir: str) -> None:
        from tfcert.analysis import format_table

        o = self.o
        accuracy = np.array([np.mean([r[f"certified_{e:g}"] == "1" for r in rows])
                             for e in self.eps])
        clean = np.mean([r["correct"] == "1" for r in rows])
        centers = "fixed centers" if o.fixed_centers else "image-dependent centers"
        failure = max(float(r[f"failure_probability_{e:g}"]) for r in rows for e in self.eps)
        header = (f"{len(rows)} examples, {o.defense} (k = {o.num_clusters}, σ = "
                  f"{o.sigma}, τ = {o.center_stddev or o.sigma}, {centers}), "
                  f"n = {o.num_samples}; majority-vote accuracy {100 * clean:.1f}%")
        guarantee = (f"failure probability ≤ {failure:g} per example and ε (margin: "
                     f"Clopper-Pearson at α = {o.alpha}; U_KL: "
                     + ("exact" if failure <= o.alpha else
                        f"betting bound over {o.num_center_samples} center sets at α′ = "
                        f"{o.kl_alpha}") + ")")
        if any(r["rigorous"] == "0" for r in rows):
            guarantee += ("\nU_KL is a Monte-Carlo ESTIMATE (q > 1), not a bound: the "
                          "KL-certified accuracy is not a guarantee")
        text = format_table(self.eps, {"certified": accuracy}, header="ℓ∞ ε")
        print(f"{header}\n{guarantee}\nKL-certified accuracy (Zhang & Liang Prop. 2):\n{text}")
        results.write_atomic(os.path.join(output_dir, "summary.txt"),
                             f"{header}\n{guarantee}\n{text}\n")
        plot_atomic(self.eps, {o.defense: accuracy},
                    os.path.join(output_dir, "certified_accuracy.png"), xlabel="ℓ∞ ε",
                    title=header.split(";")[0])
        print(f"wrote {output_dir}/certify.tsv, summary.txt, certified_accuracy.png")


def plot_atomic(grid, curves, path: str, **kwargs) -> None:
    """`tfcert.analysis.plot_curves` to ``path``, replaced whole (never half written)."""
    from tfcert.analysis import plot_curves

    partial = path[:-len(".png")] + ".partial.png"
    plot_curves(grid, curves, partial, **kwargs)
    os.replace(partial, path)


def radius_grid(max_radius: float, points: int) -> np.ndarray:
    return np.linspace(0.0, max_radius, points)


def curves_of(rows, bounds: Iterable[str], grid, factor: float) -> dict:
    """Certified accuracy at each radius of ``grid``, one curve per bound."""
    from tfcert.analysis import certified_accuracy

    correct = np.array([r["correct"] == "1" for r in rows])
    return {b: certified_accuracy(np.array([float(r[f"radius_{b}"]) for r in rows]), correct,
                                  grid, factor) for b in bounds}


def acr_of(rows, bounds: Iterable[str], factor: float) -> dict:
    """The average certified radius of each bound."""
    from tfcert.analysis import average_certified_radius

    correct = np.array([r["correct"] == "1" for r in rows])
    return {b: average_certified_radius(np.array([float(r[f"radius_{b}"]) for r in rows]),
                                        correct, factor) for b in bounds}


def summarize_l2(rows, o, output_dir: str) -> None:
    """Prints and writes the certified-accuracy table, its TSV and plot."""
    from tfcert.analysis import format_table

    factor = (1.0 - o.alpha) if o.stn_factor else 1.0
    max_radius = o.max_radius or 4.0 * o.sigma
    table_grid = radius_grid(max_radius, o.grid_points)
    curves = curves_of(rows, o.bounds, table_grid, factor)
    text = format_table(table_grid, curves, acr=acr_of(rows, o.bounds, factor))
    abstain = np.mean([r["prediction"] == "-1" for r in rows])
    header = (f"{len(rows)} examples, σ = {o.sigma}, n = {o.num_samples}, α = {o.alpha}, "
              f"statistics = {o.statistics}, abstained {100 * abstain:.1f}%"
              + (", accuracy × (1 − α) (STN convention)" if factor != 1.0 else ""))
    print(f"{header}\ncertified accuracy (% of examples correct with radius ≥ r):\n{text}")
    results.write_atomic(os.path.join(output_dir, "summary.txt"), f"{header}\n{text}\n")
    results.write_tsv(os.path.join(output_dir, "certified_accuracy.tsv"), ["radius", *o.bounds],
                      [{"radius": float(r), **{b: float(curves[b][i]) for b in o.bounds}}
                       for i, r in enumerate(table_grid)])
    plot_grid = radius_grid(max_radius, 200)
    plot_atomic(plot_grid, curves_of(rows, o.bounds, plot_grid, factor),
                os.path.join(output_dir, "certified_accuracy.png"),
                title=f"σ = {o.sigma}, n = {o.num_samples}, α = {o.alpha}")
    print(f"wrote {output_dir}/certify.tsv, certified_accuracy.tsv, certified_accuracy.png")


def run_labels(paths: Sequence[str]) -> list[str]:
    """A label per run: its folder's name, or as many trailing folders as make the labels
    distinct (``a/certify/certify.tsv`` and ``b/certify/certify.tsv``: ``a/certify``, …)."""
    folders = [os.path.dirname(os.path.abspath(path)).split(os.sep) for path in paths]
    for depth in range(1, max(map(len, folders)) + 1):
        labels = ["/".join(parts[-depth:]) for parts in folders]
        if len(set(labels)) == len(labels):
            break
    return labels


def analyze(paths: Sequence[str], o) -> None:
    """Draws the certified-accuracy curves of several finished runs on one figure:
    against the ℓ2 radius for Gaussian runs, against ℓ∞ ε for KL (RandDisc) runs."""
    runs = []
    for path, label in zip(paths, run_labels(paths)):
        rows = results.read_tsv(path)
        cli.require(bool(rows), f"{path} has no rows yet")
        cli.require(any(c.startswith(("radius_", "certified_")) for c in rows[0]),
                    f"{path} is not a {TSV} of certify.py (columns {', '.join(rows[0])})")
        config_path = os.path.join(os.path.dirname(path), "config.json")
        config = results.read_config(config_path) if os.path.exists(config_path) else {}
        if "sigma" in config:
            label += f" σ={config['sigma']}"
        runs.append((label, rows))
    kinds = {any(c.startswith("certified_") for c in rows[0]) for _, rows in runs}
    cli.require(len(kinds) == 1, "--analyze needs runs of one kind: all ℓ2 (gaussian) or all "
                "KL (randdisc)")
    os.makedirs(o.output_dir, exist_ok=True)
    (_analyze_kl if kinds.pop() else _analyze_l2)(runs, o)


def _analyze_l2(runs, o) -> None:
    from tfcert.analysis import format_table

    bounds = {label: [c[len("radius_"):] for c in rows[0] if c.startswith("radius_")]
              for label, rows in runs}
    radii = [float(r[f"radius_{b}"]) for label, rows in runs for r in rows for b in bounds[label]]
    max_radius = o.max_radius or max(max(radii), 1e-3)
    factor = (1.0 - o.alpha) if o.stn_factor else 1.0

    def all_curves(grid):
        return {f"{label} {b}": c for label, rows in runs
                for b, c in curves_of(rows, bounds[label], grid, factor).items()}

    table_grid = radius_grid(max_radius, o.grid_points)
    acr = {f"{label} {b}": value for label, rows in runs
           for b, value in acr_of(rows, bounds[label], factor).items()}
    print(format_table(table_grid, all_curves(table_grid), acr=acr))
    path = os.path.join(o.output_dir, "certified_accuracy_compare.png")
    plot_grid = radius_grid(max_radius, 200)
    plot_atomic(plot_grid, all_curves(plot_grid), path, styles=run_styles(runs, bounds))
    print(f"wrote {path}")


def run_styles(runs, bounds: dict[str, list[str]]) -> dict[str, dict]:
    """Line styles of the compared curves: one colour per run, one dash pattern per bound."""
    import matplotlib

    colours = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    dashes = {"renyi": "-", "cohen": "--", "pixeldp": ":"}
    return {f"{label} {b}": {"color": colours[i % len(colours)],
                             "linestyle": dashes.get(b, "-")}
            for i, (label, _) in enumerate(runs) for b in bounds[label]}


def _analyze_kl(runs, o) -> None:
    from tfcert.analysis import format_table

    grids = [sorted(float(c[len("certified_"):]) for c in rows[0] if c.startswith("certified_"))
             for _, rows in runs]
    cli.require(all(g == grids[0] for g in grids), f"the runs have different --eps grids {grids}")
    curves = {label: np.array([np.mean([r[f"certified_{e:g}"] == "1" for r in rows])
                               for e in grids[0]]) for label, rows in runs}
    print(format_table(grids[0], curves, header="ℓ∞ ε"))
    path = os.path.join(o.output_dir, "certified_accuracy_compare.png")
    plot_atomic(grids[0], curves, path, xlabel="ℓ∞ ε")
    print(f"wrote {path}")
