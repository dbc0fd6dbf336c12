"""Training objectives as ``keras.Model`` wrappers with a custom ``train_step``.

Each wrapper holds a base classifier (logits) and changes only what ``fit`` optimises;
``call``, ``evaluate``, ``predict``, callbacks, compiled metrics, ``model.save`` /
``keras.models.load_model``, mixed precision and distribution strategies work as for
any Keras model.  History shows ``loss`` (the total), ``classification_loss`` (the
compiled loss) and ``<regularizer>_loss`` (the extra term, already weighted).

- `GaussianAugmentationModel`: compiled loss on x + N(0, σ²I) (Cohen et al. 2019).
- `StabilityModel`: STN Section 5.1, compiled loss on x plus γ times the cross-entropy
  between the predictions on x and on x + N(0, σ²I), in three variants (the paper's,
  a fixed clean target, and STN's released code).
- `ConsistencyModel`: Gaussian augmentation with m noisy copies plus consistency
  regularization (Jeong & Shin, NeurIPS 2020).
- `MACERModel`: cross-entropy of the soft smoothed classifier plus a hinge on its
  certified radius (Zhai et al., ICLR 2020).
- `SmoothAdvModel`: adversarial training of the smoothed classifier (Salman et al.,
  NeurIPS 2019): ℓ2 PGD on the soft smoothed classifier, then Gaussian augmentation
  at the adversarial points.
- The adversarial baselines (PGD adversarial training, TRADES) live in
  :mod:`tfcert.adversarial_training` and share `RobustTrainingModel`.
- Interrupted runs: `SafeBackupAndRestore` (a backup that survives a kill),
  `ResumableEarlyStopping` (patience counted over the epochs before the kill) and
  `EpochShuffle` (the data order of each epoch keyed by the epoch) make a resumed
  ``fit`` train exactly as an uninterrupted one; the noise layers' and random starts'
  generator states are saved with the weights (`tfcert.layers.base.SavedSeedState`).

Train the *base* model through the wrapper, then certify or export the base model
(``wrapper.base_model``), or the wrapper itself: its ``call`` is the base model's.

Every regularizer is a per-example value averaged like a Keras loss (weighted by the
sample weights, divided by the batch size and, under ``tf.distribute``, by the number of
replicas, so that the summed replica gradients are the gradient of the global mean).

Every objective trains under a ``tf.distribute`` strategy (`tfcert.devices.make_strategy`)
and under mixed precision (`tfcert.devices.set_precision`).  Build the base model, wrap it
and compile inside ``strategy.scope()``, after setting the precision; ``fit`` splits each
(global) batch over the replicas, whose noise and random starts differ (the replica id is folded into
each step's seed, :mod:`tfcert.layers.base`) yet are reproducible with ``seed=``.  Under
``"mixed_float16"`` the layers compute in float16 with float32 weights, the built-in
models' logits layer stays float32 (:mod:`tfcert.models`), the losses and regularizers
are computed in float32, and ``compile`` wraps the optimizer in a Keras
``LossScaleOptimizer`` (the wrapper's dtype policy is ``mixed_float16``), whose scaled
loss `RobustTrainingModel.train_step` differentiates.  A saved model keeps its layers'
policies: save ``tfcert.devices.policy_clone(base, "float32")`` to certify in float32.

>>> devices.set_precision("mixed_float16")
>>> strategy = devices.make_strategy("mirrored")        # every GPU of the machine
>>> with strategy.scope():
...     model = training.wrap(models.stn_mnist(), "stn", sigma=0.5, gamma=1.0, seed=0)
...     model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> model.fit(x_train, y_train, batch_size=256, epochs=5)   # 256 per step, all replicas
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcert.attacks.eot import loss_and_gradient, l2_norms, per_example
from tfcert.attacks.pgd import project
from tfcert.layers.noise import GaussianNoise


def _batch_mean(values: tf.Tensor, sample_weight: tf.Tensor | None = None) -> tf.Tensor:
    """Mean of per-example values ``[batch]`` reduced as Keras losses reduce
    (``"sum_over_batch_size"``): Σ wᵢ·vᵢ / batch, divided by the number of replicas in
    sync under a ``tf.distribute`` strategy."""
    values = tf.cast(values, tf.float32)
    if sample_weight is not None:
        values *= tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(values))
    mean = tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), tf.float32))
    return mean / tf.distribute.get_strategy().num_replicas_in_sync


def _tile(x: tf.Tensor, copies: int) -> tf.Tensor:
    """``[batch, ...]`` → ``[copies·batch, ...]``; copy j of example b is row j·batch + b."""
    return tf.tile(x, tf.concat([[copies], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0))


def _log_mean_softmax(logits: tf.Tensor, copies: int) -> tf.Tensor:
    """``log (1/m) Σ_i softmax(z_i)`` ``[batch, k]`` of the logits ``[m·batch, k]`` of m
    noisy copies (float32, computed stably as a logsumexp of log-softmaxes)."""
    log_probs = tf.nn.log_softmax(_per_copy(logits, copies))
    return tf.reduce_logsumexp(log_probs, axis=0) - tf.math.log(float(copies))


def _per_copy(logits: tf.Tensor, copies: int) -> tf.Tensor:
    """float32 ``[m, batch, k]`` view of the logits ``[m·batch, k]`` of m noisy copies."""
    logits = tf.cast(logits, tf.float32)
    return tf.reshape(logits, [copies, -1, tf.shape(logits)[-1]])


class RobustTrainingModel(keras.Model):
    """Base class: ``fit`` minimises compiled_loss(y, logits) + regularizer.

    Subclasses implement `training_outputs`, returning the logits the compiled loss
    and metrics see, and the (weighted, scalar) regularization term or ``None``.  When
    those logits are not one row per example (m noisy copies of each), they override
    `training_targets` to give the matching labels.

    Args:
        base_model: a Keras model mapping images to logits.
        **kwargs: ``keras.Model`` arguments (``name``...).
    """

    regularizer_name: str | None = None

    def __init__(self, base_model: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.base_model = base_model
        self.classification_loss_tracker = keras.metrics.Mean(name="classification_loss")
        self.regularizer_tracker = (keras.metrics.Mean(name=f"{self.regularizer_name}_loss")
                                    if self.regularizer_name else None)
        # The wrapper owns no trainable weights of its own (its noise layers create their
        # seed state in __init__), so it is built as soon as the base model is; this lets
        # `load_model` restore the optimizer state of a saved wrapper.
        self.built = base_model.built

    def build(self, input_shape):
        if not self.base_model.built:
            self.base_model.build(input_shape)

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def training_outputs(self, x, y, sample_weight=None, training=True):
        """Returns ``(logits, regularizer)`` of one batch: the logits the compiled loss and
        metrics see, and the weighted scalar regularization term (or ``None``)."""
        raise TypeError(f"{type(self).__name__} must implement training_outputs")

    def training_targets(self, y, sample_weight=None):
        """Returns the labels and sample weights that match the logits of
        `training_outputs`: the batch's own, one row per example."""
        return y, sample_weight

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            outputs = self._objective(x, y, sample_weight, True)
            scaled = self.optimizer.scale_loss(outputs[-1])
        weights = self.trainable_weights
        self.optimizer.apply(tape.gradient(scaled, weights), weights)
        return self._update_metrics(x, *outputs)

    def test_step(self, data):
        """``evaluate`` reports the same objective as ``fit``, on held-out data."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self._update_metrics(x, *self._objective(x, y, sample_weight, False))

    def _objective(self, x, y, sample_weight, training: bool):
        logits, regularizer = self.training_outputs(x, y, sample_weight, training=training)
        y, sample_weight = self.training_targets(y, sample_weight)
        classification = self.compute_loss(
            x=x, y=y, y_pred=logits, sample_weight=sample_weight, training=training)
        loss = classification if regularizer is None else classification + regularizer
        return y, sample_weight, logits, classification, regularizer, loss

    def _update_metrics(self, x, y, sample_weight, logits, classification, regularizer, loss):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.shape(x)[0]
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=batch)
        self.classification_loss_tracker.update_state(classification * replicas, batch)
        if self.regularizer_tracker is not None:
            self.regularizer_tracker.update_state(regularizer * replicas, batch)
        return self.compute_metrics(x, y, logits, sample_weight=sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(),
                "base_model": keras.saving.serialize_keras_object(self.base_model)}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        config["base_model"] = keras.saving.deserialize_keras_object(
            config["base_model"], custom_objects=custom_objects)
        return cls(**config)


class _NoisyTrainingModel(RobustTrainingModel):
    """Shared part of the noise-based objectives: a `GaussianNoise` layer of std σ, in
    float32 under any mixed-precision policy (the base model casts its noisy input)."""

    def __init__(self, base_model: keras.Model, sigma: float, seed: int | None = None, **kwargs):
        super().__init__(base_model, **kwargs)
        self.sigma = float(sigma)
        self.seed = seed
        self.noise = GaussianNoise(sigma, seed=seed, name="training_noise", dtype="float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "sigma": self.sigma, "seed": self.seed}


class _MultiNoiseTrainingModel(_NoisyTrainingModel):
    """Shared part of the objectives that draw m noise vectors per example."""

    def __init__(self, base_model: keras.Model, sigma: float, num_noise_samples: int,
                 seed: int | None = None, **kwargs):
        super().__init__(base_model, sigma, seed=seed, **kwargs)
        if int(num_noise_samples) < 1:
            raise ValueError(f"num_noise_samples must be >= 1, got {num_noise_samples}")
        self.num_noise_samples = int(num_noise_samples)

    def noisy_logits(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        """Base-model logits ``[m·batch, k]`` of m noisy copies of the batch (`_tile` order)."""
        return self.base_model(self.noise(_tile(x, self.num_noise_samples)), training=training)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_noise_samples": self.num_noise_samples}


class _NoisyCopiesTrainingModel(_MultiNoiseTrainingModel):
    """An objective whose compiled loss and metrics see each of the m noisy copies."""

    def training_targets(self, y, sample_weight=None):
        """The batch's labels (and weights) repeated for the m noisy copies."""
        m = self.num_noise_samples
        return _tile(y, m), None if sample_weight is None else _tile(sample_weight, m)


