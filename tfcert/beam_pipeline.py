"""Certification and attack sweeps on Apache Beam (``--engine=beam``, docs/SCALING.md).

``certify.py --engine=beam`` and ``tfcert-attack --engine=beam`` (``engine="beam"`` of
`tfcert.runs.certify` / `tfcert.runs.attack`) compute a run's rows with this engine
(`run_steps`) over a *task* (`tfcert.runs.steps.StepTask`:
`tfcert.certification.CertifyTask`, `tfcert.robust_accuracy.AttackTask`).  The driver
(`tfcert.runs.driver`, in the caller's process) does what it does for the local engine
before and after the work: it selects the examples (`tfcert.cli.select_examples`), checks
the models, prepares and locks the run directory (``config.json``), and at the end the
summary, table and plot; this engine writes the TSV (``certify.tsv``, ``attack.tsv``)
whole.  In between it runs a pipeline

    Create(steps) | Reshuffle | ParDo(StepFn)

whose workers each set the task up once (`StepFn.setup`: the data selection and the
models) and compute a step (a few examples: ``--images_per_step`` for certify,
``--batch_size`` for attacks) with the local engine's own code
(`tfcert.certification.certify_step`, `tfcert.robust_accuracy.Attacker`), so a row is
the local engine's row for the same seed: every random draw of a row is keyed by the
example's index (only ``seconds`` differs).

The driver and the workers share a **work directory** on any Beam file system
(``--tfcert_work_dir`` in ``--beam_options``: a local or shared path, ``gs://``,
``s3://``, ``hdfs://``; default ``<output_dir>/beam_parts``).  The driver stages the
models there (``model-<sha256>.keras``; a worker refuses a file with another SHA-256),
so a worker needs tfcert, the data (the packaged datasets need nothing; tfds datasets
need ``--data_dir`` reachable from the worker, e.g. on ``gs://``) and access to the work
directory, never the driver's disk.

Failure semantics and resume:

- **Workers write each step's rows to its own part file** ``<work dir>/
  part-<label>-<rows>.tsv`` (the label: the first index, and for attacks a digest of
  the step's ε values and indices), atomically (a temporary file, synced on a local
  disk, then renamed): a part file is complete or absent, and durable once it lands.
- **Retries cannot duplicate rows.**  A step's file name depends only on its contents,
  so a retried bundle (Dataflow, Flink and Spark retry failed bundles) rewrites the same
  file, and it skips the steps whose part file exists.  Rows are gathered by their key
  (the TSV's first, then the parts'), so a row is never counted twice.
- **A failed pipeline is retried by the engine** (`MAX_ATTEMPTS`) over the rows not yet
  written: Beam's local FnApiRunner (what DirectRunner runs batch pipelines on) does not
  retry bundles, so a raising worker fails the whole pipeline, and a worker process that
  dies would hang it (`WorkerDeathWatch` makes that a failure too).
- **Resume.**  Rerunning the command (after a kill of the driver, say) keeps every row of
  the TSV and of the part files and computes only the others.
- **The final step** (in the driver, after the pipeline) writes the TSV whole,
  atomically, sorted (by index; attacks by ε, then index), then deletes the work
  directory's files, then writes the summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from typing import Any, Callable, Sequence

from tfcert import cli, results
from tfcert.runs.steps import StepTask

try:
    import apache_beam as beam
except ModuleNotFoundError as err:
    if err.name != "apache_beam":  # Beam is installed but broken: show the real error
        raise
    raise cli.CliError("--engine=beam needs Apache Beam, which is not installed: "
                       "pip install 'tfcert[beam]'") from err
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,  # noqa: E402
                                                  StandardOptions, WorkerOptions)

PARTS_DIR = "beam_parts"
# Runner names that mean Beam's local batch engine (DirectRunner is Beam's default).
LOCAL_RUNNERS = (None, "DirectRunner")
# Pipeline runs per command: the first, and retries of the rows a failed run left
# unwritten.
MAX_ATTEMPTS = 3
# Test hook: "<index>" (the worker raises) or "<index>:exit" (the worker process dies) once,
# in the step of that example, after its part file is written (the worst moment for
# duplicates); a marker file in the parts directory makes it once.
INJECT_FAILURE = "TFCERT_BEAM_INJECT_FAILURE"
# The thread of Beam's local runner (FnApiRunner) that waits for one worker process.
WORKER_THREAD = "run_worker"
PROGRESS_SECONDS = 2.0


class TfcertBeamOptions(PipelineOptions):
    """tfcert's own ``--beam_options``, parsed with Beam's."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--intra_op_threads", type=int, default=None,
            help="TensorFlow intra-op threads of each worker (default: the host's cores "
                 "divided by --direct_num_workers for the local multi-processing runner, "
                 "TensorFlow's own default otherwise; 0: TensorFlow's default).")
        parser.add_argument(
            "--tfcert_work_dir", default=None,
            help="Where the driver stages the model and the workers write the part files, "
                 "on any Beam file system (default: <output_dir>/beam_parts).")


