"""The run driver of certification and attack runs (`certify`, `attack`): one flow for the
local and the Beam engine.

Before the work the driver refuses what cannot run (options, Beam's options, data, models
that do not fit the data, a run directory of another run) before anything is written;
then it locks and prepares the run directory (``config.json``: every option, the
models' SHA-256 and what identifies the data read, `tfcert.data.Split.identity`: the run's
identity), opens the run's TSV, has an engine compute the rows
the TSV lacks (`tfcert.runs.steps.run_local` or `tfcert.beam_pipeline.run_steps`, over the
run's `tfcert.runs.steps.StepTask`) and writes the summaries.  The lock is released when
the run ends, also by an error, so the same process can resume the run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

from tfcert import certification, cli, results, robust_accuracy
from tfcert.runs import steps
from tfcert.runs.config import AttackConfig, CertifyConfig

Rows = list[dict[str, str]]


def certify(config: CertifyConfig) -> Rows | None:
    """Runs ``tfcert-certify`` with the options of ``config``: certifies the selected examples
    that have no row yet in ``<output_dir>/certify.tsv`` (a resumable, shardable run, see
    `tfcert.certification`), then writes the certified-accuracy summary, table and plot;
    or, with ``config.merge``, joins shard runs; or, with ``config.analyze``, draws
    finished runs on one figure.

    Args:
        config: the run's options.

    Returns:
        The run's rows (dicts of the TSV's strings) in the order of the selection (by index
        for a merge); None for an analysis.

    Raises:
        tfcert.cli.CliError, tfcert.results.RunConfigMismatchError,
        tfcert.data.DataUnavailableError, FileNotFoundError: what the script reports in
        one line (a model that does not fit the data, a run directory of other settings, …).
    """
    if config.analyze:
        certification.analyze(config.analyze, config)
        return None
    if config.merge:
        display = {k: getattr(config, k) for k in ("stn_factor", "max_radius", "grid_points")}
        return certification.merge_runs(config.merge, config.output_dir, display)
    pipeline_options = _pipeline_options(config)
    examples = cli.select_examples(config)
    models = _load_models({"model": config.model}, examples, config.dataset, config.denoiser)
    record = {**config.to_dict(), "model_sha256": cli.file_sha256(config.model),
              **_denoiser_hash(config), **examples.identity}
    certifier = certification.make_certifier(config)
    task = certification.CertifyTask(_task_options(record, config.engine),
                                     certification.table_columns(certifier),
                                     config.images_per_step)
    return _run(task, config, record, certification.TSV, certification.OPERATIONAL,
                certification.SUMMARY_FILES, [str(i) for i in examples.indices], models,
                examples, pipeline_options,
                opened=lambda: certification.write_selection(config.output_dir,
                                                              examples.indices),
                summarize=lambda rows: certifier.summarize(rows, config.output_dir))


def attack(config: AttackConfig) -> Rows | None:
    """Runs ``tfcert-attack`` with the options of ``config``: attacks the selected examples at
    each ε that have no row yet in ``<output_dir>/attack.tsv`` (see
    `tfcert.robust_accuracy`), then writes the robust-accuracy summary, table and plot; or,
    with ``config.analyze``, draws finished runs on one figure.

    Args:
        config: the run's options.

    Returns:
        The run's rows (dicts of the TSV's strings), by ε then index; None for an analysis.

    Raises:
        tfcert.cli.CliError, tfcert.results.RunConfigMismatchError,
        tfcert.data.DataUnavailableError, FileNotFoundError: what the script reports in
        one line.
    """
    if config.analyze:
        robust_accuracy.analyze(config, config.analyze)
        return None
    grid = cli.eps_grid(config.eps, robust_accuracy.attack_norm(config))
    pipeline_options = _pipeline_options(config)
    examples = cli.select_examples(config, shard=False)
    models = _load_models({"model": config.model, "source_model": config.source_model},
                          examples, config.dataset, config.denoiser)
    record = {**robust_accuracy.run_config(config, config.to_dict()), **_denoiser_hash(config),
              **examples.identity}
    robust_accuracy.check_randomness(config.output_dir)
    task = robust_accuracy.AttackTask(_task_options(record, config.engine), grid,
                                      examples.indices)
    wanted = [robust_accuracy.key(e, i) for e in grid for i in examples.indices]
    return _run(task, config, record, robust_accuracy.TSV, robust_accuracy.OPERATIONAL,
                robust_accuracy.SUMMARY_FILES, wanted, models, examples, pipeline_options,
                summarize=lambda rows: robust_accuracy.summarize(config, rows,
                                                                 examples.indices, grid))


def _pipeline_options(config: CertifyConfig | AttackConfig) -> Any:
    """Beam's `PipelineOptions` of ``--engine=beam`` (checked, and Beam's presence, before
    any output), else None."""
    if config.engine != "beam":
        return None
    from tfcert import beam_pipeline

    return beam_pipeline.parse_pipeline_options(config.beam_options)


def _load_models(paths: Mapping[str, str | None], examples: cli.Selection, dataset: str,
                 denoiser: str | None = None) -> dict[str, Any]:
    """The models of ``paths`` (name -> .keras file; None: no such model), each checked to
    take the examples' images and give one logit per class; with a ``denoiser`` (.keras
    file), also ``models["denoiser"]``, and ``models["model"]`` is checked behind it."""
    models = {}
    for name, path in paths.items():
        if path is not None:
            models[name] = cli.load_model(path)
            base = models[name]
            if name == "model" and denoiser is not None:
                models["denoiser"], base = cli.denoised_model(base, denoiser)
            cli.check_model_fits(base, examples.meta, path, dataset)
    return models


def _denoiser_hash(config: CertifyConfig | AttackConfig) -> dict[str, str]:
    """``{"denoiser_sha256": ...}`` when the run has a denoiser, else ``{}`` (so the
    identities of runs without one stay what they were)."""
    return {} if config.denoiser is None else {"denoiser_sha256": cli.file_sha256(config.denoiser)}


def _task_options(record: dict[str, Any], engine: str) -> argparse.Namespace:
    """The options a task carries: the run's record as a namespace (for Beam's workers, with
    a local data folder made absolute)."""
    if engine == "beam":
        from tfcert import beam_pipeline

        return beam_pipeline.worker_options(record)
    return argparse.Namespace(**record)


def _run(task: steps.StepTask, config: CertifyConfig | AttackConfig, record: dict[str, Any],
         tsv: str, operational: frozenset[str], summary_files: Sequence[str],
         wanted: Sequence[str], models: Mapping[str, Any], examples: cli.Selection,
         pipeline_options: Any, summarize: Callable[[Rows], None],
         opened: Callable[[], None] = lambda: None) -> Rows:
    """The run around the engine: locks and prepares the run directory, opens the TSV,
    computes the wanted rows it lacks, summarizes them.

    Args:
        task: the run's work.
        config: the run's options (``output_dir``, ``engine``).
        record: the run's ``config.json``.
        tsv: the TSV's file name.
        operational: the options that are not the run's identity.
        summary_files: the files of the summary (removed before new work).
        wanted: the keys of the run's rows.
        models: the loaded models by name.
        examples: the run's examples.
        pipeline_options: Beam's options (`_pipeline_options`; None: the local engine).
        summarize: writes the summaries of the wanted rows.
        opened: called once the TSV is open (writes the run's other files).

    Returns:
        The wanted rows, in the order of ``wanted``.
    """
    output_dir = config.output_dir
    with results.locked_run_dir(output_dir):
        results.prepare_run_dir(output_dir, record, operational, type(config).defaults(), tsv)
        table = results.ResultTable(os.path.join(output_dir, tsv), task.columns, task.key)
        opened()

        def before_work() -> None:
            results.remove_files(output_dir, summary_files)

        if pipeline_options is None:
            rows = steps.run_local(task, table, wanted, models, examples, before_work)
        else:
            from tfcert import beam_pipeline

            rows = beam_pipeline.run_steps(task, pipeline_options, output_dir, table, wanted,
                                           before_work)
        ordered = [rows[k] for k in wanted]
        summarize(ordered)
    return ordered