@keras.saving.register_keras_serializable(package="tfcert")
class GaussianAugmentationModel(_NoisyTrainingModel):
    """Trains on x + N(0, σ²I) only (Gaussian data augmentation, Cohen et al. 2019).

    Args:
        base_model: Keras model giving logits.
        sigma: noise standard deviation on the [0, 1] pixel scale.
        seed: optional int for reproducible training noise.

    Example:

    >>> model = tfcert.GaussianAugmentationModel(tfcert.models.stn_mnist(), sigma=0.5)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> model.fit(x_train, y_train, epochs=5)
    """

    def training_outputs(self, x, y, sample_weight=None, training=True):
        return self.base_model(self.noise(x), training=training), None


STABILITY_TARGETS = ("paper", "stop_gradient", "stn_code")


@keras.saving.register_keras_serializable(package="tfcert")
class StabilityModel(_NoisyTrainingModel):
    """Stability training with noise, STN Section 5.1.

    ``fit`` minimises ``L* + γ·L_stability`` with ``L*`` the compiled loss on the clean
    batch, x' = x + N(0, σ²I), z = f(x) and z' = f(x') the logits, and ``L_stability``
    per example, averaged over the batch, one of (``stability_target``):

    - ``"paper"``: ``−Σ_j P(y_j|x) log P(y_j|x')`` with P = softmax, as STN Section 5.1
      writes it; the gradient flows through both P(·|x) and P(·|x'), so the term also
      minimises the entropy of the clean prediction.
    - ``"stop_gradient"``: the same value with the clean prediction P(·|x) as a fixed
      target (``tf.stop_gradient``), so the gradient is that of KL(P(·|x) ‖ P(·|x')) in
      f(x') only: the fixed-target form of the KL stability loss of Zheng et al.
      (CVPR 2016; [ZSLG16] in STN).
    - ``"stn_code"``: what STN's released code (Bai-Li/STN-Code, TF 1.8 + Keras 2.2.4)
      computes: ``gen_adv_loss(logits_adv, logits, mean=True)`` in ``tf_utils_adv.py``
      calls ``K.categorical_crossentropy(logits, logits_adv, from_logits=True)``, whose
      Keras 2.2.4 TensorFlow backend body is ``return
      tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=output)``; TF 1.8's
      ``tf.nn.softmax_cross_entropy_with_logits`` (the v1 function) does ``labels =
      array_ops.stop_gradient(labels, name="labels_stop_gradient")`` and calls
      ``softmax_cross_entropy_with_logits_v2``.  So the target is the *raw clean logits*
      z, not probabilities, and receives no gradient: per example
      ``−Σ_j z_j · log softmax(z')_j``.  The fused ``SoftmaxCrossEntropyWithLogits``
      kernel returns the gradient ``softmax(z') − z`` for z' (its ``backprop = prob −
      labels``, exact only when the labels sum to 1), not the derivative
      ``softmax(z')·Σ_j z_j − z`` of that value; this model calls the same TF op with the
      same stop-gradient, so it follows the same gradient as STN's code.

    "paper" and "stop_gradient" have the same value (which includes the entropy of the
    clean prediction) and differ in the gradient.  The default, ``"stop_gradient"``, is
    chosen by measurement: noisy test accuracy (one N(0, σ²) draw per image, train.py's
    ``metrics.json``) on sklearn digits, small_cnn, σ = 0.3, γ = 1, Adam 1e-3, batch 128,
    mean of seeds 0, 1, 2 (``python train.py --dataset=digits --model=small_cnn
    --method=stn --sigma=0.3 --gamma=1 --stability_target=T --epochs=E --seed=S``):

    ==================  ================================  =====================
    variant             3 epochs (per seed)               10 epochs
    ==================  ================================  =====================
    γ = 0               0.794 (0.781, 0.794, 0.806)       0.824
    ``paper``           0.648 (0.744, 0.694, 0.506)       0.853
    ``stop_gradient``   0.791 (0.786, 0.789, 0.797)       0.849
    ``stn_code``        0.101 (chance; diverged)          0.101
    ==================  ================================  =====================

    ``stop_gradient`` learns as fast as γ = 0 and ends as well as ``paper``; ``paper``'s
    entropy term on the clean branch slows the first epochs and makes them seed-dependent.
    ``stn_code`` is unbounded below (its target is not a distribution: scaling the
    logits up lowers it without limit); here its loss fell to about −4·10⁴ within 4
    epochs while accuracy stayed at chance.  It is kept to reproduce the released code,
    not to train with.

    Args:
        base_model: Keras model giving logits.
        sigma: noise standard deviation σ of x' (the σ used at certification).
        gamma: weight γ ≥ 0 of the stability term (STN code: γ = 1, Adam 1e-3).  With
            γ = 0 this is standard training.
        stability_target: ``"paper"``, ``"stop_gradient"`` or ``"stn_code"`` (above).
        seed: optional int for reproducible training noise.

    Example:

    >>> model = tfcert.StabilityModel(tfcert.models.stn_mnist(), sigma=0.7, gamma=1.0)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               metrics=["accuracy"])
    >>> history = model.fit(x_train, y_train, epochs=5)   # loss, classification_loss, stability_loss
    >>> smoothed = tfcert.SmoothedClassifier(model.base_model, 10, tfcert.layers.GaussianNoise(0.7))
    """

    regularizer_name = "stability"

    def __init__(self, base_model: keras.Model, sigma: float, gamma: float = 1.0,
                 stability_target: str = "stop_gradient", seed: int | None = None, **kwargs):
        super().__init__(base_model, sigma, seed=seed, **kwargs)
        if not float(gamma) >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if stability_target not in STABILITY_TARGETS:
            raise ValueError(f"unknown stability_target {stability_target!r}; choose one of "
                             f"{STABILITY_TARGETS}")
        self.gamma = float(gamma)
        self.stability_target = stability_target

    def training_outputs(self, x, y, sample_weight=None, training=True):
        clean = self.base_model(x, training=training)
        noisy = tf.cast(self.base_model(self.noise(x), training=training), tf.float32)
        target = tf.cast(clean, tf.float32)
        if self.stability_target != "stn_code":
            target = tf.nn.softmax(target)
        if self.stability_target != "paper":
            target = tf.stop_gradient(target)
        stability = tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=noisy)
        return clean, self.gamma * _batch_mean(stability, sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma": self.gamma,
                "stability_target": self.stability_target}