def run_steps(task: StepTask, pipeline_options: PipelineOptions, output_dir: str,
              table: results.ResultTable, wanted: Sequence[str],
              before_work: Callable[[], None] = lambda: None) -> dict[str, dict[str, str]]:
    """Computes the wanted rows that ``table`` lacks on a Beam pipeline, then writes the
    table whole (sorted by ``task.order``) and returns every row by key.

    Args:
        task: the work (`StepTask`).
        pipeline_options: `parse_pipeline_options` of ``--beam_options``.
        output_dir: the run directory (the default work directory is in it).
        table: the run's TSV, opened by the driver (its rows are kept as they are).
        wanted: the keys of the rows the run wants.
        before_work: called once if there is work to do (e.g. removes stale summaries).
    """
    work_dir = (pipeline_options.view_as(TfcertBeamOptions).tfcert_work_dir
                or os.path.abspath(os.path.join(output_dir, PARTS_DIR)))
    if not FileSystems.exists(work_dir):
        FileSystems.mkdirs(work_dir)
    if missing(wanted, gather_rows(table.rows, work_dir, task.columns, task.key)):
        before_work()
        staged = {name: stage_model(path, sha256, work_dir)
                  for name, (path, sha256) in task.models.items()}
        run_until_complete(StepFn(task, staged, work_dir, worker_threads(pipeline_options)),
                           pipeline_options, wanted, table.rows)
    rows = gather_rows(table.rows, work_dir, task.columns, task.key)
    lost = missing(wanted, rows)
    cli.require(not lost, f"the Beam pipeline left {len(lost)} rows unwritten (first: "
                f"{task.key} {lost[0] if lost else ''}); rerun the same command to compute them")
    write_table(table.path, task.columns, rows, task.order)
    clear_work_dir(work_dir)
    return rows


def parse_pipeline_options(text: str) -> PipelineOptions:
    """``--beam_options`` as Beam `PipelineOptions` (SDK workers log warnings and errors
    only unless ``--default_sdk_harness_log_level`` says otherwise)."""
    try:
        flags = shlex.split(text or "")
    except ValueError as err:
        raise cli.CliError(f"--beam_options={text!r} cannot be split into options ({err})")
    pipeline_options = PipelineOptions(flags)
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints a page, then exits
            pipeline_options.get_all_options()
    except SystemExit:
        raise cli.CliError(f"--beam_options: {last_line(usage.getvalue())}") from None
    harness = pipeline_options.view_as(WorkerOptions)
    harness.default_sdk_harness_log_level = harness.default_sdk_harness_log_level or "WARNING"
    threads = pipeline_options.view_as(TfcertBeamOptions).intra_op_threads
    cli.require(threads is None or threads >= 0, "--intra_op_threads must be >= 0")
    return pipeline_options


