"""Compute dtype (mixed bfloat16) and the automatic pass size of SmoothedClassifier."""

import keras
import numpy as np
import pytest
from test_smoothing import SHAPE, linear_model

from tfcert import devices
from tfcert.layers import GaussianNoise
from tfcert.devices import activation_bytes, bfloat16_clone
from tfcert.smoothing import SmoothedClassifier


@pytest.fixture(scope="module")
def trained(digits_model, digits):
    return keras.models.load_model(digits_model), digits[2][:40]


def test_bfloat16_clone_keeps_weights_and_the_global_policy(trained):
    model, x = trained
    before = keras.mixed_precision.global_policy().name
    clone = bfloat16_clone(model)
    assert keras.mixed_precision.global_policy().name == before == "float32"
    assert all(layer.compute_dtype == "float32" for layer in model.layers)
    assert [layer.compute_dtype for layer in clone.layers] == ["bfloat16"] * (
        len(clone.layers) - 1) + ["float32"]  # logits layer stays float32
    assert all(w.dtype == "float32" for w in clone.weights)
    for ours, theirs in zip(clone.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    logits, reference = clone(x).numpy(), model(x).numpy()
    assert logits.dtype == np.float32
    # bfloat16's unit roundoff is 2^-8 ≈ 0.4% per rounding; a few roundings through the
    # four layers of small_cnn stay far below 5% of the largest logit
    np.testing.assert_allclose(logits, reference, atol=0.05 * np.abs(reference).max())


def fixed_two_layer_model(seed: int = 0) -> tuple[keras.Model, list[np.ndarray]]:
    """Dense(64, relu) → Dense(2) on 4x4x1 images with fixed random weights (the same
    on every machine), and those weights."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.5, (16, 64)), rng.normal(0, 0.1, 64),
               rng.normal(0, 0.5, (64, 2)), np.zeros(2)]
    weights = [w.astype(np.float32) for w in weights]
    model = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)])
    model.set_weights(weights)
    return model, weights


def test_bfloat16_votes_differ_only_within_the_rounding_bound():
    """bfloat16 flips a vote only where the float32 margin is within its rounding error.

    Issue: this test compared radii of a model trained on the machine against a
    threshold tuned on one CPU.  Now the weights are fixed and the tolerance is derived:
    the hidden layer runs in bfloat16 (unit roundoff u = 2^-8) and the logits layer in
    float32, so each hidden unit is off by at most |Δh_j| ≤ 4u·(Σ_i |w_ij x_i| + |b_j|)
    (rounding of x, of w and of h, plus float32 accumulation, well below u), and the
    margin logit_1 − logit_0 by at most δ(x) = Σ_j |v_j1 − v_j0| · |Δh_j|.  A vote can
    flip only if |margin(x)| ≤ δ(x).  The flipped fraction of the votes is therefore at
    most q = P(|margin| ≤ δ) under the noise; q is estimated on 200,000 independent
    numpy draws, and 5 binomial standard errors of each estimate (false alarm < 1e-6)
    cover the sampling error of both sides.
    """
    model, (w, b, v, _) = fixed_two_layer_model()
    sigma, n = 0.5, 20_000
    x = np.random.default_rng(1).random((8, *SHAPE)).astype(np.float32)
    runs = {dtype: SmoothedClassifier(model, 2, GaussianNoise(sigma), compute_dtype=dtype)
            for dtype in ("float32", "bfloat16")}
    assert runs["bfloat16"].inference_model is not model
    counts = {dtype: sc.sample_counts(x, n, seed=7) for dtype, sc in runs.items()}
    np.testing.assert_array_equal(counts["bfloat16"].sum(axis=1), n)
    flipped = np.abs(counts["bfloat16"] - counts["float32"]).sum() / 2 / (len(x) * n)

    draws = 25_000  # per image: 200,000 in all
    rng = np.random.default_rng(2)
    noisy = (x.reshape(len(x), 1, 16) + rng.normal(0, sigma, (len(x), draws, 16))).reshape(-1, 16)
    pre = noisy.astype(np.float64) @ w + b
    margin = np.maximum(pre, 0) @ (v[:, 1] - v[:, 0])
    delta = (4 * 2.0 ** -8 * (np.abs(noisy) @ np.abs(w) + np.abs(b))) @ np.abs(v[:, 1] - v[:, 0])
    q = np.mean(np.abs(margin) <= delta)
    slack = 5 * (np.sqrt(q * (1 - q) / len(noisy)) + np.sqrt(max(q, 1e-4) / (len(x) * n)))
    assert flipped <= q + slack, (flipped, q)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(devices.tf.config, "list_physical_devices", lambda kind=None: [])
    model = linear_model(np.ones(16) / 4, -2.0)
    for flags, expected in (({"avx2", "avx512f"}, "float32"), ({"avx512_bf16"}, "bfloat16"),
                            ({"amx_bf16", "amx_tile"}, "bfloat16"), (set(), "float32")):
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: flags)
        assert devices.native_bfloat16() == (expected == "bfloat16")
        sc = SmoothedClassifier(model, 2, GaussianNoise(0.5), compute_dtype="auto")
        assert sc.compute_dtype == expected


def test_bad_compute_dtype_and_unclonable_models_are_refused():
    model = linear_model(np.ones(16) / 4, -2.0)
    with pytest.raises(ValueError, match="compute_dtype"):
        SmoothedClassifier(model, 2, GaussianNoise(0.5), compute_dtype="float16")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(keras.ops.reshape(x, (-1, 16)))

    with pytest.raises(ValueError, match="Sequential or functional"):
        SmoothedClassifier(Subclassed(), 2, GaussianNoise(0.5), compute_dtype="bfloat16")


def test_pass_memory_is_the_cpu_cache_without_gpus(monkeypatch):
    monkeypatch.setattr(devices.tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(devices, "_cache_sizes", lambda: [48 * 2 ** 10, 2 ** 20, 2 ** 25])
    assert devices.pass_memory() == min(2 ** 25, devices._free_memory_bytes() // 8)
    monkeypatch.setattr(devices, "_cache_sizes", lambda: [])
    assert devices.pass_memory() == min(devices.CPU_CACHE_DEFAULT,
                                          devices._free_memory_bytes() // 8)
    assert devices.pass_memory("cpu") == devices.CPU_CACHE_DEFAULT
    assert devices.pass_memory("gpu") == devices.GPU_PASS_MEMORY
    with pytest.raises(ValueError, match="device"):
        devices.pass_memory("tpu")


def test_pass_memory_is_the_gpu_budget_with_a_gpu(monkeypatch):
    monkeypatch.setattr(devices.tf.config, "list_physical_devices",
                        lambda kind=None: ["GPU:0"])
    assert devices.pass_memory() == min(devices.GPU_PASS_MEMORY,
                                          devices._free_memory_bytes() // 8)
    assert devices.pass_memory("cpu") == max(devices._cache_sizes(),
                                               default=devices.CPU_CACHE_DEFAULT)


def test_activation_bytes_and_the_automatic_pass_size():
    def conv(width):
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(width, 3),
                                 keras.layers.Flatten(), keras.layers.Dense(10)])

    # Conv2D + bias: the conv output and the biased copy are live together.
    for width in (8, 16):
        assert activation_bytes(conv(width), (28, 28, 1)) == 2 * 26 * 26 * width * 4
    model = linear_model(np.ones(16) / 4, 0.0)
    assert activation_bytes(model, SHAPE) >= 16 * 4
    big = SmoothedClassifier(conv(64), 10, GaussianNoise(0.5))
    assert big.pass_size((28, 28, 1)) == devices.pass_memory() // (2 * 26 * 26 * 64 * 4)
    assert SmoothedClassifier(model, 2, GaussianNoise(0.5)).pass_size(SHAPE) == (
        devices.MAX_PASS_SIZE)
    assert SmoothedClassifier(model, 2, GaussianNoise(0.5), batch_size=7).pass_size(SHAPE) == 7