@keras.saving.register_keras_serializable(package="tfcert")
class ConsistencyModel(_NoisyCopiesTrainingModel):
    """Consistency regularization (Jeong & Shin, NeurIPS 2020), on Gaussian augmentation.

    Per example, with m noisy copies x + δ_i, δ_i ~ N(0, σ²I), p_i = softmax(f(x + δ_i))
    and their mean p̂ = (1/m) Σ_i p_i, ``fit`` minimises (their eq. (7) with the
    cross-entropy of Cohen et al. as the classification loss)

        (1/m) Σ_i L*(y, f(x + δ_i))  +  λ · (1/m) Σ_i KL(p̂ ‖ p_i)  +  η · H(p̂),

    the compiled loss on each noisy copy (and the compiled metrics on the copies), the
    KL of each copy's prediction from the mean one, and the entropy H of the mean.  The
    gradient flows through p̂ too, as in their code (``consistency.py``).  History shows
    the last two terms, weighted, as ``consistency_loss``.

    Args:
        base_model: Keras model giving logits.
        sigma: noise standard deviation σ (the σ used at certification).
        num_noise_samples: m ≥ 1 noisy copies per example (paper: m = 2).
        lbd: weight λ ≥ 0 of the KL term (paper: 10 on MNIST at σ = 0.25; 20 on CIFAR-10
            at σ = 0.25, 0.5; 5-20 at σ = 1; their code's default 10).
        eta: weight η ≥ 0 of the entropy term (paper: 0.5).
        seed: optional int for reproducible training noise.

    Example:

    >>> model = tfcert.ConsistencyModel(tfcert.models.stn_mnist(), sigma=0.5, lbd=10.0)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               metrics=["accuracy"])   # accuracy on the noisy copies
    >>> history = model.fit(x_train, y_train, epochs=5)   # ... and consistency_loss
    """

    regularizer_name = "consistency"

    def __init__(self, base_model: keras.Model, sigma: float, num_noise_samples: int = 2,
                 lbd: float = 10.0, eta: float = 0.5, seed: int | None = None, **kwargs):
        super().__init__(base_model, sigma, num_noise_samples, seed=seed, **kwargs)
        if not (float(lbd) >= 0.0 and float(eta) >= 0.0):
            raise ValueError(f"need lbd >= 0 and eta >= 0, got {lbd}, {eta}")
        self.lbd = float(lbd)
        self.eta = float(eta)

    def training_outputs(self, x, y, sample_weight=None, training=True):
        logits = self.noisy_logits(x, training)
        log_probs = tf.nn.log_softmax(_per_copy(logits, self.num_noise_samples))
        log_mean = _log_mean_softmax(logits, self.num_noise_samples)
        mean = tf.exp(log_mean)
        kl = tf.reduce_mean(tf.reduce_sum(mean * (log_mean - log_probs), axis=-1), axis=0)
        entropy = -tf.reduce_sum(mean * log_mean, axis=-1)
        return logits, _batch_mean(self.lbd * kl + self.eta * entropy, sample_weight)

    def get_config(self) -> dict:
        return {**super().get_config(), "lbd": self.lbd, "eta": self.eta}


