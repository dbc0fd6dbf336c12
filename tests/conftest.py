"""Shared pytest setup: quiet TensorFlow, repository root on sys.path, small data fixtures."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The pass size of a SmoothedClassifier without batch_size is the memory heuristic in
# tests (and their subprocesses): calibrating it (tfcert.pass_sizes) would time every
# large call of the many small models the tests build, make their pass sizes depend on
# the machine's load, and write a cache; tests/test_pass_size.py turns it back on.  The
# cache, if anything writes one, goes to a temporary directory, never ~/.cache.
os.environ.setdefault("TFCERT_PASS_SIZE", "memory")
os.environ["TFCERT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfcert-test-cache-")
atexit.register(shutil.rmtree, os.environ["TFCERT_CACHE_DIR"], ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """scikit-learn digits as (x_train, y_train, x_test, y_test): 8x8x1 float32 in [0, 1]."""
    from tfcert import data

    x_train, y_train = data.load_arrays("digits", "train")
    x_test, y_test = data.load_arrays("digits", "test")
    return x_train, y_train, x_test, y_test


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory, digits):
    """Path of a small CNN trained briefly on digits (logits), saved as .keras."""
    import keras

    from tfcert import models

    keras.utils.set_random_seed(0)
    model = models.small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(digits[0], digits[1], epochs=8, verbose=0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return str(path)


def run_in_process(run, config_class, args) -> "subprocess.CompletedProcess":
    """A command (``tfcert-certify``, ``tfcert-attack``) run in this process through the run
    API: its ``--flag=value`` arguments as a `tfcert.runs` config, ``run(config)`` called
    with stdout and stderr captured, and an expected error as the script's last stderr line,
    ``error: ...``, with exit status 1 (what `tfcert.cli.run` does).  Saves the ≈ 9 s a new Python
    spends importing TensorFlow; one subprocess test per script covers the script itself."""
    import contextlib
    import dataclasses
    import io
    import subprocess

    from tfcert import cli

    fields = {field.name: field for field in dataclasses.fields(config_class)}
    parse = {"integer": int, "float": float, "list": lambda v: tuple(v.split(",")),
             "bool": lambda v: v.lower() in ("true", "1")}
    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        values = {}
        for arg in args:
            name, _, value = arg[2:].partition("=")
            values[name] = parse.get(fields[name].metadata["kind"], str)(value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(config_class(**values))
    except cli.expected_errors() as error:
        err.write(f"error: {' '.join(str(error).split())}\n")
        status = 1
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())
