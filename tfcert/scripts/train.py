r"""Trains a base classifier with one of tfcert's training objectives.

    tfcert-train --dataset=mnist_subset --method=stn --sigma=0.7 --gamma=1 \
        --epochs=10 --output_dir=runs/stn_mnist

Methods (``--method``): standard; gaussian (Gaussian augmentation, Cohen et al. 2019);
stn (stability training with noise, STN Sec. 5.1, ``--stability_target``); consistency
(Jeong & Shin 2020); macer (Zhai et al. 2020); smoothadv (Salman et al. 2019); pgd (Madry
PGD adversarial training); trades (TRADES).  See `tfcert.training` and
`tfcert.adversarial_training`.

Writes to --output_dir: ``model.keras`` (the base classifier, logits), ``config.json``
(every flag), ``log.csv`` (per-epoch history: loss, classification_loss, the
regularizer's loss, accuracy, their val_ versions and val_noisy_accuracy) and
``metrics.json`` (clean test accuracy, accuracy under one draw of N(0, σ²) noise, epochs
trained and the best epoch).  Validation uses ``--validation_split`` of the training
split, or the test split when it is 0 (monitoring only).  ``--patience=P`` stops when the
validation accuracy under noise has not improved for P epochs and keeps the best epoch's
weights (``best.weights.h5``), the rule used to compare objectives in docs/RESULTS.md:

    tfcert-train --method=macer --sigma=0.5 --validation_split=0.1 --patience=3 --epochs=15

``--strategy=mirrored`` trains on every GPU of the machine, ``--batch_size`` being the
global batch (``multi_worker`` is refused: Keras 3's ``fit`` fails under
``MultiWorkerMirroredStrategy``, keras-team/keras#20585);
``--mixed_precision=mixed_float16`` (or ``mixed_bfloat16``) computes in 16 bits with float32
weights, and ``model.keras`` is saved as its float32 clone (`tfcert.training`):

    tfcert-train --method=stn --sigma=0.5 --strategy=mirrored --mixed_precision=mixed_float16

An interrupted run resumes from its last finished epoch (``backup/``; the one before if
the kill tore the last backup, `tfcert.training.SafeBackupAndRestore`), with --patience
counting on from the epochs already logged (`tfcert.training.ResumableEarlyStopping`), and
trains exactly as an uninterrupted run would (`tfcert.training.EpochShuffle`).  Resuming
with other settings (anything but --epochs, --verbose, --data_dir, --download) is refused.
A new run in the same --output_dir replaces what a finished one left; ``model.keras`` is
written last, so a folder holding it holds a finished run.  Flags, data and model are
checked before anything is written: a model that cannot be built for the data is a
one-line ``error:`` and leaves no output folder.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
# Flags that may change when an interrupted run is resumed: they never change what it trains.
OPERATIONAL = frozenset({"data_dir", "download", "epochs", "output_dir", "verbose"})
flags.DEFINE_string("dataset", "mnist_subset", "Dataset (see tfcert.data): mnist_subset, "
                    "fashion_mnist, digits, mnist, cifar10, imagenet2012.")
flags.DEFINE_string("data_dir", None, "Folder with prepared tfds data or the Fashion-MNIST IDX files.")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download the data (needs internet).")
flags.DEFINE_string("model", None, "Base classifier: stn_mnist, cifar_cnn, small_cnn or "
                    "app:<keras.applications name>. Default: stn_mnist for 28x28 data, "
                    "cifar_cnn for cifar10, small_cnn for digits, app:ResNet50 for imagenet2012.")
flags.DEFINE_enum("method", "stn", ["standard", "gaussian", "stn", "consistency", "macer",
                                     "smoothadv", "pgd", "trades"],
                  "Training method: standard; gaussian (Gaussian augmentation, Cohen et al.); "
                  "stn (stability training with noise, STN Sec. 5.1); consistency (Gaussian "
                  "augmentation + consistency regularization, Jeong & Shin 2020); macer "
                  "(certified-radius maximisation, Zhai et al. 2020); smoothadv (PGD on the "
                  "smoothed classifier, Salman et al. 2019); pgd (Madry PGD adversarial "
                  "training); trades (TRADES).")
flags.DEFINE_float("sigma", 0.7, "Noise std σ on the [0, 1] pixel scale (gaussian, stn, "
                   "consistency, macer, smoothadv; also the noise of the reported noisy "
                   "accuracy).", lower_bound=0.0)
flags.DEFINE_float("gamma", 1.0, "Weight γ of the stability loss (stn).", lower_bound=0.0)
flags.DEFINE_enum("stability_target", "stop_gradient", ["paper", "stop_gradient", "stn_code"],
                  "Stability loss of stn (see tfcert.StabilityModel): paper (gradient through "
                  "both predictions), stop_gradient (clean prediction as a fixed target), "
                  "stn_code (STN's released code: the clean logits as the target).")
flags.DEFINE_integer("num_noise_samples", None, "Noise draws m per image (consistency, macer, "
                     "smoothadv). Default: the paper's, 2 / 16 / 2.", lower_bound=1)
flags.DEFINE_float("consistency_lambda", 10.0, "Weight λ of the KL term (consistency).",
                   lower_bound=0.0)
flags.DEFINE_float("consistency_eta", 0.5, "Weight η of the entropy term (consistency).",
                   lower_bound=0.0)
flags.DEFINE_float("macer_lambda", 12.0, "Weight λ of the robustness term (macer).",
                   lower_bound=0.0)
flags.DEFINE_float("macer_gamma", 8.0, "Hinge γ on the radius term (macer).", lower_bound=0.0)
flags.DEFINE_float("macer_beta", 16.0, "Inverse temperature β of the robustness term (macer).",
                   lower_bound=0.0)
flags.DEFINE_float("smoothadv_eps", 0.25, "ℓ2 radius ε of the SmoothAdv attack ([0, 1] scale).",
                   lower_bound=0.0)
flags.DEFINE_integer("warmup_epochs", 10, "Epochs over which the SmoothAdv ε grows linearly "
                     "to --smoothadv_eps (1 = no warm-up).", lower_bound=1)
flags.DEFINE_float("eps", 0.3, "Attack budget ε for pgd / trades training ([0, 1] scale).",
                   lower_bound=0.0)
flags.DEFINE_enum("norm", "inf", ["inf", "2"], "Norm of the training attack (pgd / trades).")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack (pgd / trades / "
                     "smoothadv).", lower_bound=1)
flags.DEFINE_float("beta", 6.0, "TRADES weight β of KL(f(x) || f(x_adv)).", lower_bound=0.0)
flags.DEFINE_integer("epochs", 10, "Training epochs (the most, with --patience).", lower_bound=1)
flags.DEFINE_float("validation_split", 0.0, "Fraction of the training split held out "
                   "(stratified, fixed by --seed) for validation and --patience; 0 validates on "
                   "the test split, for monitoring only.", lower_bound=0.0, upper_bound=0.5)
flags.DEFINE_integer("patience", 0, "Stop when the validation accuracy under one fixed draw of "
                     "N(0, σ²) noise (val_noisy_accuracy) has not improved for this many epochs, "
                     "and keep the best epoch's weights; 0 trains all --epochs. Needs "
                     "--validation_split > 0.", lower_bound=0)
flags.DEFINE_integer("batch_size", 128, "Training batch size (global: split over the replicas "
                     "of --strategy).", lower_bound=1)
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: default (one device), mirrored (every GPU of this "
                  "machine); multi_worker is refused: Keras 3's fit does not support it.")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Keras dtype policy while training (mixed_float16: GPUs with tensor cores, "
                  "loss scaling added; mixed_bfloat16: TPUs and recent CPUs/GPUs). The saved "
                  "model.keras always computes in float32.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (STN code: 1e-3).", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, training noise).")
flags.DEFINE_string("output_dir", "runs/train", "Where to write the model, config and logs.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "Keras fit verbosity (auto: progress bar on a terminal, a line per epoch otherwise).")


def default_model(dataset: str) -> str:
    return {"digits": "small_cnn", "cifar10": "cifar_cnn",
            "imagenet2012": "app:ResNet50"}.get(dataset, "stn_mnist")


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    import keras
    import numpy as np

    from tfcert import data, devices, results, training
    from tfcert.devices import policy_clone

    strategy = distribution()
    meta = data.info(FLAGS.dataset) if FLAGS.dataset in data.DATASETS else None
    cli.require(meta is not None, f"unknown --dataset={FLAGS.dataset}; choose one of "
                f"{', '.join(data.DATASETS)}")
    cli.require(FLAGS.method in ("standard", "pgd", "trades") or FLAGS.sigma > 0,
                f"--method={FLAGS.method} needs --sigma > 0")
    cli.require(FLAGS.patience == 0 or FLAGS.validation_split > 0,
                "--patience needs --validation_split > 0: early stopping on the test split "
                "would select the model on the data it is evaluated on")
    train_ds, val_ds = split_validation(
        data.load(FLAGS.dataset, "train", FLAGS.data_dir, FLAGS.download))
    test_ds = data.load(FLAGS.dataset, "test", FLAGS.data_dir, FLAGS.download)
    val_ds = test_ds if val_ds is None else val_ds
    model_name = FLAGS.model or default_model(FLAGS.dataset)
    keras.utils.set_random_seed(FLAGS.seed)
    devices.set_precision(FLAGS.mixed_precision)
    with strategy.scope():
        base, model = build(model_name, meta)
        model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    log_path, best_path, backup_dir, model_path, metrics_path = (
        os.path.join(FLAGS.output_dir, name) for name in (
            "log.csv", "best.weights.h5", "backup", "model.keras", "metrics.json"))
    if not os.path.isdir(backup_dir):  # a new run replaces what a finished one left
        results.remove_files(FLAGS.output_dir, ("log.csv", "best.weights.h5", "model.keras",
                                                "metrics.json", "config.json"))
    # resuming an interrupted run with other settings is refused before anything is written
    results.prepare_run_dir(FLAGS.output_dir, {**cli.script_flags(), "model": model_name},
                            OPERATIONAL, cli.flag_defaults())
    shuffle = training.EpochShuffle(FLAGS.seed)
    callbacks = [
        shuffle,
        noisy_validation_accuracy(base, val_ds, FLAGS.sigma, FLAGS.seed),
        *model_selection(log_path, best_path),
        keras.callbacks.CSVLogger(log_path, append=True),
        training.SafeBackupAndRestore(backup_dir),
        keras.callbacks.TerminateOnNaN(),
    ]
    verbose = "auto" if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    try:
        history = model.fit(data.batched(shuffle(train_ds), FLAGS.batch_size),
                            validation_data=data.batched(val_ds, 512), epochs=FLAGS.epochs,
                            callbacks=callbacks, verbose=verbose, shuffle=False)
    except training.BackupError as err:
        raise cli.CliError(str(err)) from err
    losses = history.history.get("loss", [])
    cli.require(bool(losses) and bool(np.all(np.isfinite(losses))),
                "training diverged (NaN/Inf loss): lower --learning_rate or --gamma; "
                "no model was written")
    if FLAGS.patience:
        model.load_weights(best_path)

    final = base if FLAGS.mixed_precision == "float32" else policy_clone(base, "float32")
    metrics = {**evaluate(final, test_ds, FLAGS.sigma, FLAGS.seed), **epochs_trained(log_path)}
    results.write_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    partial = os.path.join(FLAGS.output_dir, "model.partial.keras")
    final.save(partial)
    os.replace(partial, model_path)  # last: a model.keras in the folder means a finished run
    print(f"clean test accuracy: {100 * metrics['clean_accuracy']:.2f}%")
    print(f"test accuracy under N(0, {FLAGS.sigma}^2) noise (one draw per image): "
          f"{100 * metrics['noisy_accuracy']:.2f}%")
    print(f"model written to {model_path}")


def distribution() -> "tf.distribute.Strategy":
    """The tf.distribute strategy of --strategy (`tfcert.devices.make_strategy`)."""
    from tfcert import devices

    cli.require(FLAGS.strategy != "multi_worker",
                "--strategy=multi_worker: Keras 3's model.fit does not run under "
                "MultiWorkerMirroredStrategy (keras-team/keras#20585, open); train with "
                "--strategy=mirrored on one machine's GPUs")
    try:
        return devices.make_strategy(FLAGS.strategy)
    except ValueError as err:
        raise cli.CliError(f"--strategy={FLAGS.strategy}: {err}") from None


def build(model_name: str, meta: "data.DatasetInfo") -> tuple["keras.Model", "keras.Model"]:
    """The base classifier for the data and the model whose ``fit`` trains it with
    --method; a model that cannot be built for the data is a `cli.CliError`."""
    from tfcert import models, training

    try:
        base = models.build(model_name, meta.image_shape, meta.num_classes)
    except ValueError as err:
        raise cli.CliError(f"--model={model_name} cannot be built for --dataset="
                           f"{FLAGS.dataset} ({meta.image_shape[0]}x{meta.image_shape[1]}x"
                           f"{meta.image_shape[2]} images, {meta.num_classes} classes): "
                           f"{err}") from err
    if FLAGS.method in ("pgd", "trades"):
        from tfcert import adversarial_training

        return base, adversarial_training.wrap(
            base, FLAGS.method, eps=FLAGS.eps, norm=FLAGS.norm, steps=FLAGS.attack_steps,
            beta=FLAGS.beta, seed=FLAGS.seed)
    sampled = {} if FLAGS.num_noise_samples is None else {
        "num_noise_samples": FLAGS.num_noise_samples}
    options = {
        "stn": {"gamma": FLAGS.gamma, "stability_target": FLAGS.stability_target},
        "consistency": {**sampled, "lbd": FLAGS.consistency_lambda, "eta": FLAGS.consistency_eta},
        "macer": {**sampled, "lbd": FLAGS.macer_lambda, "gamma": FLAGS.macer_gamma,
                  "beta": FLAGS.macer_beta},
        "smoothadv": {**sampled, "eps": FLAGS.smoothadv_eps, "steps": FLAGS.attack_steps,
                      "warmup_epochs": FLAGS.warmup_epochs},
    }.get(FLAGS.method, {})
    try:
        return base, training.wrap(base, FLAGS.method, FLAGS.sigma, seed=FLAGS.seed, **options)
    except ValueError as err:
        raise cli.CliError(str(err)) from err


def split_validation(train_ds: "tf.data.Dataset") -> tuple["tf.data.Dataset", "tf.data.Dataset | None"]:
    """(train, validation): a stratified --validation_split of the training split, fixed
    by --seed, or (train, None) without one."""
    import tensorflow as tf
    from sklearn.model_selection import train_test_split

    if FLAGS.validation_split == 0:
        return train_ds, None
    x, y = zip(*train_ds.batch(4096).as_numpy_iterator())
    x_train, x_val, y_train, y_val = train_test_split(
        np.concatenate(x), np.concatenate(y), test_size=FLAGS.validation_split,
        stratify=np.concatenate(y), random_state=FLAGS.seed)
    return (tf.data.Dataset.from_tensor_slices((x_train, y_train)),
            tf.data.Dataset.from_tensor_slices((x_val, y_val)))


def noisy_validation_accuracy(base, val_ds, sigma: float, seed: int) -> "keras.callbacks.Callback":
    """Adds ``val_noisy_accuracy`` to every epoch's logs: the base classifier's accuracy on
    the validation images under one draw of N(0, σ²) noise per image, the same draw every
    epoch so that epochs compare on equal terms (the quantity smoothing needs: the
    certificate rests on the accuracy under noise, not on the clean accuracy)."""
    import keras

    noisy = noisy_batches(val_ds, sigma, seed).cache()

    def on_epoch_end(epoch, logs):
        logs["val_noisy_accuracy"] = accuracy(base, noisy)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def model_selection(log_path: str, best_path: str) -> list["keras.callbacks.Callback"]:
    """With --patience: keep the weights of the epoch with the best val_noisy_accuracy in
    ``best_path`` and stop after --patience epochs without improvement.  A resumed run
    carries on from the epochs already in ``log_path``: it keeps an earlier best epoch
    and stops where an uninterrupted run would (`tfcert.training.ResumableEarlyStopping`)."""
    import keras

    from tfcert import training

    if not FLAGS.patience:
        return []
    return [keras.callbacks.ModelCheckpoint(
                best_path, monitor="val_noisy_accuracy", mode="max", save_best_only=True,
                save_weights_only=True, initial_value_threshold=best_logged(log_path)),
            training.ResumableEarlyStopping(
                lambda epoch: logged_noisy_accuracy(log_path)[:epoch],
                monitor="val_noisy_accuracy", mode="max", patience=FLAGS.patience)]


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


def epochs_trained(log_path: str) -> dict[str, int]:
    """How many epochs ran and which one (1-based) had the best val_noisy_accuracy (the
    weights written with --patience)."""
    values = logged_noisy_accuracy(log_path)
    best = int(np.argmax(values)) + 1 if FLAGS.patience else len(values)
    return {"epochs_trained": len(values), "best_epoch": best}


def noisy_batches(ds: "tf.data.Dataset", sigma: float, seed: int) -> "tf.data.Dataset":
    """Batches of (x + N(0, σ²I), y), the noise a fixed function of (seed, batch number)."""
    import tensorflow as tf

    return ds.batch(512).enumerate().map(lambda i, batch: (
        batch[0] + sigma * tf.random.stateless_normal(
            tf.shape(batch[0]), tf.stack([tf.constant(seed, tf.int64), i])), batch[1]))


def accuracy(base, batches: "tf.data.Dataset") -> float:
    """Top-1 accuracy of the base classifier on batches of (images, labels)."""
    import tensorflow as tf

    predict = tf.function(lambda x: tf.argmax(base(x, training=False), axis=-1))
    return float(np.mean(np.concatenate(
        [predict(x).numpy() == y.numpy() for x, y in batches])))


def evaluate(base, test_ds, sigma: float, seed: int) -> dict[str, float]:
    """Clean accuracy and accuracy under one draw of N(0, σ²) noise per test image."""
    return {"clean_accuracy": accuracy(base, test_ds.batch(512)),
            "noisy_accuracy": accuracy(base, noisy_batches(test_ds, sigma, seed)), "sigma": sigma}


def main() -> None:
    """The ``tfcert-train`` / ``python train.py`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