@keras.saving.register_keras_serializable(package="tfcert")
class MACERModel(_MultiNoiseTrainingModel):
    """MACER: attack-free training by maximising the certified radius (Zhai et al., ICLR 2020).

    With m draws δ_i ~ N(0, σ²I) per example and z_i = f(x + δ_i), the soft smoothed
    classifier is Ĝ(x) = (1/m) Σ_i softmax(z_i), and Ĝ_β the same with softmax(β·z_i).
    ``fit`` minimises (their eq. (9) and Algorithm 1)

        −log Ĝ(x)_y  +  λ · (σ/2) · max(γ − ξ, 0) · 1[argmax Ĝ_β(x) = y],
        ξ = Φ⁻¹(Ĝ_β(x)_y) − Φ⁻¹(max_{c≠y} Ĝ_β(x)_c),

    σ/2 · ξ being the Gaussian-quantile (Cohen) radius of the soft smoothed classifier.
    The hinge counts only correctly classified examples with ξ ≤ γ (as their code:
    examples with ξ > γ, or an infinite ξ, contribute 0).  The first term is the
    compiled loss on ``log Ĝ(x)``, which this model gives the compiled loss and metrics
    as the logits: compile with ``SparseCategoricalCrossentropy(from_logits=True)`` to get
    −log Ĝ(x)_y (their code adds 1e-10 inside the log; this model takes the log of the
    mean stably, as a logsumexp).  History shows the second term, weighted, as
    ``robustness_loss``.

    Args:
        base_model: Keras model giving logits.
        sigma: noise standard deviation σ (the σ used at certification).
        num_noise_samples: m ≥ 1 draws per example (paper: k = 16 on CIFAR-10, MNIST).
        lbd: weight λ ≥ 0 of the robustness term (paper: 12 at σ = 0.25, 4 at σ = 0.5, 1).
        gamma: hinge γ > 0 on ξ (paper: 8).
        beta: inverse temperature β > 0 of the robustness term's softmax (paper: 16).
        seed: optional int for reproducible training noise.

    Example:

    >>> model = tfcert.MACERModel(tfcert.models.stn_mnist(), sigma=0.25, lbd=12.0)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               metrics=["accuracy"])   # accuracy of the soft smoothed classifier
    >>> history = model.fit(x_train, y_train, epochs=5)   # ... and robustness_loss
    """

    regularizer_name = "robustness"

    def __init__(self, base_model: keras.Model, sigma: float, num_noise_samples: int = 16,
                 lbd: float = 12.0, gamma: float = 8.0, beta: float = 16.0,
                 seed: int | None = None, **kwargs):
        super().__init__(base_model, sigma, num_noise_samples, seed=seed, **kwargs)
        if not (float(lbd) >= 0.0 and float(gamma) > 0.0 and float(beta) > 0.0):
            raise ValueError(f"need lbd >= 0, gamma > 0 and beta > 0, got {lbd}, {gamma}, {beta}")
        self.lbd = float(lbd)
        self.gamma = float(gamma)
        self.beta = float(beta)

    def training_outputs(self, x, y, sample_weight=None, training=True):
        logits = self.noisy_logits(x, training)
        m = self.num_noise_samples
        soft = tf.reduce_mean(tf.nn.softmax(self.beta * _per_copy(logits, m)), axis=0)
        top, classes = tf.math.top_k(soft, k=2)
        correct = tf.equal(classes[:, 0], tf.reshape(tf.cast(y, classes.dtype), [-1]))
        xi = tf.math.ndtri(top[:, 0]) - tf.math.ndtri(top[:, 1])
        active = correct & (xi <= self.gamma)  # False for an infinite or NaN ξ
        # Inactive examples get fixed stand-in probabilities, so that Φ⁻¹ and its gradient
        # stay finite where the hinge is 0 (a NaN would leak through tf.where's gradient).
        p_top = tf.where(active, top[:, 0], 0.75)
        p_second = tf.where(active, top[:, 1], 0.25)
        hinge = tf.where(active, self.gamma - (tf.math.ndtri(p_top) - tf.math.ndtri(p_second)), 0.0)
        robustness = _batch_mean(self.sigma / 2.0 * hinge, sample_weight)
        return _log_mean_softmax(logits, m), self.lbd * robustness

    def get_config(self) -> dict:
        return {**super().get_config(), "lbd": self.lbd, "gamma": self.gamma, "beta": self.beta}


