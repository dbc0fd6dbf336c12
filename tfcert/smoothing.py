"""The smoothed classifier of STN Algorithm 1 and its certificates (docs/SOUNDNESS.md §2).

``SmoothedClassifier(base_model, num_classes, noise)`` classifies ``x`` by the votes of
``base_model(noise(x))`` over many noise draws.  Sampling is batched across images
*and* samples: each forward pass holds up to ``batch_size`` noisy copies (several
images times several draws), the loop over passes runs inside one ``tf.function``,
and the votes are counted on the device.  Memory is bounded for any ``num_samples``.

Certificates (each holds with probability ≥ 1 − α over the sampling):

- statistics ``"simultaneous"`` (default, STN Section 4): n samples; Clopper-Pearson
  bounds simultaneous over all k classes (Bonferroni: a two-sided interval at level α/k
  per class, i.e. α/(2k) per one-sided bound); p(1)_low of the top class,
  p(2)_up = the largest upper bound of the others.
- statistics ``"cohen"`` (Cohen et al. 2019): n0 samples select the class, n fresh
  samples give its one-sided lower bound p1_low at level α, and p2_up = 1 − p1_low.

and on the same bounds the radii ``"renyi"`` (STN Theorem 2), ``"cohen"`` and
``"pixeldp"``.  A certificate that is empty (p1_low ≤ p2_up) abstains (prediction −1,
radius 0).  The certificate and PREDICT's test are those of :mod:`tfcert.certificate`
(the one implementation every path calls); :mod:`tfcert.sequential` certifies with early
stopping on the same machinery, :mod:`tfcert.keys` names the noise of every draw and
:mod:`tfcert.devices` sizes the passes.

Speed (docs/PERFORMANCE.md): the noise, the argmax and the counting cost about 1% of
the base model's forward pass, so sampling runs at the model's own batched speed.
``compute_dtype="bfloat16"`` runs the base model in Keras mixed bfloat16 (noise still
added in float32, statistics in float64); it is off by default because it only pays
on hardware with native bfloat16 (``"auto"`` checks, `tfcert.devices.native_bfloat16`).
``strategy=tf.distribute.MirroredStrategy()`` spreads the passes over the devices of a
machine with the same votes as one device (`SmoothedClassifier`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcert import pass_sizes, stats
from tfcert.certificate import (Certificate, bound_names, certificate_from_counts,
                                check_statistics, predict_counts, select_counts)
from tfcert.devices import (COMPUTE_DTYPES, MAX_PASS_SIZE, activation_bytes, bfloat16_clone,
                            clone_with_weights, native_bfloat16, pass_memory,
                            pass_memory_cap)
from tfcert.keys import (ESTIMATION, SELECTION, draw_keys, image_indices, noise_block_size,
                         run_key)
from tfcert.layers.base import RandomizedLayer
from tfcert.layers.noise import GaussianNoise
from tfcert.sequential import StoppingRule, certify_sequential

# A pass of partly used noise blocks (a call of fewer draws per image than a block: the
# looks of early stopping) takes more blocks, up to this many times a pass of full blocks,
# so that it still classifies about ``pass_size`` inputs (the noise it generates, used or
# not, stays within this factor of a full pass's).
PARTIAL_BLOCKS_FACTOR = 16


class SmoothedClassifier:
    """The randomized classifier g(x) = argmax_c P(f(noise(x)) = c) of STN Algorithm 1.

    Args:
        base_model: Keras model mapping images in [0, 1] to logits.
        num_classes: k, the number of classes.
        noise: a randomized tfcert layer, e.g. ``tfcert.layers.GaussianNoise(σ)``;
            ℓ2 radii need `GaussianNoise` (its ``stddev`` is the σ of the bounds).
        batch_size: noisy inputs per forward pass (default: `pass_size`: measured on
            this machine, or from the model's activation memory).
        compute_dtype: ``"float32"`` (default), ``"bfloat16"`` (the base model runs as
            a Keras ``mixed_bfloat16`` clone with the same weights: faster where the
            hardware has native bfloat16, slower where it is emulated; votes may differ
            from float32 near decision boundaries, see docs/PERFORMANCE.md), or
            ``"auto"`` (bfloat16 iff `native_bfloat16()`).  The certificate is then
            that of the smoothed bfloat16 classifier, which is the one that runs.
        strategy: optional ``tf.distribute`` strategy whose replicas share the passes
            of every call (`count_votes`): replica r of R runs passes r, r + R, r + 2R, …
            of the one-device loop and the per-replica votes are summed on the devices
            (an int64 all-reduce).  Every draw's noise is the one device's, so the votes
            are identical to one device's for the same seed, whatever the number of
            replicas, wherever each device computes a pass as one device does (always
            on logical CPU devices; on GPUs with deterministic kernels,
            ``tf.config.experimental.enable_op_determinism()``, as convolution
            algorithms may be autotuned per device); the certificates are sound either
            way (every vote is a draw of the same smoothed classifier).  A model whose
            weights were not created under ``strategy.scope()`` is cloned into it
            (``keras.models.clone_model``: Sequential, functional and serializable
            subclassed models), so each device reads its own copy.
            ``None`` (default): one device, the plain loop.  With
            ``MultiWorkerMirroredStrategy`` every worker must make the same calls.
        auto_pass_size: how the pass size is chosen when ``batch_size`` is not given:
            ``"calibrate"`` (default, unless ``$TFCERT_PASS_SIZE`` says ``"memory"``):
            the fastest measured on this machine (`tfcert.pass_sizes`; cached per
            model architecture, input shape, dtype and machine); ``"memory"``: the
            deterministic memory heuristic (`pass_size`).  The pass size never changes
            a vote (`count_votes`), so neither choice can change a certificate.
            With a ``strategy`` the memory heuristic is used (workers could measure
            different sizes and make different calls).

    Example:

    >>> sc = tfcert.SmoothedClassifier(model, 10, tfcert.layers.GaussianNoise(0.5, seed=0))
    >>> res = sc.certify(x_test[:100], num_samples=10_000, alpha=0.001,
    ...                  bound=("renyi", "cohen"))
    >>> res.prediction, res.radii["renyi"], res.radii["cohen"]

    On every GPU of the machine (the same votes, so the same certificate, as on one):

    >>> gpus = tf.distribute.MirroredStrategy()
    >>> sc = tfcert.SmoothedClassifier(model, 10, tfcert.layers.GaussianNoise(0.5),
    ...                                strategy=gpus)
    >>> res = sc.certify(x_test, num_samples=100_000, alpha=0.001, seed=0)
    """

    def __init__(self, base_model: keras.Model, num_classes: int, noise: RandomizedLayer,
                 batch_size: int | None = None, compute_dtype: str = "float32",
                 strategy: tf.distribute.Strategy | None = None,
                 auto_pass_size: str | None = None):
        if not isinstance(noise, RandomizedLayer):
            raise TypeError(f"noise must be a tfcert randomized layer, got {type(noise).__name__}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown compute_dtype {compute_dtype!r}; choose from {COMPUTE_DTYPES}")
        auto_pass_size = auto_pass_size or pass_sizes.default_mode()
        if auto_pass_size not in pass_sizes.MODES:
            raise ValueError(f"unknown auto_pass_size {auto_pass_size!r}; choose from "
                             f"{pass_sizes.MODES}")
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"strategy must be a tf.distribute.Strategy, got "
                            f"{type(strategy).__name__}")
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.noise = noise
        self.batch_size = batch_size
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if native_bfloat16() else "float32"
        self.compute_dtype = compute_dtype
        self.strategy = strategy
        self.auto_pass_size = auto_pass_size
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if compute_dtype == "bfloat16":
                self.inference_model = bfloat16_clone(base_model)
            elif strategy is not None and not all(
                    strategy.extended.variable_created_in_scope(w.value)
                    for w in base_model.weights):
                self.inference_model = clone_with_weights(
                    base_model, "strategy= needs a base model built under strategy.scope(), "
                    "or one keras.models.clone_model can clone into it")
            else:
                self.inference_model = base_model
        self._pass_sizes: dict[tuple[tuple[int, ...], str | None], int] = {}
        self._calibrated: dict[tuple[int, ...], int | None] = {}  # None: not measured yet
        self._count_fns: dict[tuple[int, ...], Callable] = {}
        self._input_bytes: dict[tuple[int, ...], int] = {}

    @property
    def sigma(self) -> float:
        """σ of the Gaussian noise as it is drawn (the float32 value of ``stddev``): the
        scale of the ℓ2 radii.  A float64 σ above its float32 rounding would overstate
        the radii by up to 6e-8 relatively."""
        if not isinstance(self.noise, GaussianNoise):
            raise ValueError(
                "ℓ2 radii (renyi/cohen/pixeldp) need GaussianNoise; for randomized "
                "discretization use the KL certificate of tfcert.kl")
        return float(np.float32(self.noise.stddev))

    # ----------------------------------------------------------------- sampling
    def pass_size(self, image_shape: Sequence[int], device: str | None = None) -> int:
        """Noisy inputs per forward pass: ``batch_size``, else the calibrated size, else
        from the model's memory.

        The calibrated size (``auto_pass_size="calibrate"``, ``device`` ``None``, no
        ``strategy``) is the fastest one `sample_counts` measured, in this process or
        an earlier one on this machine (`tfcert.pass_sizes`), at most the memory cap
        (`tfcert.devices.pass_memory_cap`).  The memory size is `pass_memory` (of
        ``device``: ``None`` for this machine, ``"cpu"`` or ``"gpu"`` for a server
        elsewhere, where this machine's measurement means nothing) over
        `activation_bytes` of one input, between 1 and ``MAX_PASS_SIZE``; with a
        32 MiB cache: 113 for the STN MNIST CNN, 64 for the CIFAR CNN, 3 for ResNet50.
        """
        if self.batch_size:
            return int(self.batch_size)
        shape = tuple(int(d) for d in image_shape)
        if device is None and self._calibrates():
            if shape not in self._calibrated:
                cached = pass_sizes.lookup(self._calibration_key(shape))
                self._calibrated[shape] = cached and min(cached, self._pass_cap(shape))
            if self._calibrated[shape]:
                return self._calibrated[shape]
        return self._memory_pass_size(shape, device)

    def _memory_pass_size(self, shape: tuple[int, ...], device: str | None) -> int:
        """`pass_memory` of ``device`` over `activation_bytes` of one input, in
        [1, ``MAX_PASS_SIZE``]."""
        if (shape, device) not in self._pass_sizes:
            self._pass_sizes[shape, device] = int(np.clip(
                pass_memory(device) // self._activation_bytes(shape), 1, MAX_PASS_SIZE))
        return self._pass_sizes[shape, device]

    def _pass_cap(self, shape: tuple[int, ...]) -> int:
        """The largest pass size calibration may choose (`pass_memory_cap`)."""
        return int(np.clip(pass_memory_cap() // self._activation_bytes(shape), 1, MAX_PASS_SIZE))

    def _activation_bytes(self, shape: tuple[int, ...]) -> int:
        """`activation_bytes` of one input of ``shape`` (traced once per shape)."""
        if shape not in self._input_bytes:
            self._input_bytes[shape] = activation_bytes(self.inference_model, shape)
        return self._input_bytes[shape]

    def pass_size_candidates(self, image_shape: Sequence[int]) -> list[int]:
        """The pass sizes a calibration measures for inputs of ``image_shape``
        (`tfcert.pass_sizes.candidates` around the memory size, up to the memory cap)."""
        shape = tuple(int(d) for d in image_shape)
        return pass_sizes.candidates(self._memory_pass_size(shape, None), self._pass_cap(shape))

    def calibration_chunks(self, image_shape: Sequence[int], num_images: int) -> dict[int, int]:
        """Pass size -> draws per image of one measurement, for a calibration on
        ``num_images`` images (`pass_size_candidates`, `tfcert.pass_sizes.chunk_draws`);
        a call calibrates when it has `tfcert.pass_sizes.calibration_draws` of them."""
        shape = tuple(int(d) for d in image_shape)
        return {size: pass_sizes.chunk_draws(size, num_images, noise_block_size(shape))
                for size in self.pass_size_candidates(shape)}

    def _calibrates(self) -> bool:
        """Whether the automatic pass size is measured (see ``auto_pass_size``)."""
        return self.auto_pass_size == "calibrate" and self.strategy is None

    def _calibration_key(self, shape: tuple[int, ...]) -> str:
        return pass_sizes.calibration_key(self.inference_model, shape, self.compute_dtype)

    def count_votes(self, x: tf.Tensor, keys: tf.Tensor, num_samples: tf.Tensor,
                    pass_size: tf.Tensor, first_draw: tf.Tensor | int = 0,
                    replica: tf.Tensor | int = 0, num_replicas: int = 1) -> tf.Tensor:
        """Votes [batch, k] (int64) of draws ``first_draw … first_draw + num_samples − 1``.

        Image ``b``'s draws come in blocks of `noise_block_size` draws; block ``j`` is
        ``noise(B copies of x_b, seed=fold_in(keys[b], j))`` (`draw_keys` makes the
        keys), so the noise of a draw is a function of the image's key and the draw's
        number only: never of the other images, the pass size or where a call starts.
        A pass classifies the used draws of up to ``pass_size // u`` blocks (at least
        one), u = min(B, ``num_samples``) the most draws a block can use, and at most
        ``PARTIAL_BLOCKS_FACTOR · pass_size // B`` blocks, so memory stays bounded for any
        batch and ``num_samples`` and a call of a few draws per image (an early-stopping
        look) still runs passes of about ``pass_size`` inputs; votes are added
        with a scatter (no [inputs, k] one-hot tensor).  Core TensorFlow ops only: the
        exported serving signatures run this loop.

        ``replica`` and ``num_replicas`` (R) keep only passes ``replica``, ``replica`` + R,
        … of that loop, each exactly as the whole loop runs it: the votes of replicas
        0 … R − 1 sum to the whole loop's (see ``strategy`` in the class doc).
        """
        x = tf.convert_to_tensor(x, tf.float32)
        image_shape = x.shape[1:]
        if not image_shape.is_fully_defined():
            raise ValueError(f"count_votes needs a static image shape, got {x.shape}")
        block = noise_block_size(image_shape)
        batch = tf.shape(x, out_type=tf.int64)[0]
        keys = tf.cast(keys, tf.int64)
        first = tf.cast(first_draw, tf.int64)
        end = first + tf.cast(num_samples, tf.int64)
        first_block = first // block
        blocks = (end - 1) // block - first_block + 1  # blocks touched per image
        total = batch * blocks
        pass_size = tf.cast(pass_size, tf.int64)
        full_blocks = tf.maximum(pass_size // block, 1)
        per_pass = tf.clip_by_value(pass_size // tf.minimum(end - first, block), full_blocks,
                                    PARTIAL_BLOCKS_FACTOR * full_blocks)
        stride = per_pass * int(num_replicas)

        def noisy_block(unit):
            image, number = unit // blocks, first_block + unit % blocks
            copies = tf.repeat(tf.gather(x, image)[None], block, axis=0)
            seed = tf.random.experimental.stateless_fold_in(tf.gather(keys, image), number)
            return self.noise(copies, seed=seed)

        def one_pass(start, counts):
            units = tf.range(start, tf.minimum(total, start + per_pass))
            noisy = tf.map_fn(noisy_block, units,
                              fn_output_signature=tf.TensorSpec([block, *image_shape], tf.float32))
            draws = (first_block + units % blocks)[:, None] * block + tf.range(block, dtype=tf.int64)
            used = (draws >= first) & (draws < end)
            images = tf.boolean_mask(tf.broadcast_to((units // blocks)[:, None], tf.shape(used)),
                                     used)
            logits = self.inference_model(tf.boolean_mask(noisy, used), training=False)
            labels = tf.argmax(logits, axis=-1, output_type=tf.int64)
            counts = tf.tensor_scatter_nd_add(counts, tf.stack([images, labels], axis=1),
                                              tf.ones_like(labels))
            return start + stride, counts

        _, counts = tf.while_loop(
            lambda start, counts: start < total, one_pass,
            (tf.cast(replica, tf.int64) * per_pass,
             tf.zeros(tf.stack([batch, self.num_classes]), tf.int64)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, self.num_classes])),
            parallel_iterations=1)  # one pass in flight: memory is one pass, for any n
        return counts

    def _count_votes_on_replicas(self, x: tf.Tensor, keys: tf.Tensor, num_samples: tf.Tensor,
                                 pass_size: tf.Tensor, first_draw: tf.Tensor) -> tf.Tensor:
        """`count_votes` with its passes shared by the replicas of ``strategy``, the votes
        summed on the devices (the same votes as one device)."""
        replicas = self.strategy.num_replicas_in_sync

        def replica_votes(*args):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return self.count_votes(*args, replica=replica, num_replicas=replicas)

        votes = self.strategy.run(replica_votes, args=(x, keys, num_samples, pass_size,
                                                      first_draw))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)

    def sample_counts(self, x, num_samples: int, batch_size: int | None = None,
                      seed: int | Sequence[int] | None = None, indices=None,
                      first_draw: int = 0, stream: int = ESTIMATION) -> np.ndarray:
        """Votes of ``num_samples`` noisy draws per image: int64 numpy [batch, k].

        Args:
            x: images [batch, H, W, C] in [0, 1].
            num_samples: draws per image.
            batch_size: noisy inputs per forward pass (default: the classifier's).
            seed: int, or pair of ints, for reproducible votes; ``None``: a fresh random
                run key from OS entropy (unseeded calls never share noise).
            indices: int [batch], each image's index in its dataset (default
                0 … batch − 1).  With a fixed ``seed`` an image's votes depend only on
                (seed, index, draws), never on the rest of the batch: runs can be split
                into shards, resumed or re-batched with identical counts.
            first_draw: number of the first draw (draws ``first_draw …`` continue an
                earlier call with the same seed, as early stopping does).
            stream: `ESTIMATION` or `SELECTION` (Cohen's independent selection draws).
        """
        x = _check_images(x)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(first_draw) < 0:
            raise ValueError(f"first_draw must be >= 0, got {first_draw}")
        keys = draw_keys(run_key(seed), stream, image_indices(indices, len(x)))
        images = tf.constant(x)
        if batch_size:
            return self._counts(images, keys, int(num_samples), int(batch_size), int(first_draw))
        # a calibration stored by this or an earlier process (then `_calibrated_counts`
        # runs nothing), else the memory size
        size = self.pass_size(x.shape[1:])
        calibrated = self._calibrated_counts(images, keys, int(num_samples), int(first_draw))
        if calibrated is not None:
            return calibrated
        return self._counts(images, keys, int(num_samples), size, int(first_draw))

    def _counts(self, images: tf.Tensor, keys: tf.Tensor, num_samples: int, size: int,
                first_draw: int) -> np.ndarray:
        """Votes of draws ``first_draw … first_draw + num_samples − 1`` at pass size
        ``size`` (the compiled `count_votes`)."""
        return self._counter(images.shape[1:])(
            images, keys, tf.constant(num_samples, tf.int64), tf.constant(size, tf.int64),
            tf.constant(first_draw, tf.int64)).numpy()

    def _calibrated_counts(self, images: tf.Tensor, keys: tf.Tensor, num_samples: int,
                           first_draw: int) -> np.ndarray | None:
        """The votes of a `sample_counts` call that calibrates the pass size on its own
        draws (`tfcert.pass_sizes`), then stores it; ``None`` (nothing run) where the size
        is known or not measured, or the call has too few draws per image."""
        shape = tuple(int(d) for d in images.shape[1:])
        if not self._calibrates() or self._calibrated.get(shape):
            return None
        chunks = self.calibration_chunks(shape, len(images))
        if num_samples < pass_sizes.calibration_draws(chunks.values()):
            return None
        counts, done = 0, 0

        def run(size: int, draws: int) -> int:
            nonlocal counts, done
            counts = counts + self._counts(images, keys, draws, size, first_draw + done)
            done += draws
            return len(images) * draws

        rates = pass_sizes.measure(run, chunks)
        best = self._calibrated[shape] = pass_sizes.fastest(rates)
        pass_sizes.store(self._calibration_key(shape), best, rates, self.base_model.name)
        if num_samples > done:
            run(best, num_samples - done)
        return counts

    def _counter(self, image_shape: Sequence[int]) -> Callable:
        """The compiled vote counting of images of ``image_shape``: one ``tf.function``
        per image shape (`count_votes` needs it static), any batch size; a fully
        convolutional model serves every image size it accepts."""
        key = tuple(int(d) for d in image_shape)
        if key not in self._count_fns:
            self._count_fns[key] = tf.function(
                self.count_votes if self.strategy is None else self._count_votes_on_replicas,
                reduce_retracing=True)
        return self._count_fns[key]

    # ------------------------------------------------------------ certificates
    def certify(self, x, num_samples: int, alpha: float = 0.001,
                bound: str | Sequence[str] = "renyi", statistics: str = "simultaneous",
                num_selection_samples: int = 100, batch_size: int | None = None,
                seed: int | Sequence[int] | None = None, indices=None,
                early_stopping: StoppingRule | None = None) -> Certificate:
        """Certified prediction and ℓ2 radius per image (STN Algorithm 1 + Theorem 2).

        Args:
            x: images [batch, H, W, C] in [0, 1].
            num_samples: n, noisy draws per image for the bounds.
            alpha: failure probability α of the certificate, in (0, 1): a scalar, or
                one per image (``[batch]`` or ``[batch, 1]``; early stopping: a scalar).
            bound: ``"renyi"``, ``"cohen"``, ``"pixeldp"`` or a sequence of them, all
                computed on the same counts (``radius`` is the first one's).
            statistics: ``"simultaneous"`` (STN) or ``"cohen"`` (selection + estimation).
            num_selection_samples: n0 of Cohen's statistics (ignored otherwise); with
                ``early_stopping`` a few suffice (8 kept the accuracy on held-out MNIST
                images, docs/PERFORMANCE.md section 3).
            batch_size: noisy inputs per forward pass.
            seed, indices: as `sample_counts`; the selection draws are the `SELECTION`
                stream of the same run key, independent of the estimation draws.
            early_stopping: a `tfcert.sequential.StoppingRule` (target radius per
                image, or budget): each image is sampled only until it is decided,
                ``num_samples`` being the most draws per image, and the certificate's
                ``num_samples`` the draws spent (`tfcert.sequential.certify_sequential`).

        Example:

        >>> rule = tfcert.sequential.StoppingRule(target_radius=0.5)
        >>> cert = sc.certify(x, 10_000, early_stopping=rule, seed=0)
        """
        if early_stopping is not None:
            return certify_sequential(self, x, num_samples, early_stopping, alpha, bound,
                                      statistics, num_selection_samples, batch_size, seed,
                                      indices)
        bound_names(bound)
        check_statistics(statistics)
        stats.per_image_level(alpha, tf.TensorShape([len(x)]))  # checked before sampling
        sigma = self.sigma
        key = run_key(seed)  # one run key: the two streams below never share a draw
        counts = self.sample_counts(x, num_samples, batch_size, key, indices)
        selected, used = None, num_samples
        if statistics == "cohen":
            selected = self.select(x, num_selection_samples, batch_size, key, indices)
            used = num_samples + num_selection_samples
        return certificate_from_counts(counts, alpha, sigma, bound, statistics, selected, used)

    def select(self, x, num_selection_samples: int, batch_size: int | None = None,
               seed: int | Sequence[int] | None = None, indices=None) -> np.ndarray:
        """Class with the most of ``num_selection_samples`` votes of the `SELECTION` stream
        (Cohen's selection step, `tfcert.certificate.select_counts`)."""
        counts = self.sample_counts(x, num_selection_samples, batch_size, seed, indices,
                                    stream=SELECTION)
        return select_counts(counts).numpy()

    def predict(self, x, num_samples: int, alpha: float = 0.001,
                batch_size: int | None = None, seed: int | Sequence[int] | None = None,
                indices=None) -> np.ndarray:
        """Smoothed prediction with abstention (Cohen et al.'s PREDICT).

        Returns the top class where a two-sided binomial test of its count against
        the runner-up's rejects equality at level ``alpha``, else −1.  The returned
        class differs from g(x) with probability at most ``alpha`` (in (0, 1): a
        scalar, or one per image, ``[batch]`` or ``[batch, 1]``).
        """
        stats.per_image_level(alpha, tf.TensorShape([len(x)]))  # checked before sampling
        counts = self.sample_counts(x, num_samples, batch_size, seed, indices)
        return predict_counts(counts, alpha)[0].numpy()


def _check_images(x) -> np.ndarray:
    """Validates a batch of images: rank 4, finite, in [0, 1]; returns float32 numpy."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images [batch, height, width, channels], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"pixel values must be in [0, 1], got [{x.min()}, {x.max()}]")
    return x
