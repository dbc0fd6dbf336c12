"""Attacks for empirical robustness: white-box PGD and Carlini-Wagner ℓ2 with
EOT for randomized defenses (BPDA through RandDisc's straight-through gradient comes for
free), the decision-based boundary attack, and black-box transfer.

Every attack takes a Keras model giving logits (possibly randomized) or a `KeyedDefense`,
images in [0, 1] and integer labels, runs batched inside one ``tf.function``, and returns
adversarial images in [0, 1] of the input's shape.  Each example's randomness comes from
its own stateless key (`example_keys`), so with per-example keys a result does not
depend on the batch (`tfcert.attacks.eot`).
"""

from tfcert.attacks.boundary import boundary_attack
from tfcert.attacks.carlini_wagner import carlini_wagner_l2
from tfcert.attacks.eot import (KeyedDefense, eot_log_probs, example_keys, loss_and_gradient,
                                margin)
from tfcert.attacks.pgd import NORMS, pgd, project
from tfcert.attacks.transfer import transfer_attack

__all__ = ["KeyedDefense", "NORMS", "boundary_attack", "carlini_wagner_l2", "eot_log_probs",
           "example_keys", "loss_and_gradient", "margin", "pgd", "project", "transfer_attack"]
