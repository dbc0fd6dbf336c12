"""Every device of a machine: SmoothedClassifier(strategy=...) and training under
tf.distribute strategies and mixed precision (issue #13 item 3, issue #15).

Two logical CPU devices stand in for two GPUs.  TensorFlow fixes its devices when it
initialises, so the two-device checks run in one fresh Python process
(`test_noise.run_with_two_cpus`), which checks everything at once to pay for one
TensorFlow start-up.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_noise import run_with_two_cpus
from tfcert import devices, models, training
from tfcert.devices import policy_clone
from tfcert.layers import GaussianNoise
from tfcert.smoothing import SmoothedClassifier

TWO_DEVICE_CHECKS = """
import keras
import numpy as np
from tfcert import adversarial_training, data, devices, models, training
from tfcert.denoising import DenoiserModel
from tfcert.layers import GaussianNoise
from tfcert.sequential import StoppingRule, certify_sequential
from tfcert.smoothing import SmoothedClassifier

out = {}
x_train, y_train = data.load_arrays("digits", "train")
x_test = data.load_arrays("digits", "test")[0][:12]

# --- smoothing: votes on two replicas == votes on one device, same seed --------------
keras.utils.set_random_seed(0)
base = models.small_cnn()
base.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
base.fit(x_train, y_train, epochs=2, verbose=0)
with two.scope():
    in_scope = models.small_cnn()
in_scope.set_weights(base.get_weights())
# pass size 50 at 64 draws per noise block of 8x8 images: one block per pass, so 1,000
# draws of 12 images are 12 * 16 passes shared by the replicas; 37 draws from draw 5
# are 12 passes.
one = SmoothedClassifier(base, 10, GaussianNoise(0.5), batch_size=50)
cloned = SmoothedClassifier(base, 10, GaussianNoise(0.5), batch_size=50, strategy=two)
mirrored = SmoothedClassifier(in_scope, 10, GaussianNoise(0.5), batch_size=50, strategy=two)
out["clone_is_mirrored"] = type(cloned.inference_model.weights[0].value).__name__
out["in_scope_not_cloned"] = mirrored.inference_model is in_scope
equal = {}
for n, first in ((1, 0), (37, 5), (1000, 0)):
    reference = one.sample_counts(x_test, n, seed=4, first_draw=first)
    for name, sc in (("cloned", cloned), ("mirrored", mirrored)):
        equal[f"{name}_{n}_{first}"] = bool(np.array_equal(
            sc.sample_counts(x_test, n, seed=4, first_draw=first), reference))
bf16_one, bf16_two = (SmoothedClassifier(base, 10, GaussianNoise(0.5), batch_size=50,
                                         compute_dtype="bfloat16", strategy=s)
                      for s in (None, two))
out["bf16_clone_is_mirrored"] = type(bf16_two.inference_model.weights[0].value).__name__
equal["bfloat16"] = bool(np.array_equal(bf16_one.sample_counts(x_test, 200, seed=1),
                                        bf16_two.sample_counts(x_test, 200, seed=1)))
for statistics in ("simultaneous", "cohen"):
    a = one.certify(x_test, 500, alpha=0.01, statistics=statistics, seed=7,
                    bound=("renyi", "cohen"))
    b = cloned.certify(x_test, 500, alpha=0.01, statistics=statistics, seed=7,
                       bound=("renyi", "cohen"))
    equal[f"certify_{statistics}"] = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in (
        "counts", "prediction", "radius", "p1_lower", "p2_upper", "num_samples"))
equal["predict"] = bool(np.array_equal(one.predict(x_test, 300, seed=2),
                                       cloned.predict(x_test, 300, seed=2)))
rule = StoppingRule(0.3, "checkpoints")
a, b = (certify_sequential(sc, x_test, 2000, rule, alpha=0.01, seed=3) for sc in (one, cloned))
equal["sequential"] = bool(np.array_equal(a.counts, b.counts)
                           and np.array_equal(a.num_samples, b.num_samples))
