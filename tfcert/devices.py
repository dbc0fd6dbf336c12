"""Devices and precision: how much one pass may hold, bfloat16 and policy clones of a model,
and the strategy and precision setup of training.

Everything here is about *where and in what precision* the base model runs, never about
what is certified: `tfcert.smoothing.SmoothedClassifier` sizes its passes with
`pass_memory` / `activation_bytes` (and bounds a calibrated size, `tfcert.pass_sizes`, by
`pass_memory_cap`) and clones its model with `bfloat16_clone`; training
scripts call `make_strategy` and `set_precision`; a model trained in mixed precision is
saved or certified as its float32 `policy_clone`.
"""

from __future__ import annotations

import glob
import json
import os
import platform
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

# Automatic pass size (`pass_memory`, docs/PERFORMANCE.md): on CPU the live activations of
# a pass fit the last-level cache (the STN MNIST CNN runs 5-10% faster at 128 inputs per
# pass than at >= 512, whose activations spill out of a 32 MiB L3; the per-pass overhead,
# ~0.5 ms, is < 1% from ~32 inputs on); on GPU a larger budget keeps the device busy.
CPU_CACHE_DEFAULT = 32 * 2 ** 20  # where sysfs does not tell the cache size
GPU_PASS_MEMORY = 256 * 2 ** 20
PASS_DEVICES = ("cpu", "gpu")
MAX_PASS_SIZE = 4096
# A calibrated pass (`tfcert.pass_sizes`) may hold up to this many times `pass_memory`
# (the cache is a speed estimate, not a limit: the STN CNN ran 4% faster at 1,000 inputs
# than at the cache's 113 on an AVX-512 CPU), never more than 1/8 of the free memory.
PASS_CAP_FACTOR = 16
# CPU feature flags (/proc/cpuinfo) of native bfloat16 arithmetic: x86 AVX-512 BF16 and
# AMX, Arm BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy ``name`` (one of `STRATEGIES`) for training.

    - ``"default"``: TensorFlow's default strategy (one device, no replicas).
    - ``"mirrored"``: ``MirroredStrategy`` over every GPU of this machine (the CPU when
      there is none), synchronous data parallelism with all-reduced gradients.
    - ``"multi_worker"``: ``MultiWorkerMirroredStrategy``, the same over several
      machines; each worker runs the same program with its own ``TF_CONFIG``
      environment variable (``{"cluster": {"worker": [...]}, "task": {"type":
      "worker", "index": i}}``).  Create it at program start, before other TF ops.
      Keras 3's ``model.fit`` does not run under it (keras-team/keras#20585; seen here with
      Keras 3.15): use it with custom loops or `tfcert.smoothing.SmoothedClassifier`.

    Raises a one-line ``ValueError`` for an unknown name, or for ``"multi_worker"``
    without a valid ``TF_CONFIG``.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name != "multi_worker":
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable "
                         '(e.g. {"cluster": {"worker": ["host0:port", "host1:port"]}, '
                         '"task": {"type": "worker", "index": 0}})')
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON ({err})") from None
    cluster, task = (config.get(key) if isinstance(config, dict) else None
                     for key in ("cluster", "task"))
    if not (isinstance(cluster, dict) and cluster.get("worker") and isinstance(task, dict)
            and "index" in task):
        raise ValueError('TF_CONFIG needs "cluster" with a "worker" list and "task" with '
                         f'"type" and "index", got {raw}')
    return tf.distribute.MultiWorkerMirroredStrategy()


