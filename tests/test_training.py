"""StabilityModel / GaussianAugmentationModel: the objective, its gradient, and Keras integration."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_noise import run_with_two_cpus
from tfcert import adversarial_training, models, training
from tfcert.layers import GaussianNoise

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _base(seed=0):
    keras.utils.set_random_seed(seed)
    return models.small_cnn()


def _one_step(model, x, y):
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return [w.numpy() for w in model.trainable_weights]


def test_stability_term_is_the_paper_formula(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = training.StabilityModel(_base(), sigma=0.4, gamma=2.0, seed=11)
    logits, regularizer = model.training_outputs(x, y, training=False)
    noisy = model.base_model(GaussianNoise(0.4, seed=11)(x))  # the same first draw
    p_clean = tf.nn.softmax(model.base_model(x)).numpy()
    log_p_noisy = tf.nn.log_softmax(noisy).numpy()
    expected = 2.0 * np.mean(-np.sum(p_clean * log_p_noisy, axis=1))
    np.testing.assert_allclose(regularizer.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(logits.numpy(), model.base_model(x).numpy(), rtol=1e-6)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("target", ["paper", "stop_gradient", "stn_code"])
def test_stability_target_value_and_gradient_match_hand_computation(digits, target):
    """On a linear base model z = W·x: the value and the weight gradient of γ·L_stability."""
    x, y = digits[0][:16], digits[1][:16]
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10, use_bias=False)])
    model = training.StabilityModel(base, 0.4, gamma=2.0, stability_target=target, seed=11)
    kernel = base.trainable_weights[0]
    with tf.GradientTape() as tape:
        _, regularizer = model.training_outputs(x, y)
    grad = tape.gradient(regularizer, kernel).numpy()

    w = kernel.numpy().astype(np.float64)
    xs = x.reshape(len(x), -1).astype(np.float64)
    xn = GaussianNoise(0.4, seed=11)(x).numpy().reshape(len(x), -1)  # the same first draw
    z, zn = xs @ w, xn @ w
    p, q = _softmax(z), _softmax(zn)
    target_values = z if target == "stn_code" else p
    value = 2.0 * np.mean(-np.sum(target_values * np.log(q), axis=1))
    # d/dz' of the TF kernel: softmax(z') − labels (the labels are constants except for
    # "paper"); for "stn_code" the labels are the raw clean logits.
    noisy_part = xn.T @ (q - target_values)
    clean_part = 0.0
    if target == "paper":  # d/dz of −Σ_j p_j log q_j through p = softmax(z)
        minus_log_q = -np.log(q)
        clean_part = xs.T @ (p * (minus_log_q - np.sum(p * minus_log_q, 1, keepdims=True)))
    expected_grad = 2.0 / len(x) * (noisy_part + clean_part)
    # float32 forward and backward passes over 64 inputs x 16 images: relative rounding
    # error well below 1e-5; a different formula or gradient path moves far more.
    np.testing.assert_allclose(regularizer.numpy(), value, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    if target == "stn_code":
        # The kernel's gradient is not the derivative of the value when the labels do
        # not sum to 1 (the derivative would be softmax(z')·Σ_j z_j − z): STN's code
        # followed this gradient, and so does "stn_code".
        derivative = 2.0 / len(x) * xn.T @ (q * z.sum(1, keepdims=True) - z)
        assert np.abs(grad - derivative).max() > 1e-2


def test_gamma_zero_is_standard_training_and_gamma_changes_the_gradient(digits):
    x, y = digits[0][:64], digits[1][:64]
    standard = _one_step(_base(), x, y)
    gamma0 = _one_step(training.StabilityModel(_base(), 0.5, gamma=0.0, seed=1), x, y)
    gamma1 = _one_step(training.StabilityModel(_base(), 0.5, gamma=1.0, seed=1), x, y)
    for a, b in zip(standard, gamma0):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(standard, gamma1)) > 1e-4


def test_history_reports_total_classification_and_stability_loss(digits):
    x, y = digits[0], digits[1]
    model = training.StabilityModel(_base(), 0.3, gamma=1.0, seed=0)
    model.compile("adam", LOSS, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=128, epochs=2, verbose=0,
                        validation_data=(digits[2], digits[3])).history
    assert {"loss", "classification_loss", "stability_loss", "accuracy",
            "val_loss", "val_stability_loss", "val_accuracy"} <= set(history)
    np.testing.assert_allclose(history["loss"],
                               np.add(history["classification_loss"], history["stability_loss"]),
                               rtol=1e-4)
    assert history["loss"][1] < history["loss"][0]
    assert all(v > 0 for v in history["stability_loss"])


def test_gaussian_augmentation_trains_on_noisy_inputs(digits):
    x, y = digits[0][:16], digits[1][:16]
    model = training.GaussianAugmentationModel(_base(), 0.5, seed=4)
    logits, regularizer = model.training_outputs(x, y, training=False)
    expected = model.base_model(GaussianNoise(0.5, seed=4)(x)).numpy()
    assert regularizer is None
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-6)
    model.compile("adam", LOSS)
    assert "stability_loss" not in model.fit(x, y, verbose=0).history


def test_save_and_load_round_trip(digits, tmp_path):
    x, y = digits[0][:256], digits[1][:256]
    model = training.StabilityModel(_base(), 0.3, gamma=0.5, seed=2)
    model.compile("adam", LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "stn.keras")
    loaded = keras.models.load_model(tmp_path / "stn.keras")
    assert isinstance(loaded, training.StabilityModel)
    assert (loaded.sigma, loaded.gamma, loaded.seed) == (0.3, 0.5, 2)
    assert loaded.stability_target == model.stability_target == "stop_gradient"
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    loaded.fit(x, y, epochs=1, verbose=0)  # training continues after loading


def test_mixed_bfloat16_policy_trains():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = training.StabilityModel(_base(), 0.3, gamma=1.0, seed=0)
        model.compile("adam", LOSS)
        rng = np.random.default_rng(0)
        x = rng.random((64, 8, 8, 1), np.float32)
        loss = model.fit(x, rng.integers(0, 10, 64), verbose=0).history["loss"][0]
        assert np.isfinite(loss)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_distribution_strategy_fit(digits):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = training.StabilityModel(_base(), 0.3, gamma=1.0, seed=0)
        model.compile("adam", LOSS, metrics=["accuracy"])
    history = model.fit(digits[0], digits[1], batch_size=128, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["stability_loss"][0] > 0


def test_wrap_selects_the_method():
    base = _base()
    assert training.wrap(base, "standard") is base
    assert isinstance(training.wrap(base, "gaussian", 0.5), training.GaussianAugmentationModel)
    assert isinstance(training.wrap(base, "stn", 0.5, 1.0), training.StabilityModel)
    with pytest.raises(ValueError, match="unknown training method"):
        training.wrap(base, "magic")
    stn_code = training.wrap(base, "stn", 0.5, 2.0, stability_target="stn_code")
    assert (stn_code.gamma, stn_code.stability_target) == (2.0, "stn_code")
    with pytest.raises(ValueError, match="gamma"):
        training.StabilityModel(base, 0.5, gamma=-1.0)
    with pytest.raises(ValueError, match="stability_target"):
        training.StabilityModel(base, 0.5, stability_target="both")


@pytest.mark.slow
def test_two_replicas_draw_different_noise_and_train_like_one_device():
    out = run_with_two_cpus("""
        import keras
        import numpy as np
        from tfcert import data, models, training

        x, y = data.load_arrays("digits", "train")
        x, y = x[:64], y[:64]
        out = {}

        # (1) The same 32 images on both replicas: their training noise must differ.
        with two.scope():
            keras.utils.set_random_seed(0)
            model = training.StabilityModel(models.small_cnn(), 0.5, seed=3)
        same = two.experimental_distribute_values_from_function(lambda ctx: tf.constant(x[:32]))
        labels = two.experimental_distribute_values_from_function(lambda ctx: tf.constant(y[:32]))
        noise = tf.function(lambda: two.run(lambda v: model.noise(v) - v, args=(same,)))
        stability = tf.function(lambda: two.run(
            lambda v, t: model.training_outputs(v, t)[1], args=(same, labels)))
        a, b = [t.numpy().ravel() for t in two.experimental_local_results(noise())]
        out["noise_corr"], out["n"] = float(np.corrcoef(a, b)[0, 1]), a.size
        out["stability"] = [float(t) for t in two.experimental_local_results(stability())]

        # (2) One SGD step from the same (briefly trained) weights, on one device and on
        # two replicas; `fit` splits each batch of 64 into 32 per replica.
        keras.utils.set_random_seed(1)
        trained = models.small_cnn()
        trained.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trained.fit(*data.load_arrays("digits", "train"), epochs=2, verbose=0)
        start = [w.numpy() for w in trained.trainable_weights]
        direction = np.random.default_rng(0).normal(size=sum(w.size for w in start))

        def steps(strategy, sigma, count):
            # Losses and weight updates of `count` steps, each from `start`.
            with strategy.scope():
                model = training.StabilityModel(models.small_cnn(), sigma, seed=5)
                model.compile(keras.optimizers.SGD(0.1),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            running, deltas = [], []  # running mean of the epoch's loss after each step

            def reset():
                for w, v in zip(model.trainable_weights, start):
                    w.assign(v)

            def record_and_reset(batch, logs):
                running.append(logs["loss"])
                deltas.append(np.concatenate([(w.numpy() - v).ravel()
                                              for w, v in zip(model.trainable_weights, start)]))
                reset()

            reset()
            probe = keras.callbacks.LambdaCallback(on_train_batch_end=record_and_reset)
            model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(count), verbose=0,
                      callbacks=[probe])
            k = np.arange(1, count + 1)
            losses = k * np.array(running) - (k - 1) * np.concatenate([[0.0], running[:-1]])
            return losses.tolist(), [float(direction @ d) for d in deltas], deltas[-1].tolist()

        one = tf.distribute.get_strategy()
        for name, strategy in (("one", one), ("two", two)):
            losses, moves, _ = steps(strategy, 0.5, 100)
            out[name] = {"losses": losses, "moves": moves}
            out[name + "_deterministic"] = steps(strategy, 0.0, 1)[2]
        print(json.dumps(out))
    """)
    # (1) Independent draws: sample correlation ~ N(0, 1/n) (sd 0.018 here); the old
    # code gave both replicas the same draw (correlation 1, equal stability terms).
    assert abs(out["noise_corr"]) < 5 / np.sqrt(out["n"])
    assert out["stability"][0] != out["stability"][1]
    # (2) With σ = 0 the step is deterministic: two replicas (half batch each, summed
    # gradients) give one device's step up to float32 summation order (measured 3e-8
    # on updates of size <= 0.03).
    np.testing.assert_allclose(out["two_deterministic"], out["one_deterministic"], atol=1e-5)
    # With noise, the loss and the update (projected on a fixed random direction) over
    # 100 independent steps have the same mean: a two-sample z-test at 4 standard errors
    # (false alarm probability ~6e-5 per check under the normal approximation).
    for key in ("losses", "moves"):
        one, two = np.array(out["one"][key]), np.array(out["two"][key])
        se = np.sqrt(one.var(ddof=1) / len(one) + two.var(ddof=1) / len(two))
        assert abs(one.mean() - two.mean()) < 4 * se, (key, one.mean(), two.mean(), se)


def _stop_epoch(callback: keras.callbacks.EarlyStopping, curve: np.ndarray, start: int = 0):
    """The epoch at which ``callback`` stops a run of the monitored ``curve`` resumed at
    ``start`` (None: it never stops), driven as ``fit`` drives it."""
    model = types.SimpleNamespace(stop_training=False)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch in range(start, len(curve)):
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {"val_acc": float(curve[epoch])})
        if model.stop_training:
            return epoch
    return None


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_resumed_early_stopping_stops_where_an_uninterrupted_run_stops(patience):
    rng = np.random.default_rng(patience)
    for _ in range(50):
        # Validation curves with plateaus and ties (values on a grid of 0.01).
        curve = np.round(np.cumsum(rng.normal(0.0, 0.03, 15)) + 0.5, 2)
        flags = dict(monitor="val_acc", mode="max", patience=patience)
        uninterrupted = _stop_epoch(keras.callbacks.EarlyStopping(**flags), curve)
        last = len(curve) - 1 if uninterrupted is None else uninterrupted
        for start in range(1, last + 1):
            resumed = training.ResumableEarlyStopping(lambda epoch: curve[:epoch], **flags)
            assert _stop_epoch(resumed, curve, start) == uninterrupted, (curve, start)


def test_resumed_early_stopping_refuses_to_restore_best_weights():
    with pytest.raises(ValueError, match="ModelCheckpoint"):
        training.ResumableEarlyStopping(lambda epoch: [], restore_best_weights=True)


class _Interrupt(keras.callbacks.Callback):
    """Stops ``fit`` at the start of epoch ``at``, as a kill between two epochs would."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt


