"""Training runs (`train`, ``tfcert-train``): a base classifier trained with one of tfcert's
objectives, resumable, its files in one folder.

With ``method="denoiser"`` the run trains a denoiser for the frozen ``classifier``
(`tfcert.DenoiserModel`, denoised smoothing): ``model.keras`` is the denoiser, and every
accuracy (validation, ``metrics.json``) is that of classifier ∘ denoiser.

Writes to ``output_dir``: ``model.keras`` (the base classifier, logits), ``config.json``
(every option), ``log.csv`` (per-epoch history: loss, classification_loss, the
regularizer's loss, accuracy, their val_ versions and val_noisy_accuracy) and
``metrics.json`` (clean test accuracy, accuracy under one draw of N(0, σ²) noise, epochs
trained and the best epoch); with ``tensorboard_dir``, Keras TensorBoard logs too.
Validation uses ``validation_split`` of the training split, or the test split when it is
0 (monitoring only); data of one split (a folder, a file, arrays) needs a
``validation_split``, which is then its test split too.  ``patience=P`` stops when the
validation accuracy under noise has not improved for P epochs and keeps the best epoch's
weights (``best.weights.h5``).

An interrupted run resumes from its last finished epoch (``backup/``; the one before if
the kill tore the last backup, `tfcert.training.SafeBackupAndRestore`), with ``patience``
counting on from the epochs already logged (`tfcert.training.ResumableEarlyStopping`), and
trains exactly as an uninterrupted run would (`tfcert.training.EpochShuffle`).  Resuming
with other settings (anything but `OPERATIONAL`) is refused.  A new run in the same folder
replaces what a finished one left; ``model.keras`` is written last, so a folder holding
it holds a finished run.  Options, data and model are checked before anything is written.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from typing import Any, Callable

import numpy as np

from tfcert import cli
from tfcert.runs.config import TrainConfig

# Options that may change when an interrupted run is resumed: they never change what it trains.
OPERATIONAL = frozenset({"data_dir", "download", "epochs", "output_dir", "verbose",
                         "tensorboard_dir"})


def default_model(dataset: "str | data.Arrays", meta: "data.DatasetInfo") -> str:
    """The base classifier trained on ``dataset`` (its `DatasetInfo` ``meta``) when the
    config names none."""
    from tfcert import data

    named = dataset in data.DATASETS
    other = "cifar_cnn" if meta.image_shape[-1] == 3 and not named else "stn_mnist"
    return {"digits": "small_cnn", "cifar10": "cifar_cnn",
            "imagenet2012": "app:ResNet50"}.get(dataset, other)


def default_denoiser() -> str:
    """The denoiser trained by ``method="denoiser"`` when the config names none."""
    return "dncnn"


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs ``tfcert-train`` with the options of ``config`` (resuming an interrupted run in
    ``config.output_dir``).

    Args:
        config: the run's options.

    Returns:
        The run's ``metrics.json``: clean_accuracy, noisy_accuracy, sigma, epochs_trained,
        best_epoch.

    Raises:
        tfcert.cli.CliError, tfcert.results.RunConfigMismatchError,
        tfcert.data.DataUnavailableError: what the script reports in one line.
    """
    import keras

    from tfcert import data, devices, results, training

    c = config
    cli.require(not c.tensorboard_dir or importlib.util.find_spec("tensorboard") is not None,
                "--tensorboard_dir needs TensorBoard, which is not installed: pip install "
                "tensorboard")
    strategy = distribution(c.strategy)
    single = data.single_split(c.dataset)
    cli.require(not single or c.validation_split > 0,
                f"--dataset={c.dataset} is one split: pass --validation_split (e.g. 0.2) to "
                "hold out the validation and test examples")
    train = data.read(c.dataset, "train", c.data_dir, c.download, c.image_size)
    meta = train.info
    train_ds, val_ds = split_validation(train.dataset, c.validation_split, c.seed)
    test_ds = val_ds if single else data.load(c.dataset, "test", c.data_dir, c.download,
                                                c.image_size)
    val_ds = test_ds if val_ds is None else val_ds
    model_name = c.model or (default_denoiser() if c.method == "denoiser"
                             else default_model(c.dataset, meta))
    keras.utils.set_random_seed(c.seed)
    previous = devices.set_precision(c.mixed_precision)
    try:
        with strategy.scope():
            if c.method == "denoiser":
                base, model, scored = build_denoiser(c, model_name, meta, train_ds)
                model.compile(optimizer=keras.optimizers.Adam(c.learning_rate))
            else:
                base, model = build(c, model_name, meta)
                scored = base
                model.compile(optimizer=keras.optimizers.Adam(c.learning_rate),
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              metrics=["accuracy"])
    finally:  # the built model keeps its policy; the caller's global policy is restored
        devices.set_precision(previous)

    log_path, best_path, backup_dir, model_path, metrics_path = (
        os.path.join(c.output_dir, name) for name in (
            "log.csv", "best.weights.h5", "backup", "model.keras", "metrics.json"))
    if not os.path.isdir(backup_dir):  # a new run replaces what a finished one left
        results.remove_files(c.output_dir, ("log.csv", "best.weights.h5", "model.keras",
                                            "metrics.json", "config.json"))
    # resuming an interrupted run with other settings is refused before anything is written
    record = {**c.to_dict(), "model": model_name, **train.identity}
    if c.method == "denoiser":  # only then: older runs' identities stay the same
        record["classifier_sha256"] = cli.file_sha256(c.classifier)
    results.prepare_run_dir(c.output_dir, record, OPERATIONAL, TrainConfig.defaults())
    shuffle = training.EpochShuffle(c.seed)
    callbacks = [
        shuffle,
        noisy_validation_accuracy(scored, val_ds, c.sigma, c.seed),
        *model_selection(log_path, best_path, c.patience),
        keras.callbacks.CSVLogger(log_path, append=True),
        training.SafeBackupAndRestore(backup_dir),
        keras.callbacks.TerminateOnNaN(),
        *([keras.callbacks.TensorBoard(c.tensorboard_dir)] if c.tensorboard_dir else []),
    ]
    verbose = "auto" if c.verbose == "auto" else int(c.verbose)
    try:
        history = model.fit(data.batched(shuffle(train_ds), c.batch_size),
                            validation_data=data.batched(val_ds, 512), epochs=c.epochs,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
    except training.BackupError as err:
        raise cli.CliError(str(err)) from err
    losses = history.history.get("loss", [])
    cli.require(bool(losses) and bool(np.all(np.isfinite(losses))),
                "training diverged (NaN/Inf loss): lower --learning_rate or --gamma; "
                "no model was written")
    if c.patience:
        model.load_weights(best_path)

    final = base if c.mixed_precision == "float32" else devices.policy_clone(base, "float32")
    if c.method == "denoiser":
        from tfcert.models import denoised

        scored = denoised(final, model.classifier)
    else:
        scored = final
    metrics = {**evaluate(scored, test_ds, c.sigma, c.seed),
               **epochs_trained(log_path, c.patience)}
    results.write_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    partial = os.path.join(c.output_dir, "model.partial.keras")
    final.save(partial)
    os.replace(partial, model_path)  # last: a model.keras in the folder means a finished run
    print(f"clean test accuracy: {100 * metrics['clean_accuracy']:.2f}%")
    print(f"test accuracy under N(0, {c.sigma}^2) noise (one draw per image): "
          f"{100 * metrics['noisy_accuracy']:.2f}%")
    print(f"model written to {model_path}")
    return metrics


def distribution(strategy: str) -> "tf.distribute.Strategy":
    """The tf.distribute strategy named ``strategy`` (`tfcert.devices.make_strategy`), a
    `cli.CliError` if this machine cannot run it."""
    from tfcert import devices

    try:
        return devices.make_strategy(strategy)
    except ValueError as err:
        raise cli.CliError(f"--strategy={strategy}: {err}") from None


def build(c: TrainConfig, model_name: str,
          meta: "data.DatasetInfo") -> tuple["keras.Model", "keras.Model"]:
    """The base classifier for the data and the model whose ``fit`` trains it with
    ``c.method``; a model that cannot be built for the data is a `cli.CliError`."""
    from tfcert import models, training

    try:
        base = models.build(model_name, meta.image_shape, meta.num_classes)
    except ValueError as err:
        raise cli.CliError(f"--model={model_name} cannot be built for --dataset="
                           f"{c.dataset} ({meta.image_shape[0]}x{meta.image_shape[1]}x"
                           f"{meta.image_shape[2]} images, {meta.num_classes} classes): "
                           f"{err}") from err
    if c.method in ("pgd", "trades"):
        from tfcert import adversarial_training

        return base, adversarial_training.wrap(
            base, c.method, eps=c.eps, norm=c.norm, steps=c.attack_steps, beta=c.beta,
            seed=c.seed)
    sampled = {} if c.num_noise_samples is None else {"num_noise_samples": c.num_noise_samples}
    options = {
        "stn": {"gamma": c.gamma, "stability_target": c.stability_target},
        "consistency": {**sampled, "lbd": c.consistency_lambda, "eta": c.consistency_eta},
        "macer": {**sampled, "lbd": c.macer_lambda, "gamma": c.macer_gamma,
                  "beta": c.macer_beta},
        "smoothadv": {**sampled, "eps": c.smoothadv_eps, "steps": c.attack_steps,
                      "warmup_epochs": c.warmup_epochs},
    }.get(c.method, {})
    try:
        return base, training.wrap(base, c.method, c.sigma, seed=c.seed, **options)
    except ValueError as err:
        raise cli.CliError(str(err)) from err


def build_denoiser(c: TrainConfig, model_name: str, meta: "data.DatasetInfo",
                   train_ds: "tf.data.Dataset") -> tuple["keras.Model", "keras.Model",
                                                         "keras.Model"]:
    """(the denoiser, the `tfcert.DenoiserModel` whose ``fit`` trains it, classifier ∘
    denoiser) for ``c.classifier``, checked to fit the data; `cli.CliError` otherwise."""
    from tfcert import models
    from tfcert.denoising import DenoiserModel

    classifier = cli.load_model(c.classifier)
    cli.check_model_fits(classifier, meta, c.classifier, c.dataset)
    cli.require(model_name == "dncnn", f"--method=denoiser trains --model=dncnn (or a "
                f"denoiser of the Python API: tfcert.DenoiserModel), got --model={model_name}")
    denoiser = models.dncnn(tuple(meta.image_shape), depth=8, filters=32)
    examples = int(train_ds.cardinality())
    cli.require(examples > 0, f"--method=denoiser needs a training split of known size, "
                f"{c.dataset} has {examples}")
    steps_per_epoch = -(-examples // c.batch_size)
    model = DenoiserModel(denoiser, c.sigma, c.denoiser_objective, classifier=classifier,
                          mse_steps=c.denoiser_mse_epochs * steps_per_epoch, seed=c.seed)
    return denoiser, model, models.denoised(denoiser, classifier)


def split_validation(train_ds: "tf.data.Dataset", fraction: float,
                     seed: int) -> tuple["tf.data.Dataset", "tf.data.Dataset | None"]:
    """(train, validation): a stratified ``fraction`` of the training split, fixed by
    ``seed``, or (train, None) for a fraction of 0."""
    import tensorflow as tf
    from sklearn.model_selection import train_test_split

    if fraction == 0:
        return train_ds, None
    x, y = zip(*train_ds.batch(4096).as_numpy_iterator())
    x_train, x_val, y_train, y_val = train_test_split(
        np.concatenate(x), np.concatenate(y), test_size=fraction,
        stratify=np.concatenate(y), random_state=seed)
    return (tf.data.Dataset.from_tensor_slices((x_train, y_train)),
            tf.data.Dataset.from_tensor_slices((x_val, y_val)))


def noisy_validation_accuracy(base, val_ds, sigma: float, seed: int) -> "keras.callbacks.Callback":
    """Adds ``val_noisy_accuracy`` to every epoch's logs: the base classifier's accuracy on
    the validation images under one draw of N(0, σ²) noise per image, the same draw every
    epoch so that epochs compare on equal terms (the quantity smoothing needs: the
    certificate rests on the accuracy under noise, not on the clean accuracy)."""
    import keras

    noisy, predict = noisy_batches(val_ds, sigma, seed).cache(), predictor(base)

    def on_epoch_end(epoch, logs):
        logs["val_noisy_accuracy"] = accuracy(predict, noisy)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def model_selection(log_path: str, best_path: str,
                    patience: int) -> list["keras.callbacks.Callback"]:
    """With ``patience``: keep the weights of the epoch with the best val_noisy_accuracy in
    ``best_path`` and stop after ``patience`` epochs without improvement.  A resumed run
    carries on from the epochs already in ``log_path``: it keeps an earlier best epoch
    and stops where an uninterrupted run would (`tfcert.training.ResumableEarlyStopping`)."""
    import keras

    from tfcert import training

    if not patience:
        return []
    return [keras.callbacks.ModelCheckpoint(
                best_path, monitor="val_noisy_accuracy", mode="max", save_best_only=True,
                save_weights_only=True, initial_value_threshold=best_logged(log_path)),
            training.ResumableEarlyStopping(
                lambda epoch: logged_noisy_accuracy(log_path)[:epoch],
                monitor="val_noisy_accuracy", mode="max", patience=patience)]


def logged_noisy_accuracy(log_path: str) -> list[float]:
    """val_noisy_accuracy of each epoch in the run's log, epoch 0 first (an epoch logged
    twice, the run having been interrupted before its backup, counts once: the last)."""
    if not os.path.exists(log_path):
        return []
    with open(log_path, newline="") as f:
        by_epoch = {int(row["epoch"]): float(row["val_noisy_accuracy"])
                    for row in csv.DictReader(f) if row.get("val_noisy_accuracy")}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def best_logged(log_path: str) -> float | None:
    """The best val_noisy_accuracy of the epochs an interrupted run already logged."""
    values = logged_noisy_accuracy(log_path)
    return max(values) if values else None


def epochs_trained(log_path: str, patience: int) -> dict[str, int]:
    """How many epochs ran and which one (1-based) had the best val_noisy_accuracy (the
    weights written with ``patience``)."""
    values = logged_noisy_accuracy(log_path)
    best = int(np.argmax(values)) + 1 if patience else len(values)
    return {"epochs_trained": len(values), "best_epoch": best}


def noisy_batches(ds: "tf.data.Dataset", sigma: float, seed: int) -> "tf.data.Dataset":
    """Batches of (x + N(0, σ²I), y), the noise a fixed function of (seed, batch number)."""
    import tensorflow as tf

    return ds.batch(512).enumerate().map(lambda i, batch: (
        batch[0] + sigma * tf.random.stateless_normal(
            tf.shape(batch[0]), tf.stack([tf.constant(seed, tf.int64), i])), batch[1]))


def predictor(base) -> Callable:
    """The base classifier's top-1 class of a batch, compiled (made once per model: one
    trace, not one per epoch)."""
    import tensorflow as tf

    return tf.function(lambda x: tf.argmax(base(x, training=False), axis=-1),
                       reduce_retracing=True)


def accuracy(predict: Callable, batches: "tf.data.Dataset") -> float:
    """Top-1 accuracy of ``predict`` (`predictor`) on batches of (images, labels)."""
    return float(np.mean(np.concatenate(
        [predict(x).numpy() == y.numpy() for x, y in batches])))


def evaluate(base, test_ds, sigma: float, seed: int) -> dict[str, float]:
    """Clean accuracy and accuracy under one draw of N(0, σ²) noise per test image."""
    predict = predictor(base)
    return {"clean_accuracy": accuracy(predict, test_ds.batch(512)),
            "noisy_accuracy": accuracy(predict, noisy_batches(test_ds, sigma, seed)),
            "sigma": sigma}
