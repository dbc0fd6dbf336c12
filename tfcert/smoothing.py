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
radius 0).  :mod:`tfcert.sequential` certifies with early stopping on the same machinery.

Speed (docs/PERFORMANCE.md): the noise, the argmax and the counting cost about 1% of
the base model's forward pass, so sampling runs at the model's own batched speed.
``compute_dtype="bfloat16"`` runs the base model in Keras mixed bfloat16 (noise still
added in float32, statistics in float64); it is off by default because it only pays
on hardware with native bfloat16 (``"auto"`` checks, see `native_bfloat16`).
``strategy=tf.distribute.MirroredStrategy()`` spreads the passes over the devices of a
machine with the same votes as one device (`SmoothedClassifier`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
from typing import TYPE_CHECKING, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcert import bounds, stats
from tfcert.layers.base import RandomizedLayer
from tfcert.layers.noise import GaussianNoise

if TYPE_CHECKING:  # tfcert.sequential imports this module
    from tfcert.sequential import EarlyStopping

RADII = {"renyi": bounds.renyi_radius, "cohen": bounds.cohen_radius,
         "pixeldp": bounds.pixeldp_radius}
STATISTICS = ("simultaneous", "cohen")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
ABSTAIN = -1
# Noise streams of one run key (`draw_keys`): Cohen's selection draws never coincide with
# the estimation draws.
ESTIMATION, SELECTION = 0, 1
# Noise blocks (`noise_block_size`): draws seeded together, 64 KiB of float32 noise at most.
NOISE_BLOCK_BYTES = 2 ** 16
MAX_NOISE_BLOCK = 64
# Automatic pass size (`pass_memory`, docs/PERFORMANCE.md): on CPU the live activations of
# a pass fit the last-level cache (the STN MNIST CNN runs 5-10% faster at 128 inputs per
# pass than at >= 512, whose activations spill out of a 32 MiB L3; the per-pass overhead,
# ~0.5 ms, is < 1% from ~32 inputs on); on GPU a larger budget keeps the device busy.
CPU_CACHE_DEFAULT = 32 * 2 ** 20  # where sysfs does not tell the cache size
GPU_PASS_MEMORY = 256 * 2 ** 20
PASS_DEVICES = ("cpu", "gpu")
MAX_PASS_SIZE = 4096
# CPU feature flags (/proc/cpuinfo) of native bfloat16 arithmetic: x86 AVX-512 BF16 and
# AMX, Arm BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclasses.dataclass
class Certificate:
    """Per-image result of `SmoothedClassifier.certify` (numpy arrays, batch first).

    Attributes:
        prediction: int64 class, −1 where the classifier abstains.
        radius: float64 certified ℓ2 radius of the first requested bound (0 if abstain).
        radii: every requested bound's radius, by name.
        counts: int64 [batch, num_classes] votes the bounds were computed from.
        p1_lower: lower confidence bound of the top class probability.
        p2_upper: upper confidence bound of the runner-up probability.
        num_samples: int64 [batch], noisy draws spent on each image (the votes in
            ``counts`` plus the selection samples under Cohen's statistics); they
            differ between images under early stopping (:mod:`tfcert.sequential`).
    """

    prediction: np.ndarray
    radius: np.ndarray
    radii: dict[str, np.ndarray]
    counts: np.ndarray
    p1_lower: np.ndarray
    p2_upper: np.ndarray
    num_samples: np.ndarray


def bound_names(bound: str | Sequence[str]) -> list[str]:
    """``bound`` as a checked, non-empty list of radius names (keys of `RADII`)."""
    names = [bound] if isinstance(bound, str) else list(bound)
    unknown = [b for b in names if b not in RADII]
    if not names or unknown:
        raise ValueError(f"unknown bound(s) {unknown or names}; choose from {sorted(RADII)}")
    return names


def noise_block_size(image_shape: Sequence[int]) -> int:
    """Draws per noise block for images of this shape (a function of the shape only).

    The largest power of two up to ``MAX_NOISE_BLOCK`` whose float32 noise fits in
    ``NOISE_BLOCK_BYTES``, at least 1: 64 for 8x8 digits, 16 for 28x28 MNIST, 4 for
    CIFAR-10, 1 for ImageNet.  Larger blocks mean fewer seeded noise calls per pass.
    """
    fit = NOISE_BLOCK_BYTES // (4 * int(np.prod([int(d) for d in image_shape])))
    return int(2 ** int(np.floor(np.log2(min(max(fit, 1), MAX_NOISE_BLOCK)))))


def run_key(seed: int | Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The stateless run key (int64 [2]) of a seed: ``[seed, 0]`` for an int, the pair
    itself for a pair, and a fresh key from OS entropy for ``None``."""
    if seed is None:
        return np.random.SeedSequence().generate_state(2, np.uint64).view(np.int64)
    pair = np.asarray([seed, 0] if np.ndim(seed) == 0 else seed)
    if pair.shape != (2,) or not np.issubdtype(pair.dtype, np.integer):
        raise ValueError(f"seed must be an int or a pair of ints, got {seed!r}")
    return pair.astype(np.int64)


def draw_keys(keys, stream: int | tf.Tensor, indices) -> tf.Tensor:
    """Per-image noise keys ``fold_in(fold_in(key_b, stream), index_b)`` (int64 [batch, 2]).

    Args:
        keys: run key(s), int [2] (one for the batch) or [batch, 2] (one per image).
        stream: `ESTIMATION` or `SELECTION`: the draws of different streams never
            coincide, so Cohen's selection votes are independent of the estimation votes.
        indices: int [batch], the images' indices in their dataset.

    Core TensorFlow ops only (`tf.random.experimental.stateless_fold_in`): the exported
    signatures derive their keys with it too.
    """
    indices = tf.cast(tf.convert_to_tensor(indices), tf.int64)
    keys = tf.broadcast_to(tf.cast(tf.convert_to_tensor(keys), tf.int64),
                           tf.stack([tf.size(indices), 2]))
    stream = tf.cast(stream, tf.int64)
    fold_in = tf.random.experimental.stateless_fold_in
    return tf.map_fn(lambda pair: fold_in(fold_in(pair[0], stream), pair[1]), (keys, indices),
                     fn_output_signature=tf.TensorSpec([2], tf.int64))


def _indices(indices, batch: int) -> np.ndarray:
    """``indices`` as int64 [batch] (default 0 … batch − 1), checked."""
    if indices is None:
        return np.arange(batch, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.shape != (batch,) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be {batch} ints (one per image), got shape {indices.shape}")
    return indices.astype(np.int64)


def certificate_from_counts(counts: np.ndarray, alpha: float | np.ndarray, sigma: float,
                            bound: str | Sequence[str] = "renyi",
                            statistics: str = "simultaneous",
                            selected: np.ndarray | None = None,
                            num_samples: np.ndarray | int | None = None) -> Certificate:
    """STN Algorithm 1 steps 4–6 on vote counts: bounds, prediction and radii.

    Args:
        counts: ``[batch, k]`` votes, non-negative integers (n = their row sum; an
            integer-valued float array is accepted, a fractional one refused).
        alpha: failure probability of each image's certificate, in (0, 1): a scalar, or
            one per image (``[batch]`` or ``[batch, 1]``).
        sigma: noise σ of the radii, finite and > 0.
        bound: radius name(s) of `RADII`; ``radius`` is the first one's.
        statistics: ``"simultaneous"`` (top class from ``counts``, bounds simultaneous
            over the k classes) or ``"cohen"`` (``selected`` class from separate
            selection samples, one-sided bound at level α).
        selected: int [batch] classes in [0, k) chosen on the selection samples
            (``"cohen"`` only).
        num_samples: draws per image recorded in the certificate, whole numbers >= the
            row sums, a scalar or [batch] (default: the row sums).

    Raises:
        ValueError: any argument outside this contract, naming it (`tfcert.stats`).
    """
    names = bound_names(bound)
    counts = np.array(stats.vote_counts(counts), np.int64)  # the certificate owns a copy
    if statistics == "simultaneous":
        p1_lower, p2_upper, top = stats.simultaneous_bounds(counts, alpha)
    elif statistics == "cohen":
        if selected is None:
            raise ValueError("statistics='cohen' needs the classes selected on separate samples")
        top = stats.class_indices(selected, counts.shape[1], "selected")
        p1_lower, p2_upper = stats.cohen_split_bounds(counts, top, alpha)
    else:
        raise ValueError(f"unknown statistics {statistics!r}; choose from {STATISTICS}")
    top = np.array(top, np.int64)
    p1_lower, p2_upper = np.array(p1_lower, np.float64), np.array(p2_upper, np.float64)
    certified = p1_lower > p2_upper
    radii = {name: np.where(certified, np.asarray(RADII[name](p1_lower, p2_upper, sigma)), 0.0)
             for name in names}
    return Certificate(prediction=np.where(certified, top, ABSTAIN), radius=radii[names[0]],
                       radii=radii, counts=counts, p1_lower=p1_lower, p2_upper=p2_upper,
                       num_samples=_draws_spent(counts, num_samples))


def _draws_spent(counts: np.ndarray, num_samples: np.ndarray | int | None) -> np.ndarray:
    """int64 [batch] draws per image: ``num_samples`` checked (whole, >= the votes), or the
    row sums of ``counts``."""
    votes = counts.sum(axis=1)
    if num_samples is None:
        return votes
    used = np.asarray(num_samples)
    if used.ndim > 1 or used.ndim == 1 and used.shape != votes.shape:
        raise ValueError(f"num_samples must be a scalar or one per image ({len(votes)}), got "
                         f"shape {used.shape}")
    if not (np.issubdtype(used.dtype, np.number) and np.all(np.isfinite(used))
            and np.all(used % 1 == 0)):
        raise ValueError(f"num_samples must be whole numbers, got {num_samples}")
    if np.any(used < votes):
        raise ValueError(f"num_samples must be >= the votes counted per image, got "
                         f"{num_samples} for {votes.tolist()[:3]} votes")
    return np.broadcast_to(used.astype(np.int64), votes.shape).copy()


class SmoothedClassifier:
    """The randomized classifier g(x) = argmax_c P(f(noise(x)) = c) of STN Algorithm 1.

    Args:
        base_model: Keras model mapping images in [0, 1] to logits.
        num_classes: k, the number of classes.
        noise: a randomized tfcert layer, e.g. ``tfcert.layers.GaussianNoise(σ)``;
            ℓ2 radii need `GaussianNoise` (its ``stddev`` is the σ of the bounds).
        batch_size: noisy inputs per forward pass (default: `pass_size`, from the
            model's activation memory).
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
                 strategy: tf.distribute.Strategy | None = None):
        if not isinstance(noise, RandomizedLayer):
            raise TypeError(f"noise must be a tfcert randomized layer, got {type(noise).__name__}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown compute_dtype {compute_dtype!r}; choose from {COMPUTE_DTYPES}")
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
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            if compute_dtype == "bfloat16":
                self.inference_model = bfloat16_clone(base_model)
            elif strategy is not None and not all(
                    strategy.extended.variable_created_in_scope(w.value)
                    for w in base_model.weights):
                self.inference_model = _clone_with_weights(
                    base_model, "strategy= needs a base model built under strategy.scope(), "
                    "or one keras.models.clone_model can clone into it")
            else:
                self.inference_model = base_model
        self._pass_sizes: dict[tuple[tuple[int, ...], str | None], int] = {}
        self._count_fns: dict[tuple[int, ...], Callable] = {}

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
        """Noisy inputs per forward pass: ``batch_size``, else from the model's memory.

        The automatic size is `pass_memory` (of ``device``: ``None`` for this machine,
        ``"cpu"`` or ``"gpu"`` for a server elsewhere) over `activation_bytes` of one
        input, between 1 and ``MAX_PASS_SIZE``; with a 32 MiB cache: 113 for the STN
        MNIST CNN, 64 for the CIFAR CNN, 3 for ResNet50.
        """
        if self.batch_size:
            return int(self.batch_size)
        key = (tuple(int(d) for d in image_shape), device)
        if key not in self._pass_sizes:
            per_input = activation_bytes(self.inference_model, key[0])
            self._pass_sizes[key] = int(np.clip(pass_memory(device) // per_input, 1,
                                                MAX_PASS_SIZE))
        return self._pass_sizes[key]

    def count_votes(self, x: tf.Tensor, keys: tf.Tensor, num_samples: tf.Tensor,
                    pass_size: tf.Tensor, first_draw: tf.Tensor | int = 0,
                    replica: tf.Tensor | int = 0, num_replicas: int = 1) -> tf.Tensor:
        """Votes [batch, k] (int64) of draws ``first_draw … first_draw + num_samples − 1``.

        Image ``b``'s draws come in blocks of `noise_block_size` draws; block ``j`` is
        ``noise(B copies of x_b, seed=fold_in(keys[b], j))`` (`draw_keys` makes the
        keys), so the noise of a draw is a function of the image's key and the draw's
        number only: never of the other images, the pass size or where a call starts.
        A pass classifies the used draws of up to ``pass_size // B`` blocks (at least
        one), so memory stays bounded for any batch and ``num_samples``; votes are added
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
        per_pass = tf.maximum(tf.cast(pass_size, tf.int64) // block, 1)
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
        size = int(batch_size) if batch_size else self.pass_size(x.shape[1:])
        keys = draw_keys(run_key(seed), stream, _indices(indices, len(x)))
        counts = self._counter(x.shape[1:])(
            tf.constant(x), keys, tf.constant(int(num_samples), tf.int64),
            tf.constant(size, tf.int64), tf.constant(int(first_draw), tf.int64))
        return counts.numpy()

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
                early_stopping: EarlyStopping | None = None) -> Certificate:
        """Certified prediction and ℓ2 radius per image (STN Algorithm 1 + Theorem 2).

        Args:
            x: images [batch, H, W, C] in [0, 1].
            num_samples: n, noisy draws per image for the bounds.
            alpha: failure probability α of the certificate, in (0, 1): a scalar, or
                one per image (``[batch]`` or ``[batch, 1]``; early stopping: a scalar).
            bound: ``"renyi"``, ``"cohen"``, ``"pixeldp"`` or a sequence of them, all
                computed on the same counts (``radius`` is the first one's).
            statistics: ``"simultaneous"`` (STN) or ``"cohen"`` (selection + estimation).
            num_selection_samples: n0 of Cohen's statistics (ignored otherwise).
            batch_size: noisy inputs per forward pass.
            seed, indices: as `sample_counts`; the selection draws are the `SELECTION`
                stream of the same run key, independent of the estimation draws.
            early_stopping: a `tfcert.sequential.EarlyStopping` rule (target radius per
                image, or budget): each image is sampled only until it is decided,
                ``num_samples`` being the most draws per image, and the certificate's
                ``num_samples`` the draws spent (`tfcert.sequential.certify_sequential`).

        Example:

        >>> rule = tfcert.sequential.EarlyStopping(target_radius=0.5)
        >>> cert = sc.certify(x, 10_000, early_stopping=rule, seed=0)
        """
        if early_stopping is not None:
            from tfcert.sequential import certify_sequential  # it imports this module

            return certify_sequential(self, x, num_samples, early_stopping, alpha, bound,
                                      statistics, num_selection_samples, batch_size, seed,
                                      indices)
        bound_names(bound)
        if statistics not in STATISTICS:
            raise ValueError(f"unknown statistics {statistics!r}; choose from {STATISTICS}")
        _image_levels(alpha, len(x))  # checked before any sampling
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
        (Cohen's selection step)."""
        counts = self.sample_counts(x, num_selection_samples, batch_size, seed, indices,
                                    stream=SELECTION)
        return np.argmax(counts, axis=1)

    def predict(self, x, num_samples: int, alpha: float = 0.001,
                batch_size: int | None = None, seed: int | Sequence[int] | None = None,
                indices=None) -> np.ndarray:
        """Smoothed prediction with abstention (Cohen et al.'s PREDICT).

        Returns the top class where a two-sided binomial test of its count against
        the runner-up's rejects equality at level ``alpha``, else −1.  The returned
        class differs from g(x) with probability at most ``alpha`` (in (0, 1): a
        scalar, or one per image, ``[batch]`` or ``[batch, 1]``).
        """
        level = _image_levels(alpha, len(x))
        counts = self.sample_counts(x, num_samples, batch_size, seed, indices)
        top2 = np.sort(counts, axis=1)[:, ::-1][:, :2]
        pvalue = np.asarray(stats.binomial_test_pvalue(top2[:, 0], top2[:, 0] + top2[:, 1]))
        return np.where(pvalue <= level, np.argmax(counts, axis=1), ABSTAIN).astype(np.int64)


def _image_levels(alpha: float | np.ndarray, batch: int) -> np.ndarray:
    """``alpha`` checked (in (0, 1); a scalar or one per image, ``[batch]`` or
    ``[batch, 1]``) as a float64 scalar or ``[batch]`` array."""
    return stats.per_image_level(alpha, tf.TensorShape([batch])).numpy()


# ---------------------------------------------------------------- model speed helpers
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
        local = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        return int(min(pass_memory(local), _free_memory_bytes() // 8))
    if device not in PASS_DEVICES:
        raise ValueError(f"device must be one of {PASS_DEVICES} or None, got {device!r}")
    if device == "gpu":
        return GPU_PASS_MEMORY
    return max(_cache_sizes(), default=CPU_CACHE_DEFAULT)


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
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.split(":")[0].strip() in ("flags", "Features")
            for flag in line.split(":", 1)[1].split()}


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
    mixed-precision training (`tfcert.training.set_precision`): a saved model keeps each
    layer's policy, so the trained model itself would compute in float16 when loaded.
    Sequential and functional models only (nested ones included).
    """
    output_layer = _output_layer(model)

    def clone_layer(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer) and "dtype" in config:
            config["dtype"] = "float32" if layer is output_layer else policy
        return layer.__class__.from_config(config)

    return _clone_with_weights(
        model, f"a {policy} clone needs a Sequential or functional base model", clone_layer)


def _clone_with_weights(model: keras.Model, requirement: str,
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