class BackupError(RuntimeError):
    """A `SafeBackupAndRestore` backup that cannot be restored (its message says what to do)."""


class SafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that survives a kill while it writes.

    It keeps the previous epoch's backup as well (Keras's ``double_checkpoint``): a
    backup torn by a kill in the middle of writing falls back to the one before, and the
    run resumes one epoch earlier.  A backup that neither copy can restore (both torn, or
    written by another model) raises `BackupError`, which names the directory to delete.

    Args:
        backup_dir: directory of the backup, used by nothing else.
    """

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, double_checkpoint=True)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError) as err:
            raise BackupError(f"cannot resume from the backup in {self.backup_dir} "
                              f"({' '.join(str(err).split())}): delete that directory to "
                              f"start the run over") from err


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping` that carries on the count of an interrupted run.

    When ``fit`` resumes an interrupted run (`keras.callbacks.BackupAndRestore`), Keras's
    callback starts afresh: it forgets the best value so far and how many epochs ago it
    came, so the resumed run may train up to ``patience`` epochs longer than an
    uninterrupted one.  This one replays the monitored values of the epochs already done
    through `keras.callbacks.EarlyStopping`'s own rule at the first epoch of ``fit``, so it stops at the
    epoch an uninterrupted run stops at.

    Args:
        logged: ``logged(epoch)`` returns the monitored values of epochs 0 … epoch − 1
            (e.g. read from the run's `keras.callbacks.CSVLogger` file).
        **kwargs: those of `keras.callbacks.EarlyStopping`, except
            ``restore_best_weights`` (the weights of logged epochs are gone; keep the
            best ones with `keras.callbacks.ModelCheckpoint`).

    >>> stop = ResumableEarlyStopping(lambda epoch: logged_values[:epoch],
    ...                               monitor="val_accuracy", mode="max", patience=3)
    """

    def __init__(self, logged, **kwargs):
        if kwargs.get("restore_best_weights"):
            raise ValueError("ResumableEarlyStopping cannot restore the best weights of "
                             "epochs run before the interruption: use ModelCheckpoint")
        super().__init__(**kwargs)
        self.logged = logged
        self._replayed = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._replayed = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._replayed:
            self._replayed = True
            for done, value in enumerate(self.logged(epoch)):
                self.on_epoch_end(done, {self.monitor: float(value)})


