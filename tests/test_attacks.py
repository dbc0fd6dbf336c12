"""Tests of tfcert.attacks on scikit-learn digits with small CNNs trained in the module."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcert import data, models
from tfcert.keys import draw_keys, run_key
from tfcert.attacks import (KeyedDefense, boundary_attack, carlini_wagner_l2, loss_and_gradient,
                            margin, pgd, transfer_attack)
from tfcert.layers import (PAPER_SETTINGS, GaussianNoise, RandomizedDiscretization,
                           RandomizedMixture)

NUM_TEST = 120


def _train(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x, y = data.load_arrays("digits", "train")
    model = models.small_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=12, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _train(0)


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    x, y = data.load_arrays("digits", "test")
    return x[:NUM_TEST], y[:NUM_TEST]


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model(x), axis=1) == y))


def _distances(x, x_adv, order) -> np.ndarray:
    delta = (np.asarray(x_adv) - np.asarray(x)).reshape(len(x), -1)
    return np.linalg.norm(delta, ord=order, axis=1)


def _assert_in_box(x_adv):
    assert np.all(np.isfinite(x_adv)) and np.min(x_adv) >= 0.0 and np.max(x_adv) <= 1.0


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.7)])
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box(model, test_set, norm, eps, loss, random_start):
    x, y = test_set
    x_adv = pgd(model, x, y, eps, norm=norm, steps=10, loss=loss, random_start=random_start,
                seed=0).numpy()
    _assert_in_box(x_adv)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    distances = _distances(x, x_adv, np.inf if norm == "inf" else 2)
    assert np.all(distances <= eps * (1 + 1e-5))
    assert np.mean(distances) > 0.5 * eps   # it does move


@pytest.mark.parametrize("norm,eps", [("inf", 0.2), ("2", 2.0)])
def test_pgd_breaks_an_undefended_model(model, test_set, norm, eps):
    x, y = test_set
    assert _accuracy(model, x, y) > 0.9
    x_adv = pgd(model, x, y, eps, norm=norm, steps=20, seed=0)
    assert _accuracy(model, x_adv, y) < 0.05


def test_pgd_is_reproducible_with_a_seed(model, test_set):
    x, y = test_set
    first, second = (pgd(model, x, y, 0.1, steps=3, seed=7).numpy() for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, pgd(model, x, y, 0.1, steps=3, seed=8).numpy())


def _noisy(model, sigma: float, seed: int = 3) -> tuple[keras.Model, GaussianNoise]:
    noise = GaussianNoise(sigma, seed=seed)
    return keras.Sequential([noise, model]), noise


def _direct_eot_gradient(model, noise, x, y, samples):
    """−log mean_s softmax(f(x + r_s))_y and its gradient, one draw at a time, with the
    noise the layer draws for the tiled batch (its generator state rewound)."""
    x = tf.constant(x)
    draws = tf.reshape(noise(tf.tile(x, [samples, 1, 1, 1])) - tf.tile(x, [samples, 1, 1, 1]),
                       [samples, *x.shape])
    with tf.GradientTape() as tape:
        tape.watch(x)
        probs = tf.add_n([tf.nn.softmax(model(x + draws[s])) for s in range(samples)]) / samples
        losses = -tf.math.log(tf.gather(probs, y, batch_dims=1))
    return losses.numpy(), tape.gradient(losses, x).numpy()


def test_eot_gradient_is_the_gradient_of_the_mean_probability(model, test_set):
    x, y = test_set[0][:16], test_set[1][:16]
    noisy, noise = _noisy(model, 0.3)
    samples = 8
    state = noise.seed_generator.state.numpy()
    values, grad = loss_and_gradient(noisy, tf.constant(x), tf.constant(y), "ce", samples)
    noise.seed_generator.state.assign(state)
    expected_values, expected_grad = _direct_eot_gradient(model, noise, x, y, samples)
    np.testing.assert_allclose(values.numpy(), expected_values, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-3, atol=1e-5)


def test_pgd_steps_along_the_eot_gradient(model, test_set):
    x, y = test_set[0][:16], test_set[1][:16]
    noisy, noise = _noisy(model, 0.3)
    state = noise.seed_generator.state.numpy()
    x_adv = pgd(noisy, x, y, eps=10.0, norm="2", steps=1, step_size=0.5, eot_samples=4,
                random_start=False).numpy()
    noise.seed_generator.state.assign(state)
    losses, grad = _direct_eot_gradient(model, noise, x, y, 4)
    step = grad / np.linalg.norm(grad.reshape(16, -1), axis=1)[:, None, None, None]
    # On examples predicted with p_y ≈ 1 − 1e-4 the float32 gradient is round-off: skip them.
    conditioned = losses > 1e-2
    assert conditioned.sum() >= 8
    np.testing.assert_allclose(x_adv[conditioned],
                               np.clip(x + 0.5 * step, 0.0, 1.0)[conditioned], atol=1e-5)


def test_eot_pgd_defeats_weak_gaussian_randomization(model, test_set):
    x, y = test_set
    noisy, _ = _noisy(model, 0.05)
    before = _accuracy(noisy, x, y)
    x_adv = pgd(noisy, x, y, 0.2, steps=20, eot_samples=4, seed=0)
    assert np.max(_distances(x, x_adv, np.inf)) <= 0.2 + 1e-6
    assert before > 0.85 and _accuracy(noisy, x_adv, y) < 0.15


def test_carlini_wagner_finds_small_perturbations(model, test_set):
    x, y = test_set
    correct = np.argmax(model(x), axis=1) == y
    x_adv = carlini_wagner_l2(model, x, y).numpy()
    _assert_in_box(x_adv)
    distances = _distances(x, x_adv, 2)[correct]
    found = (margin(y, model(x_adv)).numpy() < 0)[correct]
    assert found.mean() > 0.95
    # PGD-ℓ2 needs a budget of about 1.0 to break ~95% of this model's predictions
    # (test above: 2.0 breaks all); C&W's minimal perturbations are well inside it.
    pgd_accuracy = _accuracy(model, pgd(model, x, y, 1.0, norm="2", steps=20, seed=0), y)
    assert pgd_accuracy < 0.15
    assert np.median(distances[found]) < 0.7


def test_carlini_wagner_confidence_costs_distance(model, test_set):
    x, y = test_set[0][:40], test_set[1][:40]
    plain = carlini_wagner_l2(model, x, y, confidence=0.0)
    confident = carlini_wagner_l2(model, x, y, confidence=5.0)
    margins = margin(y, model(confident)).numpy()
    found = margins < -5.0 + 1e-4
    assert found.mean() > 0.9
    assert np.median(_distances(x, confident, 2)[found]) > np.median(_distances(x, plain, 2)[found])


def test_carlini_wagner_returns_the_original_when_it_fails(model, test_set):
    x, y = test_set[0][:10], test_set[1][:10]
    correct = np.argmax(model(x), axis=1) == y
    x_adv = carlini_wagner_l2(model, x, y, initial_const=1e-6, binary_search_steps=1,
                              steps=5).numpy()
    np.testing.assert_array_equal(x_adv[correct], x[correct])


@pytest.mark.slow
def test_boundary_attack_walks_towards_the_input(model, test_set):
    x, y = test_set[0][:60], test_set[1][:60]
    correct = np.argmax(model(x), axis=1) == y
    start = boundary_attack(model, x, y, steps=0, seed=0).numpy()
    walked = boundary_attack(model, x, y, steps=150, seed=0).numpy()
    np.testing.assert_array_equal(walked, boundary_attack(model, x, y, steps=150, seed=0).numpy())
    for x_adv in (start, walked):
        _assert_in_box(x_adv)
        assert np.mean(np.argmax(model(x_adv), axis=1)[correct] != y[correct]) > 0.97
    before, after = _distances(x, start, 2)[correct], _distances(x, walked, 2)[correct]
    assert np.all(after <= before + 1e-5)
    assert np.mean(after) < 0.4 * np.mean(before)
    np.testing.assert_array_equal(walked[~correct], x[~correct])


@pytest.mark.slow
def test_transfer_attack_evaluates_the_target_on_source_examples(model, test_set):
    x, y = test_set
    target = _train(1)
    x_adv, predictions = transfer_attack(model, target, x, y, eps=0.2, steps=20, seed=0)
    assert np.max(_distances(x, x_adv, np.inf)) <= 0.2 + 1e-6
    np.testing.assert_array_equal(predictions.numpy(), np.argmax(target(x_adv), axis=1))
    transferred = np.mean(predictions.numpy() == y)
    assert transferred < _accuracy(target, x, y) - 0.3
    # a black-box attack is weaker than attacking the target itself
    assert transferred > _accuracy(target, pgd(target, x, y, 0.2, steps=20, seed=0), y)


@pytest.mark.parametrize("kwargs", [{"norm": "1"}, {"loss": "kl"}, {"eot_samples": 0}])
def test_pgd_rejects_bad_arguments(model, test_set, kwargs):
    with pytest.raises(ValueError):
        pgd(model, test_set[0][:2], test_set[1][:2], 0.1, **kwargs)


@pytest.mark.parametrize("attack, kwargs, name", [
    (pgd, {"eps": float("inf"), "norm": "2"}, "eps"),
    (pgd, {"eps": float("inf")}, "eps"),
    (pgd, {"eps": np.float32("nan")}, "eps"),
    (pgd, {"eps": 0.1, "step_size": float("inf")}, "step_size"),
    (pgd, {"eps": 0.1, "step_size": float("nan")}, "step_size"),
    (pgd, {"eps": 0.1, "loss": "cw", "confidence": float("inf")}, "confidence"),
    (carlini_wagner_l2, {"confidence": float("nan")}, "confidence"),
    (carlini_wagner_l2, {"initial_const": float("inf")}, "initial_const"),
    (carlini_wagner_l2, {"learning_rate": float("nan")}, "learning_rate"),
    (boundary_attack, {"spherical_step": float("inf")}, "spherical_step"),
    (boundary_attack, {"step_adaptation": float("inf")}, "step_adaptation"),
])
def test_non_finite_arguments_are_refused_by_name(test_set, attack, kwargs, name):
    """Issue 25: PGD attacked an infinite ℓ2 ball (random start ±inf, every image lost)."""
    untrained = models.small_cnn()  # never called: the check comes first
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        attack(untrained, test_set[0][:2], test_set[1][:2], steps=1, **kwargs)


@pytest.mark.parametrize("layer", [RandomizedDiscretization, RandomizedMixture])
def test_eot_pgd_moves_through_randomized_discretization(model, test_set, layer):
    """BPDA: RandDisc's straight-through gradient is RandMix's; both defenses fall."""
    x, y = test_set
    defense = keras.Sequential([layer(**PAPER_SETTINGS["mnist"], seed=0), model])
    _, grad = loss_and_gradient(defense, tf.constant(x), tf.constant(y), "ce", 4)
    assert np.all(np.isfinite(grad)) and np.mean(np.abs(grad.numpy()) > 0) > 0.5
    before = _accuracy(defense, x, y)
    x_adv = pgd(defense, x, y, 0.3, steps=20, eot_samples=4, seed=0)
    assert np.max(_distances(x, x_adv, np.inf)) <= 0.3 + 1e-6
    assert _accuracy(defense, x_adv, y) < before - 0.3


PER_EXAMPLE_ATTACKS = {
    "pgd_linf": lambda m, x, y, keys: pgd(m, x, y, 0.1, steps=3, eot_samples=3, seed=keys),
    "pgd_l2": lambda m, x, y, keys: pgd(m, x, y, 0.7, norm="2", steps=3, eot_samples=3,
                                        seed=keys),
    "cw_l2": lambda m, x, y, keys: carlini_wagner_l2(m, x, y, steps=4, binary_search_steps=2,
                                                     eot_samples=3, seed=keys),
    "boundary": lambda m, x, y, keys: boundary_attack(m, x, y, steps=5, trials=3, seed=keys),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE_ATTACKS))
@pytest.mark.parametrize("layer", [lambda: GaussianNoise(0.2),
                                   lambda: RandomizedDiscretization(**PAPER_SETTINGS["mnist"])],
                         ids=["gaussian", "randdisc"])
@pytest.mark.slow
def test_keyed_attacks_do_not_depend_on_the_batch(model, test_set, name, layer):
    """With per-example keys (the examples' dataset indices) an example's adversarial image
    is the same attacked in one batch of 10 or in batches of 4, 4 and 2."""
    x, y = test_set[0][:10], test_set[1][:10]
    defense = KeyedDefense(model, layer())
    keys = draw_keys(run_key(5), 0, np.arange(100, 110))
    attack = PER_EXAMPLE_ATTACKS[name]
    whole = attack(defense, x, y, keys).numpy()
    parts = np.concatenate([attack(defense, x[s:s + 4], y[s:s + 4], keys[s:s + 4]).numpy()
                            for s in range(0, 10, 4)])
    # The model's float32 outputs for an example may differ in the last bits between batch
    # sizes (the CPU kernels depend on the batch); 1e-5 is ~170 float32 ulps at 1 (2^-23
    # each), far below any attack step (a different draw moves pixels by ~0.01-0.1).
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)
    other = draw_keys(run_key(6), 0, np.arange(100, 110))
    assert np.max(np.abs(attack(defense, x, y, other).numpy() - whole)) > 1e-3  # keys matter


def test_keyed_defense_draws_a_group_per_key(model, test_set):
    """`KeyedDefense.group_logits`: example b's draws depend on (keys[b], draw) only, and
    unkeyed calls use the layer's generator."""
    x = tf.constant(test_set[0][:3])
    defense = KeyedDefense(model, GaussianNoise(0.3))
    keys = draw_keys(run_key(0), 0, np.arange(3))
    groups = tf.repeat(x[:, None], 4, axis=1)
    logits = defense.group_logits(groups, keys, 7).numpy()
    assert logits.shape == (3, 4, 10)
    # float32 outputs may differ in the last bits between batch sizes: rtol 1e-5 ≈ 80 ulps
    np.testing.assert_allclose(defense.group_logits(groups[1:2], keys[1:2], 7), logits[1:2],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 0], logits[:, 1])  # each input of a group its own draw
    assert not np.allclose(logits, defense.group_logits(groups, keys, 8).numpy())
    assert defense(x).shape == (3, 10)