out["equal"] = equal

# --- training: every objective, 2 steps on two replicas under mixed_float16 -----------
# (float16 compute, LossScaleOptimizer, replicated variables and all-reduced gradients in
# one fit: the float32 fit on replicas runs the same strategy code with plain Adam, and
# tests/test_training.py and test_objectives.py fit in float32 under a strategy.)
x, y = x_train[:64], y_train[:64]
OBJECTIVES = {
    "standard": lambda b: training.wrap(b, "standard"),
    "gaussian": lambda b: training.wrap(b, "gaussian", 0.25, seed=0),
    **{f"stn_{t}": (lambda t: lambda b: training.wrap(
        b, "stn", 0.25, 1.0, seed=0, stability_target=t))(t) for t in training.STABILITY_TARGETS},
    "consistency": lambda b: training.wrap(b, "consistency", 0.25, seed=0),
    "macer": lambda b: training.wrap(b, "macer", 0.25, seed=0, num_noise_samples=4),
    "smoothadv": lambda b: training.wrap(b, "smoothadv", 0.25, seed=0, steps=2),
    "pgd": lambda b: adversarial_training.wrap(b, "pgd", 0.1, steps=2, seed=0),
    "trades": lambda b: adversarial_training.wrap(b, "trades", 0.1, steps=2, seed=0),
    # denoised smoothing: a DnCNN trained for the frozen classifier b
    "denoiser_stab_mse": lambda b: DenoiserModel(models.dncnn((8, 8, 1), depth=3, filters=8),
                                                 0.25, "stab_mse", classifier=b, mse_steps=1,
                                                 seed=0),
}
fits = {}
devices.set_precision("mixed_float16")
for name, make in OBJECTIVES.items():
    with two.scope():
        keras.utils.set_random_seed(0)
        model = make(models.small_cnn())
        model.compile("adam", None if isinstance(model, DenoiserModel)  # its own objective
                      else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = [w.numpy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history  # 2 steps
    fits[name] = {"losses": [float(v[0]) for k, v in history.items() if k.endswith("loss")],
                  "logits": model(x[:2]).dtype.name,
                  "optimizer": type(model.optimizer).__name__,
                  "policy": model.dtype_policy.name,
                  "steps": int(model.optimizer.iterations.numpy()),
                  "moved": any(not np.array_equal(w.numpy(), v)
                               for w, v in zip(model.trainable_weights, start))}
devices.set_precision("float32")
out["fits"] = fits

# --- training randomness: per replica different, reproducible with the seed ----------
same = two.experimental_distribute_values_from_function(lambda ctx: tf.constant(x[:16]))
labels = two.experimental_distribute_values_from_function(lambda ctx: tf.constant(y[:16]))
draws = {}
for name, draw in (("noise", lambda m, v, t: m.noise(v) - v),
                   ("pgd_start", lambda m, v, t: m.attack(v, t) - v)):
    runs = []
    for _ in range(2):  # two models built from the same seed
        with two.scope():
            keras.utils.set_random_seed(0)  # the same weights: PGD's steps depend on them
            model = OBJECTIVES["gaussian" if name == "noise" else "pgd"](models.small_cnn())
        step = tf.function(lambda: two.run(lambda v, t: draw(model, v, t), args=(same, labels)))
        runs.append([r.numpy() for r in two.experimental_local_results(step())])
    draws[name] = {"replicas_differ": not np.array_equal(*runs[0]),
                   "reproducible": all(np.array_equal(a, b) for a, b in zip(*runs))}
out["draws"] = draws
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def two_devices():
    return run_with_two_cpus(TWO_DEVICE_CHECKS)


@pytest.mark.slow
def test_smoothed_votes_on_two_replicas_equal_one_device(two_devices):
    # Replica r runs passes r, r + 2, ... of the one-device loop, each on the same
    # inputs, and the int64 votes are summed: exact equality, no tolerance.
    assert two_devices["equal"] == {key: True for key in two_devices["equal"]}
    assert two_devices["clone_is_mirrored"] == two_devices["bf16_clone_is_mirrored"] == (
        "MirroredVariable")
    assert two_devices["in_scope_not_cloned"]


@pytest.mark.slow
def test_every_objective_fits_on_two_replicas_under_mixed_float16(two_devices):
    fits = two_devices["fits"]
    assert sorted(fits) == sorted(["standard", "gaussian", "stn_paper", "stn_stop_gradient",
                                   "stn_stn_code", "consistency", "macer", "smoothadv", "pgd",
                                   "trades", "denoiser_stab_mse"])
    for name, fit in fits.items():
        assert all(np.isfinite(fit["losses"])) and fit["losses"], (name, fit)
        assert fit["logits"] == "float32", (name, fit)  # the models' logits layer is float32
        assert fit["policy"] == "mixed_float16", (name, fit)
        assert fit["optimizer"] == "LossScaleOptimizer", (name, fit)  # added by compile
        assert fit["steps"] == 2, (name, fit)  # 64 examples, global batch 32
        assert fit["moved"], (name, fit)  # the weights were updated, not only skipped steps


@pytest.mark.slow
def test_replicas_draw_different_reproducible_training_randomness(two_devices):
    assert two_devices["draws"] == {name: {"replicas_differ": True, "reproducible": True}
                                    for name in ("noise", "pgd_start")}


def test_make_strategy_names_and_errors(monkeypatch):
    assert devices.make_strategy("default") is tf.distribute.get_strategy()
    mirrored = devices.make_strategy("mirrored")  # every GPU, else the CPU
    assert mirrored.num_replicas_in_sync == max(1, len(tf.config.list_physical_devices("GPU")))
    with pytest.raises(ValueError, match="unknown strategy 'tpu'"):
        devices.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        devices.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(ValueError, match="not valid JSON"):
        devices.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"chief": ["a:1"]}}')
    with pytest.raises(ValueError, match='"worker" list'):
        devices.make_strategy("multi_worker")