def worker_threads(pipeline_options: PipelineOptions) -> int | None:
    """TensorFlow intra-op threads per worker: ``--intra_op_threads`` if given; for the
    local multi-processing runner the cores shared out among its workers (so that they do
    not fight for the cores); otherwise None (TensorFlow's default: every core)."""
    chosen = pipeline_options.view_as(TfcertBeamOptions).intra_op_threads
    if chosen is not None:
        return chosen or None
    direct = pipeline_options.view_as(DirectOptions)
    local = pipeline_options.view_as(StandardOptions).runner in LOCAL_RUNNERS
    if not (local and direct.direct_running_mode == "multi_processing"):
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // (direct.direct_num_workers or cores))


def worker_options(config: dict[str, Any]) -> argparse.Namespace:
    """The run's options for the workers: a picklable namespace, a local ``data_dir`` and
    the path of a local ``dir:`` or ``npz:`` dataset made absolute (a worker need not share
    the driver's working directory)."""
    from tfcert import data

    data_dir, dataset = config.get("data_dir"), config.get("dataset")
    if data_dir and is_local(data_dir):
        config = {**config, "data_dir": os.path.abspath(data_dir)}
    prefix = next((p for p in data.FILE_PREFIXES if str(dataset).startswith(p)), None)
    if prefix and is_local(dataset[len(prefix):]):
        config = {**config, "dataset": prefix + os.path.abspath(dataset[len(prefix):])}
    return argparse.Namespace(**config)


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local file system (no ``scheme://``)."""
    return FileSystems.get_scheme(path) is None


def stage_model(model: str, sha256: str, work_dir: str) -> str:
    """Copies the driver's model file into the work directory (once: named by its
    SHA-256) and returns the copy's path, which every worker reads."""
    staged = FileSystems.join(work_dir, f"model-{sha256}.keras")
    if not FileSystems.exists(staged):
        put(model, staged)
    return staged


def put(source: str, destination: str) -> None:
    """Copies the local file ``source`` to ``destination`` (any Beam file system) under a
    temporary name, then renames it: readers see the whole file or none."""
    partial = f"{destination}.{uuid.uuid4().hex}.partial"
    with open(source, "rb") as data:
        out = FileSystems.create(partial)
        try:
            shutil.copyfileobj(data, out)
        finally:
            out.close()
    FileSystems.rename([partial], [destination])


def fetch(path: str, scratch: str) -> str:
    """A local path of the file ``path`` (any Beam file system): itself if local, else a
    copy in the folder ``scratch``."""
    if is_local(path):
        return path
    local = os.path.join(scratch, os.path.basename(path))
    with FileSystems.open(path) as data, open(local, "wb") as out:
        shutil.copyfileobj(data, out)
    return local


def run_until_complete(fn: "StepFn", pipeline_options: PipelineOptions,
                       wanted: Sequence[str], table_rows: Sequence[dict[str, str]]) -> None:
    """Runs the pipeline over the steps of the wanted rows not yet written, up to
    `MAX_ATTEMPTS` times (a failed run keeps the part files of the steps it finished)."""
    task = fn.task
    for attempt in range(1, MAX_ATTEMPTS + 1):
        done = gather_rows(table_rows, fn.work_dir, task.columns, task.key)
        todo = missing(wanted, done)
        if not todo:
            return
        try:
            with PartsProgress(fn.work_dir, len(wanted), len(wanted) - len(todo), task.unit):
                run_pipeline(fn, pipeline_options, task.steps(todo))
        except Exception as err:  # any failure of the run: its finished steps are kept
            message = last_line(err)
            cli.require(attempt < MAX_ATTEMPTS,
                        f"the Beam pipeline failed {MAX_ATTEMPTS} times (last: {message}); "
                        "rerun the same command to resume: finished examples are kept")
            print(f"warning: Beam pipeline attempt {attempt} failed ({message}); retrying "
                  "the rows not yet written", file=sys.stderr, flush=True)


def last_line(err: BaseException | str) -> str:
    """The last line of an error's message (a worker's error arrives with its traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def run_pipeline(fn: "StepFn", pipeline_options: PipelineOptions, steps: Sequence[Any]) -> None:
    """One pipeline run: the steps spread over the workers, computed by ``fn``."""
    with WorkerDeathWatch(), beam.Pipeline(runner=local_runner(pipeline_options),
                                           options=pipeline_options) as pipeline:
        (pipeline | "Steps" >> beam.Create(steps) | "Spread" >> beam.Reshuffle()
         | "Compute" >> beam.ParDo(fn))


def local_runner(pipeline_options: PipelineOptions):
    """For DirectRunner (Beam's default): the FnApiRunner that DirectRunner runs batch
    pipelines on, built as DirectRunner builds it (its workers get the pipeline options),
    without DirectRunner's first try of the Prism runner, which downloads a binary (and
    fails on hosts without internet).  None (the options' runner) for any other runner."""
    if pipeline_options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(pipeline_options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def missing(wanted: Sequence[str], rows: dict[str, dict[str, str]]) -> list[str]:
    """The wanted keys that have no row."""
    return [k for k in wanted if k not in rows]


def part_path(work_dir: str, label: str, size: int) -> str:
    """The part file of a step of label ``label`` (a function of the step's contents) and
    ``size`` rows."""
    return FileSystems.join(work_dir, f"part-{label}-{size}.tsv")


def part_paths(work_dir: str) -> list[str]:
    """The part files in the work directory, sorted by name."""
    matched = FileSystems.match([FileSystems.join(work_dir, "part-*.tsv")])[0]
    return sorted(m.path for m in matched.metadata_list)


def write_part(path: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Writes a step's rows to ``path`` atomically (complete or absent); on a local disk
    durably too (synced before and after the rename)."""
    if is_local(path):
        results.write_tsv(path, columns, rows)
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash of the host
        finally:
            os.close(directory)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            local = os.path.join(scratch, os.path.basename(path))
            results.write_tsv(local, columns, rows)
            put(local, path)


def read_part(path: str) -> list[dict[str, str]]:
    """The rows of a part file (dicts of strings, as `tfcert.results.read_tsv`)."""
    with FileSystems.open(path) as f:
        text = f.read().decode()
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))


def gather_rows(table_rows: Sequence[dict[str, str]], work_dir: str, columns: Sequence[str],
                key: str) -> dict[str, dict[str, str]]:
    """Every row written so far by its ``key`` column: the TSV's, then the part files' (in
    name order); a key seen twice keeps its first row."""
    rows = {row[key]: row for row in table_rows}
    for path in part_paths(work_dir):
        part = read_part(path)
        cli.require(not part or list(part[0]) == list(columns),
                    f"{path} has other columns than {list(columns)}: delete it to recompute "
                    "its rows")
        for row in part:
            rows.setdefault(row[key], row)
    return rows


def clear_work_dir(work_dir: str) -> None:
    """Deletes the work directory's files (their rows are in the TSV now) and a local
    work directory itself."""
    if is_local(work_dir):
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        matched = FileSystems.match([FileSystems.join(work_dir, "*")])[0].metadata_list
        if matched:
            FileSystems.delete([m.path for m in matched])


def write_table(path: str, columns: Sequence[str], rows: dict[str, dict[str, str]],
                order: Callable[[str], Any]) -> None:
    """Writes the TSV whole and atomically: every row, sorted by ``order`` of its key."""
    ordered = [rows[k] for k in sorted(rows, key=order)]
    results.write_atomic(path, "\t".join(columns) + "\n" + "".join(
        "\t".join(row[c] for c in columns) + "\n" for row in ordered))


class StepFn(beam.DoFn):
    """Computes steps of a task; each worker sets the task up (data, models) once.

    Args:
        task: the work (`StepTask`).
        models: the staged model files by name (any Beam file system).
        work_dir: where each step's part file goes.
        intra_op_threads: TensorFlow intra-op threads of the worker (None: TF's default).
    """

    def __init__(self, task: StepTask, models: dict[str, str], work_dir: str,
                 intra_op_threads: int | None):
        self.task, self.models, self.work_dir = task, dict(models), work_dir
        self.intra_op_threads = intra_op_threads

    def setup(self) -> None:
        set_intra_op_threads(self.intra_op_threads)
        self.scratch = tempfile.mkdtemp(prefix="tfcert-beam-")
        models = {}
        for name, staged in self.models.items():
            local = fetch(staged, self.scratch)
            sha256, expected = cli.file_sha256(local), self.task.models[name][1]
            if sha256 != expected:
                raise RuntimeError(f"{staged} is not the driver's model (SHA-256 {sha256} != "
                                   f"{expected}): delete it and rerun")
            models[name] = cli.load_model(local)
        self.task.setup(models, self.task.select())

    def teardown(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def process(self, step):
        task = self.task
        path = part_path(self.work_dir, task.label(step), task.size(step))
        if not FileSystems.exists(path):  # else a retried bundle: the step's rows are durable
            write_part(path, task.columns, task.run(step))
            inject_failure_once(task.example_indices(step), self.work_dir)
        yield task.size(step)


def set_intra_op_threads(threads: int | None) -> None:
    """Sets this process's TensorFlow intra-op threads (before TensorFlow's first op)."""
    cli.import_tensorflow_quietly()
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TF already runs here (an in-process runner): its setting stays
            pass


def inject_failure_once(indices: Sequence[int], work_dir: str) -> None:
    """Fails once per run if a step's example ``indices`` hold the index of
    ``$TFCERT_BEAM_INJECT_FAILURE``: raises, or ends the worker process with
    ``<index>:exit`` (the failure tests' hook; unset, it does nothing)."""
    target, _, how = os.environ.get(INJECT_FAILURE, "").partition(":")
    if not target or int(target) not in indices:
        return
    marker = FileSystems.join(work_dir, f"injected-{target}")
    if not FileSystems.exists(marker):
        FileSystems.create(marker).close()
        if how == "exit":
            os._exit(70)
        raise RuntimeError(f"injected failure at index {target} (${INJECT_FAILURE})")


class WorkerDied(RuntimeError):
    """A worker process of Beam's local runner ended in the middle of a pipeline."""


class WorkerDeathWatch:
    """Turns the death of a local worker process into a `WorkerDied` failure of the run.

    Beam's local FnApiRunner waits forever for a worker process that died (killed by the
    OOM killer, say); only the thread that started the process sees it end (it raises).
    While the watch is on, that exception interrupts the main thread (SIGUSR1), so the
    run fails and the engine retries it.  Other runners have no such thread: the watch
    does nothing there, and nothing off the main thread (signals need it).
    """

    def __init__(self):
        self.lock, self.armed, self.death = threading.Lock(), False, ""
        self.on_main = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "WorkerDeathWatch":
        if self.on_main:
            self.previous = (threading.excepthook, signal.getsignal(signal.SIGUSR1))
            signal.signal(signal.SIGUSR1, self._interrupt)
            threading.excepthook = self._hook
            self.armed = True
        return self

    def _hook(self, args) -> None:
        with self.lock:
            if not (self.armed and args.thread is not None and args.thread.name == WORKER_THREAD):
                return self.previous[0](args)
            self.death = f"a Beam worker process died ({args.exc_value})"
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _interrupt(self, signum, frame) -> None:
        if self.armed and self.death:
            raise WorkerDied(self.death)

    def __exit__(self, *exc) -> None:
        if self.on_main:
            with self.lock:
                self.armed = False
            threading.excepthook, handler = self.previous
            signal.signal(signal.SIGUSR1, handler)


class PartsProgress:
    """A progress bar of the run (`tfcert.cli.Progress`), fed by the part files as they
    land (read from their names every `PROGRESS_SECONDS`)."""

    def __init__(self, work_dir: str, total: int, done: int, unit: str):
        self.work_dir, self.start = work_dir, done
        self.before = set(self._parts())
        self.stop = threading.Event()
        self.progress = cli.Progress(total, unit, done)
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _parts(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in part_paths(self.work_dir)]

    def _update(self) -> None:
        new = set(self._parts()) - self.before
        done = self.start + sum(int(name[:-len(".tsv")].rsplit("-", 1)[1]) for name in new)
        self.progress.update(min(done, self.progress.bar.total))

    def _watch(self) -> None:
        while not self.stop.wait(PROGRESS_SECONDS):
            self._update()

    def __enter__(self) -> "PartsProgress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.progress.bar.close()
