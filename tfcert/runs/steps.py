"""The seam between a run and its engines: a run's work as a `StepTask`, and the local engine.

A task cuts the rows a run still lacks into steps of a few examples; an engine computes
the steps and writes their rows: `run_local` in this process, appended to the run's TSV
a step at a time, or `tfcert.beam_pipeline.run_steps` on an Apache Beam pipeline.  The
tasks are `tfcert.certification.CertifyTask` and `tfcert.robust_accuracy.AttackTask`;
`tfcert.runs.driver` prepares the run around either engine.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

from tfcert import cli, results


class StepTask(Protocol):
    """Steps of work, each a few examples, that compute the rows of a run's TSV.

    A task is pickled to Beam's workers, so it holds only options and small lists;
    `select` and `setup` load the rest where the steps run.
    """

    columns: list[str]  # the TSV's columns
    key: str  # the column that identifies a row
    unit: str  # what the progress bar counts
    models: dict[str, tuple[str, str]]  # name -> (driver's model file, its SHA-256)

    def steps(self, todo: list[str]) -> list[Any]:
        """Steps (picklable, hashable) that compute the rows of keys ``todo`` (others too)."""

    def label(self, step: Any) -> str:
        """The part-file label of a step: a function of the step's contents only."""

    def size(self, step: Any) -> int:
        """The rows of a step."""

    def example_indices(self, step: Any) -> Sequence[int]:
        """The examples' indices in a step."""

    def order(self, key: str) -> Any:
        """The sort key of a row key in a TSV written whole."""

    def select(self) -> cli.Selection:
        """Loads the task's examples (on a worker that has only the task)."""

    def setup(self, models: Mapping[str, Any], examples: cli.Selection) -> None:
        """Once before the steps: builds what they need from the loaded models (name ->
        keras model) and the examples."""

    def run(self, step: Any) -> list[dict[str, Any]]:
        """The rows of a step."""


def run_local(task: StepTask, table: results.ResultTable, wanted: Sequence[str],
              models: Mapping[str, Any], examples: cli.Selection,
              before_work: Callable[[], None] = lambda: None) -> dict[str, dict[str, str]]:
    """The local engine: computes the wanted rows that ``table`` lacks in this process,
    appending each step's rows (those wanted and not yet written) before the next step.

    Args:
        task: the work.
        table: the run's TSV.
        wanted: the keys of the rows the run wants.
        models: the loaded models by name (`StepTask.models`' names).
        examples: the run's examples (`StepTask.select`).
        before_work: called once if there is work to do (e.g. removes stale summaries).

    Returns:
        Every row of the table by key.
    """
    todo = [k for k in wanted if k not in table.done]
    progress = cli.Progress(len(wanted), task.unit, len(wanted) - len(todo))
    if todo:
        before_work()
        task.setup(models, examples)
        pending = set(todo)
        for step in task.steps(todo):
            new = [row for row in task.run(step) if str(row[task.key]) in pending]
            table.append(new)
            progress.update(progress.done + len(new))
    progress.update(progress.done)  # closes the bar of a run with nothing to do
    return {row[task.key]: row for row in table.rows}