def test_set_precision_returns_the_previous_policy():
    assert devices.set_precision("mixed_bfloat16") == "float32"
    try:
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        assert devices.set_precision("float32") == "mixed_bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        devices.set_precision("float16")


def test_strategy_argument_is_checked():
    with pytest.raises(TypeError, match="tf.distribute.Strategy"):
        SmoothedClassifier(models.small_cnn(), 10, GaussianNoise(0.5), strategy="mirrored")
    model = models.small_cnn()
    one = SmoothedClassifier(model, 10, GaussianNoise(0.5), strategy=tf.distribute.get_strategy())
    assert one.inference_model is model  # the default strategy's variables are its own
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(one.sample_counts(x, 70, seed=1).sum(axis=1), 70)

    class Subclassed(keras.Model):  # no get_config for its argument: Keras cannot clone it
        def __init__(self, units):
            super().__init__()
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return self.dense(keras.ops.reshape(x, (-1, 64)))

    subclassed = Subclassed(10)
    subclassed(x)  # creates its weights
    with pytest.raises(ValueError, match=r"built under strategy.scope\(\)"):
        SmoothedClassifier(subclassed, 10, GaussianNoise(0.5),
                           strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))


def test_float32_clone_of_a_mixed_float16_model():
    previous = devices.set_precision("mixed_float16")
    try:
        trained = models.small_cnn()
    finally:
        devices.set_precision(previous)
    assert trained.layers[0].dtype_policy.name == "mixed_float16"
    assert trained.layers[-1].dtype_policy.name == "float32"  # the logits layer
    clone = policy_clone(trained, "float32")
    assert {layer.dtype_policy.name for layer in clone.layers} == {"float32"}
    for a, b in zip(clone.weights, trained.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
