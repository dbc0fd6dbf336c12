"""Black-box transfer attack (STN Section 6.2).

Adversarial examples are made white-box on a *source* model (STN: Madry et al.'s
PGD-adversarially-trained model, which gave the strongest transfer attacks against both
TRADES and STN) and then classified by the *target* defense, whose gradients and
randomness the attacker never sees.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from tfcert.attacks.pgd import pgd


def transfer_attack(source_model: keras.Model, target_model: Callable[[tf.Tensor], tf.Tensor],
                    x, y, attack_fn: Callable[..., tf.Tensor] = pgd,
                    **attack_kwargs) -> tuple[tf.Tensor, tf.Tensor]:
    """Attacks ``source_model`` and returns the examples and the target's predictions on them.

    Args:
        source_model: Keras model giving logits, attacked white-box.
        target_model: the defense under evaluation: any callable mapping images to
            per-class scores (logits, probabilities or vote counts; e.g. a randomized
            Keras model or a smoothed classifier's counts); only its argmax is used.
        x: images ``[batch, ...]`` in [0, 1].
        y: true labels ``[batch]``.
        attack_fn: a white-box attack ``attack_fn(model, x, y, **attack_kwargs)`` such
            as `pgd` (default) or `carlini_wagner_l2`.
        **attack_kwargs: its arguments (``eps``, ``norm``, ``steps``...).

    Returns:
        ``(x_adv, predictions)``: the adversarial images made on the source, and the
        target's predicted labels (int64 ``[batch]``) on them.

    Example:

    >>> madry = tfcert.adversarial_training.AdversarialTrainingModel(base, eps=0.3)
    >>> ...  # fit
    >>> x_adv, pred = tfcert.attacks.transfer_attack(madry.base_model, defense, x, y, eps=0.3)
    >>> accuracy = np.mean(pred.numpy() == y)
    """
    x_adv = attack_fn(source_model, x, y, **attack_kwargs)
    return x_adv, tf.argmax(target_model(x_adv), axis=-1)
