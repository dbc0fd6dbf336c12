"""Tests of tfcert.adversarial_training (PGD adversarial training and TRADES) on digits."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcert import models
from tfcert.adversarial_training import AdversarialTrainingModel, TRADESModel, wrap
from tfcert.attacks import pgd

EPS = 0.1
EPOCHS = 12


def _compile(model: keras.Model) -> keras.Model:
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _fit(method: str, digits) -> tuple[keras.Model, keras.callbacks.History]:
    x, y = digits[:2]
    keras.utils.set_random_seed(0)
    base = models.small_cnn()
    model = base if method == "standard" else wrap(base, method, EPS, steps=5, seed=0)
    history = _compile(model).fit(x, y, epochs=EPOCHS, batch_size=64, verbose=0)
    return model, history


def _pgd_accuracy(base: keras.Model, digits) -> float:
    x, y = digits[2:]
    x_adv = pgd(base, x, y, EPS, steps=20, seed=1)
    return float(np.mean(np.argmax(base(x_adv), axis=1) == y))


@pytest.fixture(scope="module")
def trained(digits) -> dict[str, tuple[keras.Model, keras.callbacks.History]]:
    return {method: _fit(method, digits) for method in ("standard", "pgd", "trades")}


@pytest.mark.parametrize("method,extra_key", [("pgd", None), ("trades", "trades_loss")])
@pytest.mark.slow
def test_adversarial_training_raises_pgd_accuracy(digits, trained, method, extra_key):
    standard_pgd_accuracy = _pgd_accuracy(trained["standard"][0], digits)
    model, history = trained[method]
    keys = {"loss", "classification_loss", "accuracy"} | ({extra_key} if extra_key else set())
    assert keys <= set(history.history)
    x, y = digits[2:]
    assert np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y) > 0.9
    assert _pgd_accuracy(model.base_model, digits) > standard_pgd_accuracy + 0.2


def _one_step_weights(model: keras.Model, reference: keras.Model, x, y) -> None:
    """One optimizer step of ``model`` (a wrapper) equals one standard step of
    ``reference`` started from the same weights."""
    reference.set_weights(model.base_model.get_weights())
    _compile(model).train_on_batch(x, y)
    _compile(reference).train_on_batch(x, y)
    for got, want in zip(model.base_model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zero_radius_pgd_training_is_standard_training(digits):
    x, y = digits[:2]
    keras.utils.set_random_seed(0)
    _one_step_weights(AdversarialTrainingModel(models.small_cnn(), eps=0.0, steps=3),
                      models.small_cnn(), x[:64], y[:64])


def test_trades_with_zero_beta_is_standard_training(digits):
    x, y = digits[:2]
    keras.utils.set_random_seed(0)
    _one_step_weights(TRADESModel(models.small_cnn(), eps=EPS, beta=0.0, steps=3),
                      models.small_cnn(), x[:64], y[:64])


@pytest.mark.slow
def test_trades_attack_maximises_the_kl_in_the_ball(digits, trained):
    x_test = digits[2]
    model = trained["trades"][0]
    x_test = tf.constant(x_test[:100])
    clean = tf.nn.softmax(model(x_test))
    x_adv = model.attack(x_test, clean, loss=model.attack_loss)
    assert np.max(np.abs(x_adv - x_test)) <= EPS + 1e-6
    x_random = tf.clip_by_value(
        x_test + tf.random.stateless_uniform(x_test.shape, [0, 1], -EPS, EPS), 0.0, 1.0)
    kl = keras.losses.KLDivergence(reduction=None)
    attacked = kl(clean, tf.nn.softmax(model(x_adv))).numpy()
    random = kl(clean, tf.nn.softmax(model(x_random))).numpy()
    assert np.mean(attacked > random) > 0.9
    assert np.mean(attacked) > 3 * np.mean(random)


@pytest.mark.parametrize("cls,kwargs", [
    (AdversarialTrainingModel, {"eps": 0.2, "norm": "2", "steps": 3, "step_size": 0.1, "seed": 4}),
    (TRADESModel, {"eps": 0.05, "beta": 2.0, "steps": 4, "seed": 5}),
])
def test_save_and_load_round_trip(tmp_path, digits, cls, kwargs):
    x = digits[0]
    model = cls(models.small_cnn(), **kwargs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is cls
    for key, value in kwargs.items():
        assert getattr(loaded, key) == value
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0),
                               rtol=1e-6)


def test_wrap_rejects_bad_arguments():
    base = models.small_cnn()
    with pytest.raises(ValueError, match="method"):
        wrap(base, "fgsm", EPS)
    with pytest.raises(ValueError, match="norm"):
        wrap(base, "pgd", EPS, norm="1")
    with pytest.raises(ValueError, match="beta"):
        wrap(base, "trades", EPS, beta=-1.0)
    assert isinstance(wrap(base, "trades", EPS), TRADESModel)
