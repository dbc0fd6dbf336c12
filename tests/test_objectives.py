"""ConsistencyModel, MACERModel, SmoothAdvModel: losses by hand, learning, Keras integration."""

import keras
import numpy as np
import pytest
import scipy.special
import tensorflow as tf

from tfcert import models, training
from tfcert.layers import GaussianNoise

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# Float32 forward passes and reductions over at most a few thousand terms of size O(1):
# relative rounding error well below 1e-5, so 1e-4 leaves a wide margin and still
# catches any change of formula (those move the loss by far more than 1e-4).
RTOL = 1e-4

OBJECTIVES = {
    "consistency": lambda base, seed=0: training.ConsistencyModel(
        base, 0.25, num_noise_samples=2, lbd=10.0, eta=0.5, seed=seed),
    "macer": lambda base, seed=0: training.MACERModel(
        base, 0.25, num_noise_samples=4, lbd=12.0, gamma=8.0, beta=16.0, seed=seed),
    "smoothadv": lambda base, seed=0: training.SmoothAdvModel(
        base, 0.25, eps=0.25, steps=2, num_noise_samples=2, warmup_epochs=2, seed=seed),
}


def _base(seed=0):
    keras.utils.set_random_seed(seed)
    return models.small_cnn()


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _cross_entropy(labels, logits):
    """Per-row −log softmax(logits)[label]."""
    log_probs = np.log(_softmax(logits.astype(np.float64)))
    return -np.take_along_axis(log_probs, labels.reshape(-1, 1), axis=-1)[:, 0]


def _evaluate(model, x, y):
    """``evaluate`` on one batch (the model's first noise draw): the loss terms by name."""
    model.compile("sgd", LOSS)
    return model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)


def _noisy_logits(base, x, sigma, copies, seed):
    """Logits ``[copies, batch, k]`` of the first draw of ``GaussianNoise(sigma, seed)`` on
    the batch tiled ``copies`` times (the draw the objectives make on their first call)."""
    noisy = GaussianNoise(sigma, seed=seed)(np.tile(x, (copies, 1, 1, 1)))
    return base(noisy).numpy().astype(np.float64).reshape(copies, len(x), -1)


def test_consistency_loss_matches_hand_computation(digits):
    x, y = digits[0][:32], digits[1][:32]
    base, m = _base(), 3
    model = training.ConsistencyModel(base, 0.4, num_noise_samples=m, lbd=2.0, eta=0.7, seed=5)
    z = _noisy_logits(base, x, 0.4, m, seed=5)
    p = _softmax(z)
    p_mean = p.mean(0)
    kl = np.mean(np.sum(p_mean * (np.log(p_mean) - np.log(p)), axis=-1), axis=0)
    entropy = -np.sum(p_mean * np.log(p_mean), axis=-1)
    expected_ce = np.mean(_cross_entropy(np.tile(y, m), z.reshape(m * len(x), -1)))
    expected_reg = np.mean(2.0 * kl + 0.7 * entropy)
    result = _evaluate(model, x, y)
    np.testing.assert_allclose(result["classification_loss"], expected_ce, rtol=RTOL)
    np.testing.assert_allclose(result["consistency_loss"], expected_reg, rtol=RTOL)
    np.testing.assert_allclose(result["loss"], expected_ce + expected_reg, rtol=RTOL)