class EpochShuffle(keras.callbacks.Callback):
    """Shuffles the training data in an order that is a function of (seed, epoch) only.

    ``ds.shuffle(..., reshuffle_each_iteration=True)`` draws each epoch's order from a
    counter that restarts with the process, so a run resumed by `SafeBackupAndRestore`
    at epoch k sees epoch 0's order again.  Here epoch e's order is seeded by (seed, e),
    read when ``fit`` opens the epoch's iterator, after `on_epoch_begin`: with the
    weights, the optimizer and the noise layers' seed states restored from the backup, a
    resumed run trains exactly as an uninterrupted one.

    Args:
        seed: the run's seed.
        buffer_size: shuffle buffer (``tf.data.Dataset.shuffle``); a dataset no larger
            than it is shuffled uniformly.

    >>> shuffle = EpochShuffle(seed=0)
    >>> model.fit(shuffle(train_ds).batch(128), epochs=10,
    ...           callbacks=[shuffle, SafeBackupAndRestore("run/backup")])
    """

    def __init__(self, seed: int, buffer_size: int = 10_000):
        super().__init__()
        self.seed = int(seed)
        self.buffer_size = int(buffer_size)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="shuffle_epoch")

    def __call__(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        def this_epoch(_):
            # In the function graph only: its seed with the op seed (a tensor) seeds the
            # shuffle, whatever the global seed is (TF refuses a tensor op seed under 0).
            tf.random.set_seed(1 + self.seed % (2**31 - 2))
            return ds.shuffle(self.buffer_size, seed=self.epoch)

        shuffled = tf.data.Dataset.from_tensors(0).flat_map(this_epoch)
        if ds.cardinality() >= 0:   # flat_map forgets it; Keras's progress bar wants it
            shuffled = shuffled.apply(tf.data.experimental.assert_cardinality(ds.cardinality()))
        return shuffled

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


class _EpsilonWarmup(keras.callbacks.Callback):
    """Sets a `SmoothAdvModel`'s attack radius for each epoch before the epoch starts."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.current_eps.assign(self.model.eps_at(epoch))


@keras.saving.register_keras_serializable(package="tfcert")
class SmoothAdvModel(_NoisyCopiesTrainingModel):
    """SmoothAdv: adversarial training of the smoothed classifier (Salman et al., NeurIPS 2019).

    For each example, m noise vectors δ_1..δ_m ~ N(0, σ²I) are drawn once per step;
    x' is the ℓ2 "SmoothAdv_PGD" attack on the soft smoothed classifier with those
    draws (their eq. (S) / Algorithm 1 with m_train samples):

        x' = argmax_{‖x' − x‖₂ ≤ ε} −log (1/m) Σ_i softmax(f(x' + δ_i))_y,

    by ``steps`` steps of size 2ε/steps along the normalised gradient from x, each
    projected onto the ε-ball and clipped to [0, 1], with the base model in inference
    mode (the examples are constants for the weight gradient).  ``fit`` then minimises
    the compiled loss on the m noisy copies x' + δ_i with the *same* δ_i (their
    ``--train-multi-noise``); the compiled metrics see those copies too.  ε warms up
    linearly: epoch e (from 0) attacks with ε·min(1, (e + 1)/warmup_epochs) (their
    ``--warmup``); `fit` sets it before each epoch, and ``evaluate`` attacks with the
    radius of the last epoch trained.

    Args:
        base_model: Keras model giving logits.
        sigma: noise standard deviation σ (the σ used at certification).
        eps: final ℓ2 radius ε of the attack, on the [0, 1] pixel scale (paper: 0.25,
            0.5, 1, 2 on CIFAR-10; their README example 64/256 = 0.25).
        steps: PGD steps (paper: 1-10; README example 10).
        num_noise_samples: m ≥ 1 noise draws per example (README example: m = 2).
        warmup_epochs: epochs over which ε grows to ``eps`` (paper: 10; 1 = none).
        seed: optional int for reproducible training noise.

    Example:

    >>> model = tfcert.SmoothAdvModel(tfcert.models.stn_mnist(), 0.5, eps=0.5, steps=2)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               metrics=["accuracy"])   # accuracy on the noisy adversarial copies
    >>> history = model.fit(x_train, y_train, epochs=20)
    """

    def __init__(self, base_model: keras.Model, sigma: float, eps: float = 0.25,
                 steps: int = 10, num_noise_samples: int = 2, warmup_epochs: int = 10,
                 seed: int | None = None, **kwargs):
        super().__init__(base_model, sigma, num_noise_samples, seed=seed, **kwargs)
        if not float(eps) >= 0.0 or int(steps) < 1 or int(warmup_epochs) < 1:
            raise ValueError(f"need eps >= 0, steps >= 1 and warmup_epochs >= 1, got "
                             f"{eps}, {steps}, {warmup_epochs}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.warmup_epochs = int(warmup_epochs)
        self.current_eps = keras.Variable(self.eps_at(0), dtype="float32", trainable=False,
                                          name="current_eps")

    def eps_at(self, epoch: int) -> float:
        """The attack radius of epoch ``epoch`` (counted from 0) under the warm-up."""
        return self.eps * min(1.0, (epoch + 1) / self.warmup_epochs)

    def fit(self, *args, callbacks=None, **kwargs):
        """``keras.Model.fit``, with the attack radius set for each epoch (warm-up)."""
        return super().fit(*args, callbacks=[*(callbacks or []), _EpsilonWarmup()], **kwargs)

    def attack(self, x: tf.Tensor, y: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """SmoothAdv_PGD examples ``[batch, ...]`` against the soft smoothed classifier
        with the fixed draws ``noise`` ``[m·batch, ...]`` (`_tile` order)."""
        m = self.num_noise_samples
        eps = tf.convert_to_tensor(self.current_eps)
        step_size = 2.0 * eps / self.steps
        x = tf.stop_gradient(tf.cast(x, tf.float32))
        y = tf.stop_gradient(tf.reshape(y, [-1]))

        def smoothed(inputs, training=False):
            logits = self.base_model(_tile(inputs, m) + noise, training=training)
            return _log_mean_softmax(logits, m)

        def step(i, x_adv):
            _, grad = loss_and_gradient(smoothed, x_adv, y, "ce")
            direction = grad / per_example(tf.maximum(l2_norms(grad), 1e-12), grad)
            return i + 1, project(x, x_adv + step_size * direction, eps, "2")

        _, x_adv = tf.while_loop(lambda i, _: i < self.steps, step, [tf.constant(0), x])
        return tf.stop_gradient(x_adv)

    def training_outputs(self, x, y, sample_weight=None, training=True):
        noise = self.noise(tf.zeros_like(_tile(tf.cast(x, tf.float32), self.num_noise_samples)))
        x_adv = self.attack(x, y, noise)
        logits = self.base_model(_tile(x_adv, self.num_noise_samples) + noise, training=training)
        return logits, None

    def get_config(self) -> dict:
        return {**super().get_config(), "eps": self.eps, "steps": self.steps,
                "warmup_epochs": self.warmup_epochs}


_OBJECTIVES: dict[str, type[_NoisyTrainingModel]] = {
    "gaussian": GaussianAugmentationModel, "stn": StabilityModel,
    "consistency": ConsistencyModel, "macer": MACERModel, "smoothadv": SmoothAdvModel}
TRAINING_METHODS = ("standard", *_OBJECTIVES)


def wrap(base_model: keras.Model, method: str, sigma: float = 0.0, gamma: float | None = None,
         seed: int | None = None, **options) -> keras.Model:
    """Returns the model whose ``fit`` trains ``base_model`` with ``method``.

    ``"standard"`` returns ``base_model`` itself; ``"gaussian"`` a
    `GaussianAugmentationModel`, ``"stn"`` a `StabilityModel`, ``"consistency"`` a
    `ConsistencyModel`, ``"macer"`` a `MACERModel`, ``"smoothadv"`` a `SmoothAdvModel`,
    each with noise σ = ``sigma``.  ``gamma`` is the γ of the method's paper (STN's
    stability weight, MACER's hinge; ignored when ``None``); ``options`` are the other
    keyword arguments of the method's class (``stability_target``, ``lbd``, ...).
    """
    if method == "standard":
        return base_model
    if method not in _OBJECTIVES:
        raise ValueError(f"unknown training method {method!r}; choose one of {TRAINING_METHODS}")
    if gamma is not None:
        options["gamma"] = gamma
    return _OBJECTIVES[method](base_model, sigma, seed=seed, **options)
