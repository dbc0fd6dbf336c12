"""Plumbing of tfcert's runs and entry points: one-line errors, example selection, model
loading, progress, quiet TensorFlow start-up.

Every script runs ``tfcert.cli.run(main)``: an expected failure (bad flag value, missing
data, unreadable model, mismatched run directory, NaN) prints one ``error: ...`` line
that says what to do and exits with status 1; so does a flag absl cannot parse (unknown
flag, value out of its bounds).  The run API (`tfcert.runs`) raises the same errors
(`CliError` is a ValueError).  Only `run`, `parse_flags`, `script_flags` and
`flag_defaults` touch absl's flags, and only when a script calls them.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import zipfile
from typing import Any, Callable, NamedTuple, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402

# TensorFlow's C++ start-up lines on a machine without a GPU (or without the CPU features
# its binary could use): printed before absl logging is set up, so TF_CPP_MIN_LOG_LEVEL
# cannot silence them.  `import_tensorflow_quietly` drops exactly these.
STARTUP_NOISE = re.compile(
    "|".join(["All log messages before absl::InitializeLog", "oneDNN custom operations are on",
              "Could not find cuda drivers", "failed call to cuInit", "TF-TRT Warning",
              r"Unable to register cu(DNN|FFT|BLAS) factory", "computation placer already",
              "This TensorFlow binary is optimized", "rebuild TensorFlow with the appropriate",
              "cuda_dnn|cuda_fft|cuda_blas", "Attempting to register factory"]))


class CliError(ValueError):
    """An error the user can fix (a bad option or input); its message is printed on one line."""


def expected_errors() -> tuple[type[BaseException], ...]:
    from tfcert.data import DataError, DataUnavailableError
    from tfcert.results import RunConfigMismatchError

    return (CliError, DataError, DataUnavailableError, RunConfigMismatchError, FileNotFoundError)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with expected errors turned into one-line messages."""

    def guarded(argv):
        from absl import logging

        import_tensorflow_quietly()
        logging.set_verbosity(logging.ERROR)  # tfds/keras chatter; tfcert prints what matters
        try:
            main(argv)
        except expected_errors() as err:
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, its errors as one ``error:`` line (exit status 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {' '.join(str(err).split())} (see --helpshort)", file=sys.stderr)
        sys.exit(1)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with `STARTUP_NOISE` filtered from stderr
    (every other line it prints then is passed on)."""
    sys.stderr.flush()
    saved, captured = os.dup(2), tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        for line in captured.read().decode(errors="replace").splitlines():
            if not STARTUP_NOISE.search(line):
                print(line, file=sys.stderr)


class Selection(NamedTuple):
    """The examples of a run: their indices in the split, images, labels, the dataset's
    `tfcert.data.DatasetInfo` and what identifies the data read (`tfcert.data.Split`)."""

    indices: Any  # int array [n]
    images: Any  # float32 array [n, height, width, channels]
    labels: Any  # int array [n]
    meta: Any  # tfcert.data.DatasetInfo
    identity: dict = {}  # tfcert.data.Split.identity: recorded in the run's config.json

    def subset(self, indices: Sequence[int]) -> "Selection":
        """The examples of ``indices`` (indices in the split), in that order.

        Args:
            indices: indices of selected examples (e.g. a step of a run).

        Raises:
            CliError: an index is not selected here (a worker given other data options).
        """
        position = {int(index): p for p, index in enumerate(self.indices)}
        unknown = [i for i in indices if int(i) not in position]
        require(not unknown, f"index {unknown[0] if unknown else ''} is not in the data "
                "selection of this process: give it the driver's data options")
        p = [position[int(i)] for i in indices]
        return Selection(self.indices[p], self.images[p], self.labels[p], self.meta,
                         self.identity)


def select_examples(options: Any, shard: bool = True) -> Selection:
    """The examples the data options choose.

    Args:
        options: the run's options as attributes (a `tfcert.runs` config or a namespace):
            ``num_examples`` examples of the ``split`` of ``dataset`` (any source of
            `tfcert.data.read`, with ``data_dir``, ``download``, ``image_size``), every
            ``stride``-th after ``skip``.
        shard: keep only the positions i of that selection with i mod ``num_shards`` =
            ``shard_index``.

    Indices are positions in the split: the noise of an example is keyed by its index,
    so any shard or resumed run certifies it identically.
    """
    import numpy as np

    from tfcert import data

    f = options
    split = data.read(f.dataset, f.split, f.data_dir, f.download,
                      getattr(f, "image_size", None))  # older runs' options lack it
    ds = split.dataset.skip(f.skip).enumerate()
    ds = ds.filter(lambda i, _: i % f.stride == 0).take(f.num_examples)
    if shard:
        require(f.shard_index < f.num_shards,
                f"--shard_index={f.shard_index} must be < --num_shards={f.num_shards}")
        ds = ds.enumerate().filter(lambda p, _: p % f.num_shards == f.shard_index).map(
            lambda _, example: example)
    picked = list(ds.as_numpy_iterator())
    require(bool(picked), f"--skip={f.skip} leaves no examples in {f.dataset}")
    indices = np.array([f.skip + int(i) for i, _ in picked])
    images = np.stack([example[0] for _, example in picked]).astype(np.float32)
    labels = np.array([int(example[1]) for _, example in picked])
    return Selection(indices, images, labels, split.info, split.identity)


def eps_grid(eps: Sequence[str | float] | None, norm: str) -> list[float]:
    """The ε budgets of a run (certify's KL grid, an attack's sweep), sorted, each once.

    Args:
        eps: the budgets (``--eps``), as strings or numbers.
        norm: "inf" (ℓ∞: budgets on the [0, 1] pixel scale, at most 1) or "2".

    Raises:
        CliError: a budget is not a finite number >= 0, or an ℓ∞ budget exceeds 1.
    """
    text = ",".join(str(e) for e in eps or [])
    try:
        grid = [float(e) for e in eps or []]
    except ValueError:
        grid = []
    require(bool(grid) and all(0 <= e < math.inf for e in grid),  # NaN fails both
            f"--eps must be a comma list of finite budgets >= 0 (e.g. 0.05,0.1), got "
            f"{text or 'none'}")
    require(norm == "2" or max(grid) <= 1,
            f"ℓ∞ budgets are on the [0, 1] pixel scale: --eps={text} has values > 1")
    return sorted(set(grid))


def check_model_fits(model, meta, model_path: str, dataset: Any) -> None:
    """One-line `CliError` unless ``model`` takes the images of ``dataset`` (its
    `DatasetInfo` ``meta``) and gives one logit per class."""
    expected = tuple(meta.image_shape)
    given = tuple(model.input_shape[1:]) if len(model.input_shape) > 1 else ()
    fits = len(given) == len(expected) and all(g in (None, e) for g, e in zip(given, expected))
    require(fits, f"model {model_path} takes images of shape {given}, but {dataset} has "
            f"{expected}: pass the model trained on this --dataset (or --image_size=H,W to "
            "resize a folder's or a tfds dataset's images)")
    outputs = model.output_shape[-1]
    require(outputs == meta.num_classes,
            f"model {model_path} gives {outputs} outputs, but {dataset} has "
            f"{meta.num_classes} classes (labels 0 to {meta.num_classes - 1}): pass the model "
            "trained on this --dataset")


def _run_flags():
    """The flags of the running script and of tfcert's modules (not absl's own); for
    scripts without a `tfcert.runs` config."""
    from absl import flags

    return [flag for module, defined in flags.FLAGS.flags_by_module_dict().items()
            if module in (sys.argv[0], "__main__") or module.startswith("tfcert")
            for flag in defined]


def script_flags() -> dict:
    """Every flag of the running script and of tfcert's modules: the run's full configuration."""
    return {flag.name: flag.value for flag in _run_flags()}


def flag_defaults() -> dict:
    """The defaults of the flags of `script_flags`."""
    return {flag.name: flag.default for flag in _run_flags()}


def require(condition: bool, message: str) -> None:
    """Raises `CliError(message)` unless ``condition``."""
    if not condition:
        raise CliError(message)


def load_model(path: str):
    """Loads a ``.keras`` model, with a clear error for a missing or corrupt file."""
    import keras

    import tfcert.layers  # noqa: F401  (registers tfcert's serializable layers)

    if not os.path.exists(path):
        raise CliError(f"model file {path} does not exist: train one with train.py "
                       "or pass --model=<path to a .keras file>")
    if not zipfile.is_zipfile(path):
        raise CliError(f"{path} is not a .keras file (a zip archive written by train.py or "
                       "model.save()): it is corrupt or of another format")
    try:
        return keras.models.load_model(path)
    except Exception as err:  # zip, h5, config errors all mean "not a usable model"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"cannot load model {path} ({first}); is it a .keras file written "
                       "by train.py or model.save()?") from err


def denoised_model(classifier, denoiser_path: str):
    """``(denoiser, classifier ∘ denoiser)`` for the denoiser file ``denoiser_path``
    (`tfcert.models.denoised`); a one-line `CliError` if its output does not fit the
    classifier's input."""
    from tfcert.models import denoised

    denoiser = load_model(denoiser_path)
    try:
        return denoiser, denoised(denoiser, classifier)
    except ValueError as err:
        raise CliError(f"--denoiser={denoiser_path}: {err}") from err


def denoiser_file(options) -> dict[str, tuple[str, str]]:
    """``{"denoiser": (path, sha256)}`` of a run whose options name a denoiser, else ``{}``
    (runs of older versions have no such option): the task's model files beside
    ``"model"``."""
    if getattr(options, "denoiser", None):
        return {"denoiser": (options.denoiser, options.denoiser_sha256)}
    return {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (records exactly which model a run used)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Progress:
    """A tqdm progress bar with rate and ETA on stderr: redrawn on a terminal; in logs a
    plain line at most every 30 seconds (and at the end)."""

    def __init__(self, total: int, label: str, done: int = 0):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self.done = done
        self.bar = tqdm(total=total, initial=done, desc=label, unit="example",
                        file=sys.stderr if interactive else _LogLines(),
                        mininterval=0.5 if interactive else 30.0, ascii=not interactive,
                        dynamic_ncols=interactive)

    def update(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        if done >= self.bar.total:
            self.bar.close()


class _LogLines:
    """A stderr for tqdm in logs: each redraw becomes one line (no carriage returns)."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        sys.stderr.flush()