def test_macer_loss_matches_hand_computation(digits, digits_model):
    x, y = digits[2][:64], digits[3][:64]
    base, m, sigma, lbd, gamma, beta = keras.models.load_model(digits_model), 8, 0.5, 3.0, 2.0, 4.0
    model = training.MACERModel(base, sigma, num_noise_samples=m, lbd=lbd, gamma=gamma,
                                beta=beta, seed=7)
    z = _noisy_logits(base, x, sigma, m, seed=7)
    soft = _softmax(z).mean(0)
    expected_ce = np.mean(-np.log(soft[np.arange(len(y)), y]))
    soft_beta = _softmax(beta * z).mean(0)
    order = np.argsort(-soft_beta, axis=-1)
    top = np.take_along_axis(soft_beta, order[:, :2], axis=-1)
    with np.errstate(divide="ignore"):
        xi = scipy.special.ndtri(top[:, 0]) - scipy.special.ndtri(top[:, 1])
    active = (order[:, 0] == y) & (xi <= gamma)
    # The batch must exercise the hinge both ways: active examples, and correct ones
    # whose ξ exceeds γ (they must contribute 0).
    assert 0 < active.sum() < (order[:, 0] == y).sum()
    expected_reg = lbd * np.mean(np.where(active, sigma / 2 * (gamma - xi), 0.0))
    result = _evaluate(model, x, y)
    np.testing.assert_allclose(result["classification_loss"], expected_ce, rtol=RTOL)
    np.testing.assert_allclose(result["robustness_loss"], expected_reg, rtol=RTOL)


def test_macer_saturated_predictions_give_zero_hinge_and_finite_gradients(digits):
    x, y = digits[0][:16], digits[1][:16]
    # Logits of size ~1e3 and one draw: Ĝ_β is one-hot, so ξ = Φ⁻¹(1) − Φ⁻¹(0) = ∞.
    base = keras.Sequential([_base(), keras.layers.Rescaling(1e3)])
    model = training.MACERModel(base, 0.25, num_noise_samples=1, seed=0)
    with tf.GradientTape() as tape:
        _, robustness = model.training_outputs(x, y)
    grads = tape.gradient(robustness, model.trainable_weights)
    assert robustness.numpy() == 0.0
    assert all(np.all(np.isfinite(g.numpy())) for g in grads if g is not None)


