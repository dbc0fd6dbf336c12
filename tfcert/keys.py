"""Noise keys of a run: the run key of a seed and the per-image draw keys (STN Algorithm 1's
"n i.i.d. noises", made reproducible).

A run key (int64 [2]) names one certification run.  Each image's noise comes from
``fold_in(fold_in(run_key, stream), index)``: its index in the dataset, never its place in
a batch, so a run can be split into shards, resumed or re-batched with identical votes, and
the `SELECTION` stream (Cohen's selection draws) never meets the `ESTIMATION` stream.
Draws come in blocks of `noise_block_size` seeded together (`tfcert.smoothing.count_votes`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

# Noise streams of one run key (`draw_keys`): Cohen's selection draws never coincide with
# the estimation draws.
ESTIMATION, SELECTION = 0, 1
# Noise blocks (`noise_block_size`): draws seeded together, 64 KiB of float32 noise at most.
NOISE_BLOCK_BYTES = 2 ** 16
MAX_NOISE_BLOCK = 64


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


def image_indices(indices, batch: int) -> np.ndarray:
    """``indices`` as int64 [batch] (default 0 … batch − 1), checked."""
    if indices is None:
        return np.arange(batch, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.shape != (batch,) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be {batch} ints (one per image), got shape {indices.shape}")
    return indices.astype(np.int64)
