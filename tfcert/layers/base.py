"""Shared machinery of tfcert's randomized layers.

Every randomized layer owns a ``keras.random.SeedGenerator``: its state
variable is saved and exported with the model and advances on every call, so each
call draws fresh randomness while a layer built with ``seed=`` replays the same
sequence.  Keras does not save a ``SeedGenerator`` in ``.keras`` / ``.weights.h5``
files; `SavedSeedState` does, so a training run resumed from a backup draws on where
the interrupted one stopped instead of replaying its first draws.  A caller that needs
reproducible draws for one call (the per-request seed of the exported serving
signature, the EOT loop of an attack) passes ``seed=``, an int tensor of shape ``[2]``,
to ``call``; the layer then uses TensorFlow's stateless random ops with that seed and
leaves its generator untouched.

Under a ``tf.distribute`` strategy with several replicas, every replica runs the same
layer with the same generator state, so an unseeded call folds the replica id into
its seed (``tf.random.experimental.stateless_fold_in``): the replicas of one step draw
independent noise instead of N copies of one draw.  An explicit ``seed=`` is used as
given, on every replica (callers that pass one derive it per image themselves).
`replica_seed` does the fold-in for other per-step generators (the random starts of
:mod:`tfcert.adversarial_training`).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def replica_seed(seed: tf.Tensor) -> tf.Tensor:
    """The stateless seed (int64 ``[2]``) of this replica for a step's shared ``seed``:
    ``stateless_fold_in(seed, replica_id)`` inside a ``tf.distribute`` replica context
    with more than one replica in sync, else ``seed`` itself.  Each replica's draws are
    then a function of (seed, replica id): different across replicas, the same on
    every run with the same seed.  One device keeps the draws it had without a strategy."""
    seed = tf.cast(seed, tf.int64)
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        return seed
    folded = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
    return tf.cast(folded, tf.int64)


class SavedSeedState:
    """Mixin of a Keras layer or model with a ``seed_generator``: saves the generator's
    state with the object's variables (key ``"seed_generator_state"``) and restores it
    on load; a file saved without it (an earlier tfcert) loads with the state unchanged."""

    KEY = "seed_generator_state"

    def save_own_variables(self, store) -> None:
        super().save_own_variables(store)
        store[self.KEY] = self.seed_generator.state

    def load_own_variables(self, store) -> None:
        keys = set(store.keys())
        if self.KEY in keys:
            self.seed_generator.state.assign(store[self.KEY])
        super().load_own_variables({key: store[key] for key in keys - {self.KEY}})


class RandomizedLayer(SavedSeedState, keras.layers.Layer):
    """Base class of layers whose output is random at training *and* inference.

    Args:
        seed: optional int.  Seeds the layer's ``SeedGenerator`` so that the sequence
            of draws (one per call) is reproducible.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``...).
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def next_seed(self, seed: tf.Tensor | None = None) -> tf.Tensor:
        """Returns a stateless seed (int64 tensor ``[2]``): ``seed`` if given, else a fresh
        one from the layer's generator, made distinct per replica of a strategy with more
        than one replica (see the module doc)."""
        if seed is not None:
            return tf.cast(seed, tf.int64)
        return replica_seed(self.seed_generator.next())

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}