def test_smoothadv_attack_is_one_normalised_projected_step(digits):
    x, y = digits[0][:16], digits[1][:16]
    base, m, eps = _base(), 2, 0.5
    model = training.SmoothAdvModel(base, 0.3, eps=eps, steps=1, num_noise_samples=m,
                                    warmup_epochs=1, seed=3)
    noise = GaussianNoise(0.3, seed=3)(tf.zeros([m * len(x), 8, 8, 1]))
    x_t = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x_t)
        probs = tf.nn.softmax(base(tf.tile(x_t, [m, 1, 1, 1]) + noise))
        mean = tf.reduce_mean(tf.reshape(probs, [m, len(x), -1]), axis=0)
        objective = -tf.reduce_sum(tf.math.log(tf.gather(mean, y, batch_dims=1)))
    g = tape.gradient(objective, x_t).numpy()
    norms = np.linalg.norm(g.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
    # One step of length 2ε/1 = 2ε along g/‖g‖, projected back to the ε-sphere, then clipped.
    expected = np.clip(x + eps * g / norms, 0.0, 1.0)
    np.testing.assert_allclose(model.attack(x, y, noise).numpy(), expected, atol=1e-5)


def test_smoothadv_attack_stays_in_the_ball_and_raises_the_smoothed_loss(digits, digits_model):
    x, y = digits[2][:32], digits[3][:32]
    base, m, eps = keras.models.load_model(digits_model), 4, 0.5
    model = training.SmoothAdvModel(base, 0.3, eps=eps, steps=5, num_noise_samples=m,
                                    warmup_epochs=1, seed=3)
    noise = GaussianNoise(0.3, seed=1)(tf.zeros([m * len(x), 8, 8, 1]))
    x_adv = model.attack(x, y, noise).numpy()
    delta = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
    assert delta.max() <= eps * (1 + 1e-5)  # float32 rounding of the projection
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0

    def smoothed_ce(images):
        probs = _softmax(base(np.tile(images, (m, 1, 1, 1)) + noise).numpy())
        return -np.log(probs.reshape(m, len(x), -1).mean(0)[np.arange(len(y)), y])

    # Normalised gradient ascent on the objective it is scored by, from x, on a trained
    # model: every example's smoothed loss goes up (here by 0.02 to 5 nats).
    before, after = smoothed_ce(x), smoothed_ce(x_adv)
    assert np.all(after > before)


def test_smoothadv_loss_is_the_compiled_loss_on_the_noisy_adversarial_copies(digits):
    x, y = digits[0][:16], digits[1][:16]
    base, m = _base(), 2
    model = training.SmoothAdvModel(base, 0.3, eps=0.5, steps=3, num_noise_samples=m,
                                    warmup_epochs=1, seed=9)
    noise = GaussianNoise(0.3, seed=9)(tf.zeros([m * len(x), 8, 8, 1]))  # the first draw
    x_adv = model.attack(x, y, noise)
    z = base(tf.tile(x_adv, [m, 1, 1, 1]) + noise).numpy()
    expected = np.mean(_cross_entropy(np.tile(y, m), z))
    result = _evaluate(model, x, y)
    np.testing.assert_allclose(result["loss"], expected, rtol=RTOL)
    assert "classification_loss" in result and len(result) == 2


def test_smoothadv_warms_up_epsilon_per_epoch(digits):
    x, y = digits[0][:64], digits[1][:64]
    model = training.SmoothAdvModel(_base(), 0.25, eps=0.4, steps=1, warmup_epochs=4, seed=0)
    assert model.eps_at(0) == pytest.approx(0.1) and model.eps_at(9) == pytest.approx(0.4)
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(float(model.current_eps.numpy())))
    model.compile("adam", LOSS)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[probe])
    np.testing.assert_allclose(seen, [0.1, 0.2, 0.3], rtol=1e-6)  # float32 storage of ε


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.slow
def test_a_small_model_learns_digits(digits, name):
    x_train, y_train, x_test, y_test = digits
    base = _base()
    model = OBJECTIVES[name](base)
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=6, verbose=0)
    noisy = GaussianNoise(0.25, seed=1)(x_test)
    accuracy = np.mean(np.argmax(base.predict(noisy, verbose=0), -1) == y_test)
    # 10 balanced classes: chance is 0.1.  With 360 test images the binomial standard
    # error is at most 0.027, so 0.6 is > 18 standard errors above chance: only a model
    # that learned passes (the three reach 0.86-0.89 here).
    assert accuracy > 0.6, accuracy


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.slow
def test_save_and_load_round_trip(digits, tmp_path, name):
    x, y = digits[0][:128], digits[1][:128]
    model = OBJECTIVES[name](_base(), seed=2)
    model.compile("adam", LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(model)
    config = {k: v for k, v in model.get_config().items() if k != "base_model"}
    assert {k: v for k, v in loaded.get_config().items() if k != "base_model"} == config
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    loaded.fit(x, y, epochs=1, verbose=0)  # training continues after loading


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_mixed_bfloat16_policy_trains(name):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = OBJECTIVES[name](_base())
        model.compile("adam", LOSS)
        rng = np.random.default_rng(0)
        x = rng.random((64, 8, 8, 1), np.float32)
        history = model.fit(x, rng.integers(0, 10, 64), verbose=0).history
        assert np.isfinite(history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_distribution_strategy_fit(digits, name):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = OBJECTIVES[name](_base())
        model.compile("adam", LOSS, metrics=["accuracy"])
    history = model.fit(digits[0][:256], digits[1][:256], batch_size=64, epochs=1,
                        verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_wrap_and_bad_arguments():
    base = _base()
    assert isinstance(training.wrap(base, "consistency", 0.5, lbd=5.0), training.ConsistencyModel)
    macer = training.wrap(base, "macer", 0.5, gamma=4.0)
    assert isinstance(macer, training.MACERModel) and macer.gamma == 4.0
    assert isinstance(training.wrap(base, "smoothadv", 0.5, eps=1.0), training.SmoothAdvModel)
    for bad in (lambda: training.ConsistencyModel(base, 0.5, num_noise_samples=0),
                lambda: training.ConsistencyModel(base, 0.5, lbd=-1.0),
                lambda: training.MACERModel(base, 0.5, gamma=0.0),
                lambda: training.SmoothAdvModel(base, 0.5, warmup_epochs=0)):
        with pytest.raises(ValueError):
            bad()
