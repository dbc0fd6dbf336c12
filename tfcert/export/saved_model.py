"""Assembly of the SavedModel: the configuration baked into an export, the serving module
whose signatures run STN Algorithm 1 in the graph, and the atomic write of a version folder
(the signatures are described in :mod:`tfcert.export`)."""


from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import IO, Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

import tfcert
from tfcert.certificate import (ABSTAIN, RADII, certify_counts, check_statistics,
                                predict_counts, select_counts)
from tfcert.devices import PASS_DEVICES
from tfcert.export.reading import CONFIG_ASSET, FORBIDDEN_OPS, forbidden_ops
from tfcert.export.warmup import WARMUP_FILE, WARMUP_PIXEL, write_warmup_requests
from tfcert.keys import ESTIMATION, SELECTION, draw_keys
from tfcert.sequential import Plan, StoppingRule, look
from tfcert.smoothing import SmoothedClassifier

BOUNDS = (*RADII, "none")
SIGNATURES = ("serving_default", "certify_seeded", "predict", "predict_seeded",
              "certify_target", "certify_target_seeded")
SERVING_DEVICES = PASS_DEVICES
# An export is written in a hidden folder next to its version folder,
# ``.<version>.partial-<random>``, whose PARTIAL_LOCK file it keeps locked while it runs;
# the next export into the same folder removes those of killed exports (`_start_partial`).
PARTIAL_FOLDER = re.compile(r"\..+\.partial-[^/]+")
PARTIAL_LOCK = ".lock"
_INT64 = np.iinfo(np.int64)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What an export bakes in (also written to ``assets/tfcert_config.json``).

    Attributes:
        num_samples: n, noisy samples per image behind each certificate.
        predict_num_samples: samples per image of the ``predict`` signatures.
        alpha: failure probability α of each certificate / level of the PREDICT test.
        bound: radius reported (``renyi``, ``cohen``, ``pixeldp``; ``none`` = 0).
        sigma: σ of the Gaussian noise, ``None`` for other noise layers.
        num_classes: k.
        image_shape: (H, W, C).
        pass_size: noisy inputs per forward pass.
        noise: class name and Keras config of the noise layer.
        serving_device: ``cpu`` or ``gpu``, the server's device the automatic pass size
            was chosen for (:func:`serving_pass_size`).
        model_name: TF Serving model name the warmup requests carry.
        stopping_method: bounds of ``certify_target`` (`tfcert.sequential.METHODS`).
        target_looks: draws per image at each look of ``certify_target``,
            ``n_1 < … < n_J = num_samples`` (`tfcert.sequential.Plan`).
        target_levels: level α_j of each look's bounds (`StoppingRule.levels`).
        target_final_level: level of the last look's extra Clopper-Pearson bounds (0:
            none), `StoppingRule.final_level`; with ``target_levels`` it sums to α.
        futility_level, min_gain, prior, bet_truncation: the other fields of the
            `tfcert.sequential.StoppingRule` (the target comes with each request).
        target_statistics: statistics of ``certify_target``: ``"simultaneous"`` (as the
            fixed-n signatures) or ``"cohen"`` (a class selected on separate draws).
        target_selection_samples: Cohen's selection draws per image of ``certify_target``
            (0 under simultaneous statistics), counted in its ``num_samples``.
    """

    num_samples: int
    predict_num_samples: int
    alpha: float
    bound: str
    sigma: float | None
    num_classes: int
    image_shape: tuple[int, int, int]
    pass_size: int
    noise: dict
    serving_device: str
    model_name: str
    stopping_method: str
    target_looks: tuple[int, ...]
    target_levels: tuple[float, ...]
    target_final_level: float
    futility_level: float
    min_gain: float | None
    prior: tuple[float, float]
    bet_truncation: float
    target_statistics: str
    target_selection_samples: int

    def plan(self) -> Plan:
        """The looks and levels of ``certify_target`` (`StoppingRule.plan`)."""
        return Plan(self.target_looks, self.target_levels, self.target_final_level)

    def stopping_rule(self) -> StoppingRule:
        """The `StoppingRule` of ``certify_target`` (target 0: targets come per request)."""
        return StoppingRule(0.0, self.stopping_method, self.min_gain,
                            futility_level=self.futility_level, prior=self.prior,
                            bet_truncation=self.bet_truncation)

    def to_json(self) -> dict:
        return {
            "format": "tfcert-smoothed-classifier/1",
            "tfcert_version": tfcert.__version__,
            "tensorflow_version": tf.__version__,
            **dataclasses.asdict(self),
            "statistics": "simultaneous Clopper-Pearson over all classes (Bonferroni alpha/k), "
                          "STN Section 4; certify_target: tfcert.sequential with "
                          f"method '{self.stopping_method}' and {self.target_statistics} "
                          "statistics (cohen: the class with the most of "
                          "target_selection_samples separate draws, one lower bound at "
                          "each look's level, p2_upper = 1 - p1_lower), look j after "
                          "target_looks[j] draws at level target_levels[j] (plus "
                          "Clopper-Pearson bounds at target_final_level at the last look)",
            "signatures": {
                "serving_default": "certify with fresh noise: prediction (int64, -1 abstain), "
                                   "radius (float32), counts (int64), p1_lower, p2_upper "
                                   "(float64)",
                "certify_seeded": "serving_default with seed (int64 [batch]) per image",
                "predict": "smoothed prediction with abstention (two-sided binomial test "
                           "at level alpha): prediction, counts, p_value",
                "predict_seeded": "predict with seed (int64 [batch]) per image",
                "certify_target": "certify with early stopping at target_radius (float32 "
                                  "[batch]) per image: the certify outputs and num_samples "
                                  "(int64, draws spent per image)",
                "certify_target_seeded": "certify_target with seed (int64 [batch]) per image",
            },
            "warmup": f"{WARMUP_FILE}: one PredictRequest per signature, one image of "
                      f"{WARMUP_PIXEL} (and seed 0, target radius 0)",
        }


def export_saved_model(smoothed: SmoothedClassifier, path: str, num_samples: int,
                       alpha: float, bound: str = "renyi", pass_size: int | None = None, *,
                       predict_num_samples: int | None = None,
                       image_shape: Sequence[int] | None = None,
                       serving_device: str = "cpu", model_name: str | None = None,
                       metadata: Mapping[str, Any] | None = None,
                       early_stopping: StoppingRule | None = None,
                       target_statistics: str = "simultaneous",
                       target_selection_samples: int = 100) -> ExportConfig:
    """Writes ``smoothed`` as a TF Serving SavedModel at ``path`` (see the module docstring).

    The directory is written next to ``path`` under a temporary name (a hidden
    ``.<version>.partial-*`` folder), checked (no forbidden ops, :data:`FORBIDDEN_OPS`),
    given its warmup requests (:data:`WARMUP_FILE`) and renamed into place, so a TF
    Serving instance watching the parent never sees a half-written version.  An export
    that is killed leaves its partial folder behind; the next export into the same
    parent removes it, and never the partial folder of an export still running in
    another process (each holds an ``flock`` on a lock file in its folder while it runs,
    which the kernel drops when the process dies: `_start_partial`).

    Args:
        smoothed: the smoothed classifier (base model, number of classes, noise layer).
        path: the SavedModel directory to create (must not exist, or be empty); for TF
            Serving use :func:`versioned_path`.
        num_samples: n, samples per image of the certificate.
        alpha: failure probability α in (0, 1).
        bound: ``"renyi"`` (STN Theorem 2), ``"cohen"``, ``"pixeldp"`` (ℓ2 radii; need
            `GaussianNoise`), or ``"none"`` (radius 0, e.g. for randomized
            discretization, whose certificate is the ℓ∞ KL bound of :mod:`tfcert.kl`).
        pass_size: noisy inputs per forward pass (default: :func:`serving_pass_size`
            for ``serving_device``).
        predict_num_samples: samples per image of ``predict`` (default ``num_samples``).
        image_shape: (H, W, C); default: the base model's input shape.
        serving_device: ``"cpu"`` or ``"gpu"``, the device of the TF Serving server
            (chooses the automatic pass size; recorded in the config asset).
        model_name: TF Serving model name in the warmup requests (informational: the
            server replays them on the version it loads); default: the name of
            ``path``'s parent folder (``<base>/<name>/<version>``, :func:`versioned_path`).
        metadata: JSON-serialisable facts to record in the config asset (e.g. the
            model file and its hash).
        early_stopping: the bounds, looks and stopping rules of ``certify_target``
            (`tfcert.sequential.StoppingRule`; its ``target_radius`` is ignored: each
            request brings its own).  Default: ``StoppingRule(0.0)``, the mixture
            confidence sequence with the library's schedule, as
            ``SmoothedClassifier.certify(..., early_stopping=...)``; the looks
            ``n_1 < … < n_J = num_samples`` are `StoppingRule.plan`'s.
        target_statistics: statistics of ``certify_target``, as
            ``SmoothedClassifier.certify``'s ``statistics``: ``"simultaneous"`` (every
            class bounded at α/(2k), the fixed-n signatures' statistics) or ``"cohen"``
            (the class with the most of ``target_selection_samples`` separate draws gets
            one lower bound at the look's level, ``p2_upper = 1 − p1_lower``).
        target_selection_samples: Cohen's selection draws per image of
            ``certify_target`` under ``target_statistics="cohen"`` (counted in its
            ``num_samples``; with early stopping a few suffice, docs/PERFORMANCE.md).

    Returns:
        The `ExportConfig` baked into the export.

    Example:

    >>> sc = tfcert.SmoothedClassifier(model, 10, tfcert.layers.GaussianNoise(0.5))
    >>> path = tfcert.export.versioned_path("serving", "mnist")   # serving/mnist/1
    >>> tfcert.export.export_saved_model(sc, path, num_samples=100_000, alpha=0.001)
    """
    path = os.path.abspath(path)
    config = _config(smoothed, num_samples, alpha, bound, pass_size, predict_num_samples,
                     image_shape, serving_device,
                     model_name or os.path.basename(os.path.dirname(path)),
                     StoppingRule(0.0) if early_stopping is None else early_stopping,
                     target_statistics, target_selection_samples)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} already exists; choose a new version directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    partial, lock = _start_partial(parent, os.path.basename(path))
    try:
        config_file = os.path.join(partial, CONFIG_ASSET)
        with open(config_file, "w") as f:
            json.dump({**config.to_json(), "metadata": dict(metadata or {})}, f, indent=2)
        module = _serving_module(smoothed, config, config_file)
        saved = os.path.join(partial, "saved_model")
        tf.saved_model.save(module, saved,
                            signatures={name: getattr(module, name) for name in SIGNATURES})
        bad = forbidden_ops(saved)
        if bad:
            raise ValueError(f"the exported graph contains ops TF Serving must not run: "
                             f"{sorted(bad)} (Python functions or XLA in the base model?)")
        write_warmup_requests(saved, config.model_name)
        try:
            if os.path.isdir(path):
                os.rmdir(path)
            os.rename(saved, path)
        except OSError as err:  # another export took the version meanwhile
            raise FileExistsError(f"{path} was written by another export meanwhile ({err}); "
                                  "choose a new version directory") from err
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        lock.close()
    return config


def _start_partial(parent: str, version: str) -> tuple[str, IO]:
    """Creates this export's hidden partial folder ``.<version>.partial-*`` in ``parent``
    and returns it with the open :data:`PARTIAL_LOCK` file inside, exclusively
    ``flock``-ed until the export closes it; first removes the partial folders that killed
    exports left in ``parent``.

    Why this never removes a running export's folder: an exporter holds the ``flock`` of
    its folder's lock file for as long as it runs, and the kernel drops it when the
    process ends, however (also on SIGKILL or a crash), so a folder whose lock can be
    taken has no exporter left.  Creating a folder and locking its file happen under an
    exclusive ``flock`` of ``parent`` itself, which the sweep holds too: the sweep never
    sees a new folder before its lock is held, so a folder without a lock file was left
    by an exporter killed in between (or by a tfcert before this rule).
    """
    import fcntl

    directory = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        for name in os.listdir(parent):
            folder = os.path.join(parent, name)
            if (PARTIAL_FOLDER.fullmatch(name) and os.path.isdir(folder)
                    and not os.path.islink(folder)):
                _remove_if_abandoned(folder)
        partial = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=parent)
        lock = open(os.path.join(partial, PARTIAL_LOCK), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    finally:
        os.close(directory)  # and with it the lock of ``parent``
    return partial, lock


def _remove_if_abandoned(folder: str) -> None:
    """Removes the partial folder ``folder`` unless its exporter still holds its lock."""
    import fcntl

    try:
        lock = os.open(os.path.join(folder, PARTIAL_LOCK), os.O_RDONLY)
    except FileNotFoundError:  # no lock file (or no folder any more): nobody owns it
        shutil.rmtree(folder, ignore_errors=True)
        return
    except OSError:  # e.g. another user's: not ours to judge
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a running export
        return
    else:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)


def versioned_path(base_dir: str, name: str, version: int | None = None) -> str:
    """``<base_dir>/<name>/<version>``, TF Serving's layout; ``version`` defaults to the
    next integer after the existing numeric version directories (1 for the first)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '.', '-'")
    model_dir = os.path.join(base_dir, name)
    if version is None:
        existing = [int(d) for d in os.listdir(model_dir) if d.isdigit()] if os.path.isdir(
            model_dir) else []
        version = max(existing, default=0) + 1
    if int(version) < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    return os.path.join(model_dir, str(int(version)))


def serving_pass_size(smoothed: SmoothedClassifier, image_shape: Sequence[int],
                      serving_device: str = "cpu") -> int:
    """The automatic pass size (noisy inputs per forward pass) for a server on this device.

    An explicit ``batch_size`` of the classifier wins.  Otherwise
    `SmoothedClassifier.pass_size` with the budget of ``serving_device``, whatever the
    exporting machine has (`tfcert.devices.pass_memory`): ``cpu``, the exporting
    machine's last-level CPU cache (serve on a CPU like it); ``gpu``,
    ``GPU_PASS_MEMORY`` (256 MiB); over `tfcert.devices.activation_bytes` of one
    input, clipped to [1, ``MAX_PASS_SIZE``].
    """
    _check_serving_device(serving_device)
    return smoothed.pass_size(image_shape, serving_device)


# ------------------------------------------------------------------- internals
def _check_serving_device(serving_device: str) -> None:
    if serving_device not in SERVING_DEVICES:
        raise ValueError(f"serving_device must be one of {SERVING_DEVICES}, got "
                         f"{serving_device!r}")


def _config(smoothed: SmoothedClassifier, num_samples: int, alpha: float, bound: str,
            pass_size: int | None, predict_num_samples: int | None,
            image_shape: Sequence[int] | None, serving_device: str,
            model_name: str, rule: StoppingRule, target_statistics: str,
            target_selection_samples: int) -> ExportConfig:
    _check_serving_device(serving_device)
    if not isinstance(smoothed, SmoothedClassifier):
        raise TypeError(f"expected a SmoothedClassifier, got {type(smoothed).__name__}")
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose from {BOUNDS}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    predict_num_samples = num_samples if predict_num_samples is None else predict_num_samples
    for label, value in (("num_samples", num_samples), ("pass_size", pass_size),
                         ("predict_num_samples", predict_num_samples),
                         ("target_selection_samples", target_selection_samples)):
        if value is not None and (int(value) != value or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value}")
    check_statistics(target_statistics)
    if image_shape is None:
        image_shape = tuple(smoothed.base_model.input_shape[1:])
    if len(image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in image_shape):
        raise ValueError(f"need a static image shape (H, W, C), got {image_shape}; "
                         "pass image_shape=")
    # ℓ2 radii need Gaussian noise: `sigma` raises a clear error otherwise.
    sigma = smoothed.sigma if bound != "none" else getattr(smoothed.noise, "stddev", None)
    # The looks of certify_target (the target itself comes with each request).
    plan = rule.plan(int(num_samples), float(alpha))
    return ExportConfig(
        num_samples=int(num_samples), predict_num_samples=int(predict_num_samples),
        alpha=float(alpha), bound=bound, sigma=None if sigma is None else float(sigma),
        num_classes=smoothed.num_classes, image_shape=tuple(int(d) for d in image_shape),
        pass_size=int(pass_size or serving_pass_size(smoothed, image_shape, serving_device)),
        noise={"class_name": type(smoothed.noise).__name__,
               "config": smoothed.noise.get_config()},
        serving_device=serving_device, model_name=model_name,
        stopping_method=rule.method, target_looks=plan.looks, target_levels=plan.levels,
        target_final_level=plan.final_level, futility_level=float(rule.futility_level),
        min_gain=None if rule.min_gain is None else float(rule.min_gain),
        prior=tuple(float(v) for v in rule.prior), bet_truncation=float(rule.bet_truncation),
        target_statistics=target_statistics,
        target_selection_samples=int(target_selection_samples) if target_statistics == "cohen"
        else 0)


def _serving_module(smoothed: SmoothedClassifier, config: ExportConfig,
                    config_file: str) -> tf.Module:
    """A tf.Module holding the signature functions, the variables they read (tracked
    explicitly: saving a bare ``tf.Module`` fails with "untracked resource" for the random
    layers' seed generators), the baked-in constants and the config asset."""
    module = tf.Module(name="tfcert_smoothed_classifier")
    module.config_file = tf.saved_model.Asset(config_file)
    for name, value, dtype in (("num_samples", config.num_samples, tf.int64),
                               ("predict_num_samples", config.predict_num_samples, tf.int64),
                               ("alpha", config.alpha, tf.float64),
                               ("sigma", np.nan if config.sigma is None else config.sigma,
                                tf.float64),
                               ("bound", config.bound, tf.string),
                               ("num_classes", config.num_classes, tf.int64),
                               ("pass_size", config.pass_size, tf.int64),
                               ("serving_device", config.serving_device, tf.string),
                               ("stopping_method", config.stopping_method, tf.string),
                               ("target_looks", config.target_looks, tf.int64),
                               ("target_levels", config.target_levels, tf.float64),
                               ("target_final_level", config.target_final_level, tf.float64),
                               ("target_statistics", config.target_statistics, tf.string),
                               ("target_selection_samples", config.target_selection_samples,
                                tf.int64)):
        setattr(module, name, tf.Variable(value, dtype=dtype, trainable=False, name=name))

    images_spec = tf.TensorSpec([None, *config.image_shape], tf.float32, name="images")
    seed_spec = tf.TensorSpec([None], tf.int64, name="seed")
    target_spec = tf.TensorSpec([None], tf.float32, name="target_radius")
    votes = _VoteCounter(smoothed, config)

    def certify(images):
        return _certificate(votes.fresh(images, config.num_samples), config)

    def certify_seeded(images, seed):
        return _certificate(votes.seeded(images, seed, config.num_samples), config)

    def predict(images):
        return _prediction(votes.fresh(images, config.predict_num_samples), config.alpha)

    def predict_seeded(images, seed):
        return _prediction(votes.seeded(images, seed, config.predict_num_samples), config.alpha)

    def certify_target(images, target_radius):
        images = votes.checked(images)
        return _certify_target(votes, images, votes.fresh_run(images), target_radius, config)

    def certify_target_seeded(images, target_radius, seed):
        images = votes.checked(images)
        return _certify_target(votes, images, votes.seeded_run(images, seed), target_radius,
                               config)

    functions = {"serving_default": (certify, [images_spec]),
                 "certify_seeded": (certify_seeded, [images_spec, seed_spec]),
                 "predict": (predict, [images_spec]),
                 "predict_seeded": (predict_seeded, [images_spec, seed_spec]),
                 "certify_target": (certify_target, [images_spec, target_spec]),
                 "certify_target_seeded": (certify_target_seeded,
                                           [images_spec, target_spec, seed_spec])}
    for name, (fn, signature) in functions.items():
        setattr(module, name, tf.function(fn, input_signature=signature, autograph=False))
    # Track the tf.Variables the traced functions capture, as keras.export.ExportArchive
    # does: Keras 3 wraps each tf.Variable in a keras.Variable, and tracking the wrappers
    # alone gives a SavedModel whose TF1 loader (TF Serving, saved_model_cli run) never
    # restores the variables the graph reads.
    captured = {}
    for name in SIGNATURES:
        for variable in getattr(module, name).get_concrete_function().variables:
            captured.setdefault(id(variable), variable)
    module.captured_variables = list(captured.values())
    return module


class _VoteCounter:
    """Graph-side vote counting: request checks, then `SmoothedClassifier.count_votes`
    (passes of at most ``pass_size`` noisy inputs, so memory is bounded for any batch)."""

    def __init__(self, smoothed: SmoothedClassifier, config: ExportConfig):
        self.smoothed = smoothed
        self.image_shape = config.image_shape
        self.pass_size = config.pass_size

    def fresh(self, images: tf.Tensor, num_samples: int) -> tf.Tensor:
        """Votes with unpredictable noise (`fresh_run`)."""
        images = self.checked(images)
        return self.count(images, _stream_keys(self.fresh_run(images), ESTIMATION), num_samples)

    def seeded(self, images: tf.Tensor, seed: tf.Tensor, num_samples: int) -> tf.Tensor:
        """Votes of each image keyed by its seed (`seeded_run`): the votes of
        ``SmoothedClassifier.sample_counts(image[None], n, seed=seed_i)``, whatever else
        is in the request."""
        images = self.checked(images)
        return self.count(images, _stream_keys(self.seeded_run(images, seed), ESTIMATION),
                          num_samples)

    @staticmethod
    def fresh_run(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(run key, image indices) of a request with fresh noise: a run key drawn from OS
        entropy per call, image ``b`` of the request keyed by its position ``b``
        (`tfcert.keys.draw_keys` makes each stream's noise keys of them)."""
        entropy = tf.raw_ops.RandomUniformInt(shape=[2], minval=tf.constant(_INT64.min),
                                              maxval=tf.constant(_INT64.max), seed=0, seed2=0)
        return entropy, tf.range(tf.shape(images, out_type=tf.int64)[0])

    @staticmethod
    def seeded_run(images: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(run keys, image indices) of a seeded request: run key ``[seed_i, 0]`` and
        index 0 per image (checked: one seed per image)."""
        check = tf.debugging.assert_equal(tf.shape(seed)[0], tf.shape(images)[0],
                                          message="seed must have one entry per image")
        with tf.control_dependencies([check]):
            seed = tf.cast(seed, tf.int64)
        return tf.stack([seed, tf.zeros_like(seed)], axis=1), tf.zeros_like(seed)

    def count(self, images: tf.Tensor, keys: tf.Tensor, num_samples: int | tf.Tensor,
              first_draw: int | tf.Tensor = 0) -> tf.Tensor:
        """Votes of draws ``first_draw … first_draw + num_samples − 1`` of each image."""
        return self.smoothed.count_votes(images, keys, tf.cast(num_samples, tf.int64),
                                         tf.constant(self.pass_size, tf.int64),
                                         tf.cast(first_draw, tf.int64))

    def checked(self, images: tf.Tensor) -> tf.Tensor:
        """``images`` once the request is known to be valid (else InvalidArgument)."""
        height, width, channels = self.image_shape
        # Dims 1-4 of the shape padded with zeros equal [H, W, C, 0] iff the rank is 4 and
        # the image size is right (TF Serving does not check the signature's shape).
        dims = tf.concat([tf.shape(images), tf.zeros([5], tf.int32)], axis=0)[1:5]
        shape_ok = tf.debugging.assert_equal(
            dims, tf.constant([height, width, channels, 0]),
            message=f"images must have shape [batch, {height}, {width}, {channels}]")
        with tf.control_dependencies([shape_ok]):
            images = tf.debugging.assert_all_finite(images, "images contain NaN or Inf")
        range_ok = [
            tf.debugging.assert_greater_equal(images, 0.0, message="pixel values must be >= 0"),
            tf.debugging.assert_less_equal(images, 1.0, message="pixel values must be <= 1")]
        with tf.control_dependencies(range_ok):
            return tf.identity(images)


def _certificate(counts: tf.Tensor, config: ExportConfig) -> dict[str, tf.Tensor]:
    """STN Algorithm 1 steps 4-6 on the counts: `tfcert.certificate.certify_counts`, the
    function `SmoothedClassifier.certify` calls."""
    cert = certify_counts(counts, config.alpha, config.sigma, _names(config))
    radius = cert.pop(config.bound, tf.zeros_like(cert["p1_lower"]))
    return {"prediction": cert["prediction"], "radius": _float32_round_down(radius),
            "counts": counts, "p1_lower": cert["p1_lower"], "p2_upper": cert["p2_upper"]}


def _names(config: ExportConfig) -> tuple[str, ...]:
    """The radius names of ``config.bound`` (none for ``"none"``)."""
    return () if config.bound == "none" else (config.bound,)


def _checked_targets(target_radius: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """float64 ``target_radius`` once it is known to hold one finite radius >= 0 per
    image (else InvalidArgument)."""
    # Dims 0-1 of the shape padded with zeros equal [batch, 0] iff it is [batch].
    dims = tf.concat([tf.shape(target_radius, out_type=tf.int64), tf.zeros([2], tf.int64)],
                     axis=0)[:2]
    shape_ok = tf.debugging.assert_equal(
        dims, tf.stack([batch, tf.constant(0, tf.int64)]),
        message="target_radius must have shape [batch]: one radius per image")
    with tf.control_dependencies([shape_ok]):
        target = tf.debugging.assert_all_finite(target_radius, "target_radius contains NaN or Inf")
    sign_ok = tf.debugging.assert_greater_equal(target, 0.0,
                                                message="target_radius must be >= 0")
    with tf.control_dependencies([sign_ok]):
        return tf.cast(target, tf.float64)


def _certify_target(votes: _VoteCounter, images: tf.Tensor, run: tuple[tf.Tensor, tf.Tensor],
                    target_radius: tf.Tensor, config: ExportConfig) -> dict[str, tf.Tensor]:
    """`tfcert.sequential.run_sequential` as one ``tf.while_loop`` over the looks, each
    calling `tfcert.sequential.look`, on the noise of ``run`` (run key(s), image indices).

    Under Cohen's statistics each image's class is first selected on
    ``target_selection_samples`` draws of the `SELECTION` stream (`_selected`), as
    `tfcert.sequential.certify_sequential` does.

    Look j samples draws ``n_{j−1} … n_j − 1`` of the undecided images only (gathered
    into the same passes, `SmoothedClassifier.count_votes`), stores them as the votes of
    look j, certifies every undecided image from its votes so far and drops the decided
    ones; the loop ends when none is left or after the last look.  Each image keeps the
    certificate of the look where it stopped (valid at level α whatever the stopping
    rule, module docstring of :mod:`tfcert.sequential`).
    """
    batch = tf.shape(images, out_type=tf.int64)[0]
    target = _checked_targets(target_radius, batch)
    keys, selected = _stream_keys(run, ESTIMATION), _selected(votes, images, run, config)
    spent = tf.constant(config.target_selection_samples, tf.int64)
    rule, plan = config.stopping_rule(), config.plan()
    num_looks = len(plan.looks)
    looks, trials = tf.constant(plan.looks, tf.int64), tf.constant(plan.trials, tf.int64)
    levels = tf.constant(plan.levels, tf.float64)
    final = tf.constant(plan.final_level, tf.float64)
    zeros = tf.zeros(tf.expand_dims(batch, 0), tf.float64)
    result = {"prediction": tf.fill(tf.expand_dims(batch, 0), tf.constant(ABSTAIN, tf.int64)),
              "radius": zeros, "p1_lower": zeros, "p2_upper": zeros,
              "num_samples": tf.zeros(tf.expand_dims(batch, 0), tf.int64)}

    def body(j, active, votes_so_far, result):
        new_votes = votes.count(tf.gather(images, active), tf.gather(keys, active), trials[j],
                                looks[j] - trials[j])
        look_index = tf.fill(tf.shape(active), tf.cast(j, tf.int64))
        votes_so_far = tf.tensor_scatter_nd_add(votes_so_far,
                                                tf.stack([active, look_index], axis=1), new_votes)
        last = tf.equal(j, num_looks - 1)
        cert, stop = look(rule, tf.gather(votes_so_far, active)[:, :j + 1], trials[:j + 1],
                          trials[j + 1:], tf.stack([levels[j], levels[-1]]),
                          tf.stack([tf.where(last, final, tf.zeros_like(final)), final]),
                          tf.gather(target, active), config.sigma, _names(config),
                          config.target_statistics,
                          None if selected is None else tf.gather(selected, active))
        cert = {"prediction": cert["prediction"], "p1_lower": cert["p1_lower"],
                "p2_upper": cert["p2_upper"],
                "radius": cert.get(config.bound, tf.zeros_like(cert["p1_lower"])),
                "num_samples": tf.fill(tf.shape(active), looks[j] + spent)}
        result = {key: tf.tensor_scatter_nd_update(value, active[:, None], cert[key])
                  for key, value in result.items()}
        return j + 1, tf.boolean_mask(active, ~stop), votes_so_far, result

    _, _, votes_so_far, result = tf.while_loop(
        lambda j, active, votes_so_far, result: tf.size(active) > 0, body,
        (tf.constant(0), tf.range(batch),
         tf.zeros(tf.stack([batch, num_looks, config.num_classes]), tf.int64), result),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]),
                          tf.TensorShape([None, num_looks, config.num_classes]),
                          {key: tf.TensorShape([None]) for key in result}),
        maximum_iterations=num_looks)
    return {**result, "radius": _float32_round_down(result["radius"]),
            "counts": tf.reduce_sum(votes_so_far, axis=1)}


def _stream_keys(run: tuple[tf.Tensor, tf.Tensor], stream: int) -> tf.Tensor:
    """The noise keys of ``stream`` of a request's ``run`` = (run key(s), image indices)."""
    return draw_keys(run[0], stream, run[1])


def _selected(votes: _VoteCounter, images: tf.Tensor, run: tuple[tf.Tensor, tf.Tensor],
              config: ExportConfig) -> tf.Tensor | None:
    """Cohen's selection (`tfcert.certificate.select_counts`, as `SmoothedClassifier.select`)
    on ``target_selection_samples`` votes of the `SELECTION` stream: int64 [batch]; None
    under simultaneous statistics."""
    if config.target_statistics != "cohen":
        return None
    return select_counts(votes.count(images, _stream_keys(run, SELECTION),
                                     config.target_selection_samples))


def _prediction(counts: tf.Tensor, alpha: float) -> dict[str, tf.Tensor]:
    """Cohen et al.'s PREDICT (`tfcert.certificate.predict_counts`)."""
    prediction, p_value = predict_counts(counts, alpha)
    return {"prediction": prediction, "counts": counts, "p_value": p_value}


def _float32_round_down(x: tf.Tensor) -> tf.Tensor:
    """float64 → float32 never rounding up (a radius must not grow in the cast)."""
    y = tf.cast(x, tf.float32)
    return tf.where(tf.cast(y, tf.float64) > x, tf.math.nextafter(y, tf.zeros_like(y)), y)