def _fit_with_backup(backup_dir, epochs=4, interrupt_at=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.01), LOSS)
    x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int64)
    callbacks = [training.SafeBackupAndRestore(str(backup_dir))]
    if interrupt_at is not None:
        callbacks.append(_Interrupt(interrupt_at))
    return model.fit(x, y, epochs=epochs, callbacks=callbacks, verbose=0)


def _tear(path):
    """What a kill in the middle of writing leaves: the first bytes of the file."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 10])


def test_backup_torn_by_a_kill_falls_back_to_the_epoch_before(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit_with_backup(tmp_path, interrupt_at=3)   # epochs 0-2 done and backed up
    _tear(tmp_path / "latest.weights.h5")            # epoch 2's backup torn
    history = _fit_with_backup(tmp_path)
    assert len(history.history["loss"]) == 2         # epochs 2 and 3: resumed after epoch 1


def test_backup_that_cannot_be_restored_names_the_directory_to_delete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit_with_backup(tmp_path, interrupt_at=3)
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        _tear(tmp_path / name)
    with pytest.raises(training.BackupError, match=f"{tmp_path}.*delete that directory"):
        _fit_with_backup(tmp_path)


def _order(shuffle, ds, epoch):
    shuffle.on_epoch_begin(epoch)
    return [int(i) for i in shuffle(ds).as_numpy_iterator()]


def test_epoch_shuffle_order_depends_on_seed_and_epoch_only():
    ds = tf.data.Dataset.range(50)
    shuffle = training.EpochShuffle(seed=3)
    orders = [_order(shuffle, ds, epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3      # a new order every epoch
    assert _order(training.EpochShuffle(seed=3), ds, 2) == orders[2]   # no history involved
    assert _order(training.EpochShuffle(seed=4), ds, 2) != orders[2]
    assert shuffle(ds).cardinality() == 50


_RANDOM_OBJECTIVES = {   # one whose noise layer draws, one whose model draws random starts
    "gaussian": lambda base: training.GaussianAugmentationModel(base, sigma=0.5, seed=1),
    "pgd": lambda base: adversarial_training.AdversarialTrainingModel(base, eps=0.3, norm="2",
                                                                     steps=2, seed=1),
}


def _random_fit(backup_dir, objective, epochs=4, interrupt_at=None):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model = _RANDOM_OBJECTIVES[objective](base)
    model.compile(keras.optimizers.Adam(0.01), LOSS)
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype(np.int64)))
    shuffle = training.EpochShuffle(seed=0)
    callbacks = [shuffle, training.SafeBackupAndRestore(str(backup_dir))]
    if interrupt_at is not None:
        callbacks.append(_Interrupt(interrupt_at))
    model.fit(shuffle(data).batch(8), epochs=epochs, callbacks=callbacks, verbose=0)
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("objective", sorted(_RANDOM_OBJECTIVES))
@pytest.mark.parametrize("interrupt_at", [1, 3])
@pytest.mark.slow
def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(tmp_path, objective,
                                                              interrupt_at):
    # Fails if the data order restarts (tf.data's reshuffle counter) or the random draws
    # do (Keras does not save a SeedGenerator): both differ from the first resumed epoch.
    uninterrupted = _random_fit(tmp_path / "one", objective)
    with pytest.raises(KeyboardInterrupt):
        _random_fit(tmp_path / "two", objective, interrupt_at=interrupt_at)
    resumed = _random_fit(tmp_path / "two", objective)
    # Exact: the same ops on the same batches, noise and optimizer state, in one process.
    for a, b in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
