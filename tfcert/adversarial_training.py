"""Adversarial-training baselines of STN Section 6, as `RobustTrainingModel`s.

- `AdversarialTrainingModel`: PGD adversarial training (Madry et al. 2018): the compiled
  loss is taken on PGD examples only.
- `TRADESModel`: TRADES (Zhang et al. 2019): compiled loss on the clean batch plus
  β · KL(f(x) ‖ f(x_adv)), with x_adv the PGD maximiser of that KL in the ε-ball.

Both craft their examples with `tfcert.attacks.pgd` on the base model in inference mode,
inside ``fit``'s compiled ``train_step``; the examples are constants for the weight
gradient.  ``evaluate`` runs the same objective (attack included) on held-out data.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfcert.attacks.pgd import NORMS, pgd
from tfcert.layers.base import SavedSeedState, replica_seed
from tfcert.training import RobustTrainingModel

ADVERSARIAL_METHODS = ("pgd", "trades")


class _PGDTrainingModel(SavedSeedState, RobustTrainingModel):
    """Shared part: the PGD settings and a `SeedGenerator` for the random starts (saved
    with the weights, `SavedSeedState`)."""

    def __init__(self, base_model: keras.Model, eps: float, norm: str = "inf",
                 steps: int = 10, step_size: float | None = None, seed: int | None = None,
                 **kwargs):
        super().__init__(base_model, **kwargs)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if not float(eps) >= 0.0 or int(steps) < 1:
            raise ValueError(f"need eps >= 0 and steps >= 1, got {eps}, {steps}")
        self.eps = float(eps)
        self.norm = norm
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def attack(self, x, y, loss="ce") -> tf.Tensor:
        """PGD examples of the batch against the current base model (random start; the
        replicas of a ``tf.distribute`` strategy draw different starts, `replica_seed`)."""
        return pgd(self.base_model, x, y, self.eps, norm=self.norm, steps=self.steps,
                   step_size=self.step_size, loss=loss,
                   seed=replica_seed(self.seed_generator.next()))

    def get_config(self) -> dict:
        return {**super().get_config(), "eps": self.eps, "norm": self.norm,
                "steps": self.steps, "step_size": self.step_size, "seed": self.seed}


@keras.saving.register_keras_serializable(package="tfcert")
class AdversarialTrainingModel(_PGDTrainingModel):
    """PGD adversarial training (Madry et al. 2018): ``fit`` minimises the compiled loss on
    PGD examples (maximising the cross-entropy in the ε-ball, random start).

    Args:
        base_model: Keras model giving logits.
        eps: radius of the ball on the [0, 1] pixel scale (Madry et al. MNIST: 0.3, ℓ∞).
        norm: ``"inf"`` or ``"2"``.
        steps: PGD steps per batch (Madry et al.: 40 on MNIST, 7 on CIFAR-10).
        step_size: PGD step; default ``2.5 · eps / steps``.
        seed: optional int for reproducible random starts.

    Example:

    >>> model = AdversarialTrainingModel(tfcert.models.stn_mnist(), eps=0.3, steps=40)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               metrics=["accuracy"])   # accuracy on the PGD examples
    >>> model.fit(x_train, y_train, epochs=10)
    """

    def training_outputs(self, x, y, sample_weight=None, training=True):
        return self.base_model(self.attack(x, y), training=training), None


@keras.saving.register_keras_serializable(package="tfcert")
class TRADESModel(_PGDTrainingModel):
    """TRADES (Zhang et al. 2019): compiled loss on x + β · KL(f(x) ‖ f(x_adv)).

    x_adv maximises KL(f(x) ‖ f(x')) over the ε-ball by PGD (the clean prediction is the
    fixed target of the attack).  It starts from a uniform point of the ball rather than
    TRADES' x + 0.001·N(0, I): both avoid the zero gradient of the KL at x' = x.  The
    KL term is a ``keras.losses.KLDivergence`` on the softmax outputs (reduced like the
    compiled loss); its gradient flows through both f(x) and f(x_adv), as in TRADES.

    Args:
        base_model: Keras model giving logits.
        eps: radius of the ball (TRADES MNIST: 0.3, CIFAR-10: 8/255 ≈ 0.031, ℓ∞).
        beta: weight β ≥ 0 of the KL term (TRADES: 6.0; 1/λ in their notation).
        norm: ``"inf"`` or ``"2"``.
        steps: PGD steps per batch (TRADES: 40 on MNIST, 10 on CIFAR-10).
        step_size: PGD step; default ``2.5 · eps / steps``.
        seed: optional int for reproducible random starts.

    Example:

    >>> model = TRADESModel(tfcert.models.stn_mnist(), eps=0.3, beta=6.0, steps=40)
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> history = model.fit(x_train, y_train, epochs=10)   # ... and trades_loss
    """

    regularizer_name = "trades"

    def __init__(self, base_model: keras.Model, eps: float, beta: float = 6.0,
                 norm: str = "inf", steps: int = 10, step_size: float | None = None,
                 seed: int | None = None, **kwargs):
        super().__init__(base_model, eps, norm=norm, steps=steps, step_size=step_size,
                         seed=seed, **kwargs)
        if not float(beta) >= 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.kl_divergence = keras.losses.KLDivergence()
        self._attack_kl = keras.losses.KLDivergence(reduction=None)

    def attack_loss(self, clean_probs: tf.Tensor, log_probs: tf.Tensor) -> tf.Tensor:
        """Per-example KL(clean ‖ attacked), the loss TRADES' inner PGD maximises."""
        return self._attack_kl(clean_probs, tf.exp(log_probs))

    def training_outputs(self, x, y, sample_weight=None, training=True):
        clean = self.base_model(x, training=training)
        clean_probs = tf.nn.softmax(tf.cast(clean, tf.float32))
        x_adv = self.attack(x, tf.stop_gradient(clean_probs), loss=self.attack_loss)
        adv_probs = tf.nn.softmax(tf.cast(self.base_model(x_adv, training=training), tf.float32))
        kl = self.kl_divergence(clean_probs, adv_probs, sample_weight=sample_weight)
        return clean, self.beta * kl

    def get_config(self) -> dict:
        return {**super().get_config(), "beta": self.beta}


def wrap(base_model: keras.Model, method: str, eps: float, norm: str = "inf", steps: int = 10,
         step_size: float | None = None, beta: float = 6.0,
         seed: int | None = None) -> RobustTrainingModel:
    """Returns the model whose ``fit`` trains ``base_model`` with ``method``:
    ``"pgd"`` → `AdversarialTrainingModel`, ``"trades"`` → `TRADESModel`."""
    if method == "pgd":
        return AdversarialTrainingModel(base_model, eps, norm=norm, steps=steps,
                                        step_size=step_size, seed=seed)
    if method == "trades":
        return TRADESModel(base_model, eps, beta=beta, norm=norm, steps=steps,
                           step_size=step_size, seed=seed)
    raise ValueError(f"unknown adversarial training method {method!r}; "
                     f"choose one of {ADVERSARIAL_METHODS}")
