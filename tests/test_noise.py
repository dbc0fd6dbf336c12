"""GaussianNoise: statistics, freshness, seeds, replicas, no clipping, graph mode, serialization."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from tfcert.layers import GaussianNoise


def test_mean_and_variance_match_sigma():
    x = tf.fill([64, 28, 28, 1], 0.5)
    noise = GaussianNoise(0.7, seed=1)(x).numpy() - 0.5
    n = noise.size
    assert abs(noise.mean()) < 5 * 0.7 / np.sqrt(n)
    # var of the sample variance of a Gaussian is 2σ⁴/(n−1)
    assert abs(noise.var() - 0.49) < 5 * np.sqrt(2 * 0.49 ** 2 / n)


def test_fresh_noise_per_call_and_reproducible_with_seed():
    x = tf.zeros([4, 8, 8, 1])
    a, b = GaussianNoise(0.3, seed=7), GaussianNoise(0.3, seed=7)
    first, second = a(x).numpy(), a(x).numpy()
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, b(x).numpy())
    np.testing.assert_array_equal(second, b(x).numpy())
    assert not np.allclose(first, GaussianNoise(0.3, seed=8)(x).numpy())


def test_explicit_seed_is_stateless():
    layer = GaussianNoise(0.3, seed=0)
    x = tf.zeros([2, 5])
    seed = tf.constant([3, 4])
    state = layer.seed_generator.state.numpy().copy()
    np.testing.assert_array_equal(layer(x, seed=seed).numpy(), layer(x, seed=seed).numpy())
    np.testing.assert_array_equal(layer.seed_generator.state.numpy(), state)


def test_no_clipping_to_pixel_range():
    out = GaussianNoise(0.5, seed=0)(tf.ones([1000])).numpy()
    assert out.max() > 1.5 and out.min() < 0.5
    out = GaussianNoise(0.5, seed=0)(tf.zeros([1000])).numpy()
    assert out.min() < -0.5


def test_active_at_inference_and_inside_tf_function():
    layer = GaussianNoise(0.2, seed=3)
    model = keras.Sequential([keras.Input((6,)), layer])
    x = np.zeros((3, 6), np.float32)
    assert np.abs(model.predict(x, verbose=0)).max() > 0
    fn = tf.function(lambda v: layer(v, training=False))
    assert not np.allclose(fn(x).numpy(), fn(x).numpy())


def test_zero_stddev_is_identity():
    x = tf.random.uniform([2, 3])
    np.testing.assert_array_equal(GaussianNoise(0.0)(x).numpy(), x.numpy())


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_rejects_bad_stddev(bad):
    with pytest.raises(ValueError, match="stddev"):
        GaussianNoise(bad)


def test_config_and_saved_model_round_trip(tmp_path):
    layer = GaussianNoise(0.25, seed=5, name="noise")
    clone = GaussianNoise.from_config(layer.get_config())
    assert (clone.stddev, clone.seed, clone.name) == (0.25, 5, "noise")
    model = keras.Sequential([keras.Input((4,)), layer, keras.layers.Dense(2)])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[0], GaussianNoise)
    assert loaded.layers[0].stddev == 0.25


def test_saved_model_draws_on_where_it_stopped(tmp_path):
    x = tf.zeros([3, 4])
    model = keras.Sequential([keras.Input((4,)), GaussianNoise(0.5, seed=5)])
    model(x)
    model.save(tmp_path / "m.keras")
    expected = model(x).numpy()   # the draw after the saved state
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded(x).numpy(), expected)


def test_weights_saved_without_the_seed_state_still_load():
    layer = GaussianNoise(0.5, seed=5)
    layer.build((None, 4))
    state = layer.seed_generator.state.numpy()
    layer.load_own_variables({})   # what an earlier tfcert wrote: no generator state
    np.testing.assert_array_equal(layer.seed_generator.state.numpy(), state)


def test_one_replica_strategy_keeps_the_layer_sequence():
    """With a single replica there is nothing to decorrelate: the draws are unchanged."""
    x = tf.zeros([4, 5])
    expected = GaussianNoise(0.3, seed=2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        layer = GaussianNoise(0.3, seed=2)
    draw = tf.function(lambda: strategy.run(lambda: layer(x)))
    for _ in range(2):
        np.testing.assert_array_equal(draw().numpy(), expected(x).numpy())


TWO_CPUS = """
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""


def run_with_two_cpus(script: str, timeout: int = 600) -> dict:
    """Runs ``script`` with this checkout's tfcert in a fresh Python whose CPU is split
    into two logical devices (``two``: a MirroredStrategy over them; this must happen
    before TensorFlow initialises its devices, hence the new process); returns the JSON
    the script prints last."""
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", TWO_CPUS + textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_replicas_draw_independent_noise_unless_seeded():
    out = run_with_two_cpus("""
        import numpy as np
        from tfcert.layers import GaussianNoise
        with two.scope():
            layer = GaussianNoise(1.0, seed=3)
        x = tf.zeros([64, 8, 8, 1])
        seed = tf.constant([5, 6])
        fresh = tf.function(lambda: two.run(lambda: layer(x)))
        seeded = tf.function(lambda: two.run(lambda: layer(x, seed=seed)))
        a, b = [t.numpy().ravel() for t in two.experimental_local_results(fresh())]
        s0, s1 = [t.numpy() for t in two.experimental_local_results(seeded())]
        print(json.dumps({"corr": float(np.corrcoef(a, b)[0, 1]), "n": a.size,
                          "std": [float(a.std()), float(b.std())],
                          "seeded_equal": bool(np.array_equal(s0, s1)),
                          "seeded_as_one_device": bool(np.array_equal(
                              s0, GaussianNoise(1.0)(x, seed=seed).numpy()))}))
    """)
    # Independent N(0, 1) draws: the sample correlation of n pairs has standard deviation
    # 1/sqrt(n) (= 0.016 here); identical draws (the old behaviour) give exactly 1.
    assert abs(out["corr"]) < 5 / np.sqrt(out["n"])
    # Each replica's draw is still N(0, 1): sample std within 5 standard errors
    # (the std of a sample std is about 1/sqrt(2n)).
    assert all(abs(s - 1.0) < 5 / np.sqrt(2 * out["n"]) for s in out["std"])
    # An explicit seed is used as given on every replica, as on one device.
    assert out["seeded_equal"] and out["seeded_as_one_device"]