def set_precision(precision: str) -> str:
    """Sets the Keras global dtype policy ``precision`` (one of `PRECISIONS`) for the
    models and wrappers built afterwards; returns the previous policy's name.

    ``"mixed_float16"`` (GPUs with tensor cores) and ``"mixed_bfloat16"`` (TPUs, recent
    CPUs and GPUs) compute in 16 bits with float32 weights; see the module doc for what
    stays float32.  Only ``mixed_float16`` needs loss scaling, which ``compile`` adds.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(precision)
    return previous


def activation_bytes(model: keras.Model, image_shape: Sequence[int]) -> int:
    """Peak bytes of live intermediate tensors of ``model`` for one input (an estimate).

    The model is traced once with an unknown batch size; every floating-point tensor
    whose leading dimension is the batch counts with its per-input size (weights and
    constants do not).  Walking the ops in graph order, a tensor is live from the op
    that makes it to its last consumer; the result is the largest live total (at
    least the input's size).  It ignores the runtime's workspace and fusion, so it is
    an estimate, not a bound: e.g. 0.29 MB for the STN MNIST CNN, 9.6 MB for ResNet50.
    """
    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    function = tf.function(lambda x: model(x, training=False), autograph=False)
    operations = function.get_concrete_function(spec).graph.get_operations()

    def size(tensor: tf.Tensor) -> int:
        shape = tensor.shape
        per_input = (tensor.dtype.is_floating and shape.rank and shape[0] is None
                     and shape[1:].is_fully_defined())
        return shape[1:].num_elements() * tensor.dtype.size if per_input else 0

    last_use = {t.name: i for i, op in enumerate(operations) for t in (*op.outputs, *op.inputs)}
    freed = np.zeros(len(operations) + 1, np.int64)
    for op in operations:
        for tensor in op.outputs:
            freed[last_use[tensor.name]] += size(tensor)
    made = np.array([sum(size(t) for t in op.outputs) for op in operations] + [0], np.int64)
    live = np.cumsum(made) - np.concatenate([[0], np.cumsum(freed)[:-1]])
    return int(max(live.max(), int(np.prod(image_shape)) * 4))


def pass_memory(device: str | None = None) -> int:
    """Bytes of live activations one automatic pass may use.

    ``GPU_PASS_MEMORY`` (256 MiB) on a GPU; on a CPU the size of the largest CPU cache
    (the last level, from /sys/devices/system/cpu/cpu0/cache; ``CPU_CACHE_DEFAULT`` =
    32 MiB where unknown).

    Args:
        device: ``None``: this machine's (a GPU's if it has one), never more than 1/8
            of its free memory; ``"cpu"`` or ``"gpu"``: that device's budget, for a
            model that will run elsewhere (an export for a server), the CPU's read on
            this machine.
    """
    if device is None:
        return int(min(pass_memory(_local_device()), _free_memory_bytes() // 8))
    if device not in PASS_DEVICES:
        raise ValueError(f"device must be one of {PASS_DEVICES} or None, got {device!r}")
    if device == "gpu":
        return GPU_PASS_MEMORY
    return max(_cache_sizes(), default=CPU_CACHE_DEFAULT)


def pass_memory_cap() -> int:
    """Bytes of live activations a calibrated pass of this machine may use at most:
    ``PASS_CAP_FACTOR`` times the local `pass_memory` budget, never more than 1/8 of the
    free memory (the bound that keeps large models' passes in memory)."""
    return int(min(PASS_CAP_FACTOR * pass_memory(_local_device()), _free_memory_bytes() // 8))


def _local_device() -> str:
    """``"gpu"`` if this machine has a GPU TensorFlow sees, else ``"cpu"``."""
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def _cache_sizes() -> list[int]:
    """Sizes in bytes of CPU 0's caches as Linux sysfs lists them ("32768K", "1M")."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return sizes


def native_bfloat16() -> bool:
    """Whether this machine computes in bfloat16 natively (not emulated).

    True if every visible GPU has compute capability >= 8.0 (Ampere and later), or,
    without GPUs, if the CPU reports AVX-512 BF16, AMX-BF16 or Arm BF16 in
    /proc/cpuinfo.  Keras mixed bfloat16 is slower than float32 where it is emulated
    (measured in docs/PERFORMANCE.md).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return all(tuple(tf.config.experimental.get_device_details(gpu).get(
            "compute_capability", (0, 0))) >= (8, 0) for gpu in gpus)
    return bool(BF16_CPU_FLAGS & cpu_flags())


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm);
    empty where that file does not exist."""
    return {flag for line in _cpuinfo_lines() if line.split(":")[0].strip() in ("flags", "Features")
            for flag in line.split(":", 1)[1].split()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo ``model name``, else ``platform.processor()``)."""
    names = (line.split(":", 1)[1].strip() for line in _cpuinfo_lines()
             if line.split(":")[0].strip() == "model name")
    return next(names, platform.processor())


def _cpuinfo_lines() -> list[str]:
    """The lines of /proc/cpuinfo; none where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def bfloat16_clone(model: keras.Model) -> keras.Model:
    """``model`` cloned with the Keras ``mixed_bfloat16`` policy and the same weights.

    Every layer computes in bfloat16 with float32 variables, except the output layer,
    which stays float32 (Keras' advice for mixed precision: logits keep float32
    resolution, so the argmax does not see bfloat16 ties).  The policy is set per
    cloned layer, so the global policy is never changed.  Sequential and functional
    models only (nested ones included).
    """
    return policy_clone(model, "mixed_bfloat16")


def policy_clone(model: keras.Model, policy: str) -> keras.Model:
    """``model`` cloned with every layer's dtype policy ``policy`` (a Keras policy name)
    except the output layer's, float32, and the same weights.

    ``policy_clone(model, "float32")`` is the float32 model to save or certify after
    mixed-precision training (`tfcert.devices.set_precision`): a saved model keeps each
    layer's policy, so the trained model itself would compute in float16 when loaded.
    Sequential and functional models only (nested ones included).
    """
    output_layer = _output_layer(model)

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer) and "dtype" in config:
            config["dtype"] = "float32" if layer is output_layer else policy
        return layer.__class__.from_config(config)

    return clone_with_weights(
        model, f"a {policy} clone needs a Sequential or functional base model", clone_layer)


def clone_with_weights(model: keras.Model, requirement: str,
                        clone_layer: Callable[[keras.layers.Layer], keras.layers.Layer]
                        | None = None) -> keras.Model:
    """``model`` cloned layer by layer (``clone_layer``, default: from its config) with the
    same weights, its variables made in the current distribution scope; a model Keras
    cannot clone raises ``ValueError(requirement)``."""
    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    # TypeError / NotImplementedError: a layer without get_config.
    except (ValueError, TypeError, NotImplementedError) as err:
        raise ValueError(f"{requirement} ({err})") from err
    clone.set_weights(model.get_weights())
    return clone


def _output_layer(model: keras.Model) -> keras.layers.Layer:
    """The innermost layer computing the model's output (through nested models)."""
    layer = model.layers[-1]
    return _output_layer(layer) if isinstance(layer, keras.Model) and layer.layers else layer


def _free_memory_bytes() -> int:
    """Free physical memory (Linux/macOS sysconf), or 8 GiB where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2 ** 30
