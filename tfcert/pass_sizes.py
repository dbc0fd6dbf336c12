"""Calibrated pass size: the fastest noisy inputs per forward pass on this machine.

`tfcert.smoothing.SmoothedClassifier` picks its pass size (when ``batch_size`` is not
given and the model runs here) by measuring it: the first `sample_counts` call with
enough draws runs its own first draws in chunks at each `candidates` size, in interleaved
rounds (`measure`), keeps the fastest size relative to each round (`fastest`) for the rest
of the call and stores it in memory and on disk (`lookup` / `store`), keyed by
`calibration_key`: the model's architecture and weight shapes (not its weight values),
the input shape, the compute dtype, the CPU model, the GPUs and the TensorFlow and Keras
versions.  Later calls and later processes on the same machine reuse it.

What it costs: nothing in samples (the measured draws are the call's own, and a draw's
votes never depend on the pass size or on where a call starts, see
`SmoothedClassifier.count_votes`), so calibration cannot change any vote or
certificate; in time, the slower candidates' shortfall on the calibration draws
(typically well under a second) plus 1 + `ROUNDS` extra compiled calls per candidate.  A call
with fewer draws per image than the calibration needs (`calibration_draws`) runs at the
memory heuristic (`tfcert.devices.pass_memory`) and leaves calibration to a larger one.

The cache is ``$TFCERT_CACHE_DIR/pass_sizes.json`` (default
``$XDG_CACHE_HOME/tfcert``, else ``~/.cache/tfcert``), rewritten atomically; a file that
cannot be read is ignored with a warning and rewritten by the next calibration.
``TFCERT_PASS_SIZE=memory`` (or ``SmoothedClassifier(..., auto_pass_size="memory")``)
turns calibration off.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcert.devices import cpu_model

CACHE_DIR_ENV = "TFCERT_CACHE_DIR"
MODE_ENV = "TFCERT_PASS_SIZE"
MODES = ("calibrate", "memory")
CACHE_FILE = "pass_sizes.json"
# Candidates: powers of two from min(memory size / 4, 64) up to the memory cap
# (`tfcert.devices.pass_memory_cap`): the memory heuristic was 4% slow at 113 against
# 1,000 on one CPU and 10-15% fast against 1,024 on another (docs/PERFORMANCE.md).
LOW_FACTOR = 4
LOW_START = 64
# Interleaved rounds after one warm-up round (oneDNN builds its kernels per batch shape
# on a shape's first call); each measurement classifies at least MEASURE_DRAWS draws,
# so that a call's fixed cost (~1 ms) is < 1% of it for models slower than 10^5 draws/s.
ROUNDS = 5
MEASURE_DRAWS = 1024


def default_mode() -> str:
    """``$TFCERT_PASS_SIZE`` if set (one of `MODES`), else ``"calibrate"``."""
    mode = os.environ.get(MODE_ENV) or "calibrate"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {mode!r}")
    return mode


def candidates(memory_size: int, cap: int) -> list[int]:
    """Pass sizes to measure: powers of two from min(``memory_size`` / 4, 64) to ``cap``.

    Args:
        memory_size: the memory heuristic's pass size (`SmoothedClassifier.pass_size`).
        cap: the largest pass size allowed (at least 1).
    """
    low = max(1, min(memory_size // LOW_FACTOR, LOW_START))
    sizes = [2 ** k for k in range(int(np.ceil(np.log2(low))), int(np.log2(cap)) + 1)]
    return sizes or [int(cap)]


def chunk_draws(size: int, batch: int, block: int) -> int:
    """Draws per image of one measurement at pass size ``size`` for ``batch`` images:
    at least ``max(size, MEASURE_DRAWS)`` draws in all, a multiple of the noise block
    ``block`` (`tfcert.keys.noise_block_size`), so that every pass is full."""
    per_image = -(-max(size, MEASURE_DRAWS) // batch)
    return int(-(-per_image // block) * block)


def calibration_draws(chunks: Iterable[int]) -> int:
    """Draws per image a calibration with measurements of ``chunks`` draws spends."""
    return (1 + ROUNDS) * int(sum(chunks))


def measure(run: Callable[[int, int], int], chunks: Mapping[int, int],
            clock: Callable[[], float] = time.perf_counter) -> dict[int, list[float]]:
    """Draws per second of each pass size, in interleaved rounds (the machine may be shared).

    Args:
        run: ``run(size, draws)`` classifies the next ``draws`` draws per image at pass
            size ``size`` and returns how many draws it classified in all.
        chunks: pass size -> draws per image of one measurement (`chunk_draws`).
        clock: seconds (a fake one in tests).

    Returns ``ROUNDS`` rates per size, after a warm-up round that is not timed.
    """
    for size, draws in chunks.items():
        run(size, draws)
    rates: dict[int, list[float]] = {size: [] for size in chunks}
    for _ in range(ROUNDS):
        for size, draws in chunks.items():
            start = clock()
            classified = run(size, draws)
            rates[size].append(classified / max(clock() - start, 1e-9))
    return rates


def fastest(rates: Mapping[int, Sequence[float]]) -> int:
    """The pass size of the highest median over rounds of its rate relative to the round
    (over that round's median rate of all sizes): the sizes of a round ran under the same
    load, so a busy round does not decide.  The smallest such size on a tie."""
    rounds = np.array([rates[size] for size in sorted(rates)], np.float64)
    relative = np.median(rounds / np.median(rounds, axis=0), axis=1)
    return sorted(rates)[int(np.argmax(relative))]


def calibration_key(model: keras.Model, image_shape: Sequence[int], compute_dtype: str) -> str:
    """Key of a calibrated pass size: a hash of the model's architecture (layer classes
    and configurations without their names, weight shapes and dtypes, not their
    values), the input shape, the compute dtype and the machine (CPU model and count,
    GPUs, TensorFlow and Keras versions)."""
    description = {
        "model": _architecture(model), "image_shape": [int(d) for d in image_shape],
        "compute_dtype": compute_dtype, "cpu": cpu_model(), "cpus": os.cpu_count(),
        "gpus": [gpu.name for gpu in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__, "keras": keras.__version__}
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def lookup(key: str) -> int | None:
    """The cached pass size of ``key``, or ``None``."""
    entry = _read_cache().get(key)
    size = entry.get("pass_size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) and size >= 1 else None


def store(key: str, size: int, rates: Mapping[int, Sequence[float]], model_name: str) -> None:
    """Adds ``key``: ``size`` (with the median rates and the model's name, for the reader)
    to the cache file, rewritten atomically.  Two processes storing at once may lose one
    entry (it is then measured again), never corrupt the file."""
    cache = _read_cache()
    cache[key] = {"pass_size": int(size), "model": model_name,
                  "median_rates": {str(s): statistics.median(r) for s, r in rates.items()},
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(f.name, os.path.join(directory, CACHE_FILE))


def cache_dir() -> str:
    """``$TFCERT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tfcert``, else ``~/.cache/tfcert``."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tfcert")


def _read_cache() -> dict:
    """The cache file's entries; empty (with a warning) where it is unreadable."""
    path = os.path.join(cache_dir(), CACHE_FILE)
    try:
        with open(path) as f:
            cache = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring the pass size cache {path}: {err}")
        return {}
    if not isinstance(cache, dict):
        warnings.warn(f"ignoring the pass size cache {path}: not a JSON object")
        return {}
    return cache


def _architecture(model: keras.Model) -> list:
    """Per layer (nested models included): class, configuration without names, weights'
    shapes and dtypes."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.append(_architecture(layer))
            continue
        try:
            config = _without_names(layer.get_config())
        except NotImplementedError:  # a layer without get_config
            config = None
        layers.append([type(layer).__name__, config,
                       [[list(w.shape), str(w.dtype)] for w in layer.weights]])
    return [type(model).__name__, layers]


def _without_names(value):
    """``value`` (a layer configuration) without its ``"name"`` entries, which differ
    between two instances of one architecture."""
    if isinstance(value, dict):
        return {k: _without_names(v) for k, v in value.items() if k != "name"}
    if isinstance(value, (list, tuple)):
        return [_without_names(v) for v in value]
    return value
