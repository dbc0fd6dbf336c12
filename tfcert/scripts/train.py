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
regularizer's loss, accuracy and their val_ versions) and ``metrics.json`` (clean
test accuracy and accuracy under one draw of N(0, σ²) noise).  An interrupted run
resumes from its last finished epoch (``backup/``).  Flags, data and model are checked
before anything is written: a model that cannot be built for the data is a one-line
``error:`` and leaves no output folder.
"""

from __future__ import annotations

import json
import os

from absl import flags

from tfcert import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist_subset", "Dataset (see tfcert.data): mnist_subset, "
                    "fashion_mnist, digits, mnist, cifar10, imagenet2012.")
flags.DEFINE_string("data_dir", None, "Folder with prepared tfds data or the Fashion-MNIST IDX files.")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download the data (needs internet).")
flags.DEFINE_string("model", None, "Base classifier: stn_mnist, cifar_cnn, small_cnn or "
                    "app:<keras.applications name>. Default: stn_mnist for 28x28 data, "
                    "cifar_cnn for cifar10, small_cnn for digits.")
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
flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Training batch size.", lower_bound=1)
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

    from tfcert import data

    meta = data.info(FLAGS.dataset) if FLAGS.dataset in data.DATASETS else None
    cli.require(meta is not None, f"unknown --dataset={FLAGS.dataset}; choose one of "
                f"{', '.join(data.DATASETS)}")
    cli.require(FLAGS.method in ("standard", "pgd", "trades") or FLAGS.sigma > 0,
                f"--method={FLAGS.method} needs --sigma > 0")
    train_ds = data.load(FLAGS.dataset, "train", FLAGS.data_dir, FLAGS.download)
    test_ds = data.load(FLAGS.dataset, "test", FLAGS.data_dir, FLAGS.download)
    model_name = FLAGS.model or default_model(FLAGS.dataset)
    keras.utils.set_random_seed(FLAGS.seed)
    base, model = build(model_name, meta)

    config = {**cli.script_flags(), "model": model_name}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(FLAGS.output_dir, "log.csv"), append=True),
        keras.callbacks.BackupAndRestore(os.path.join(FLAGS.output_dir, "backup")),
        keras.callbacks.TerminateOnNaN(),
    ]
    verbose = "auto" if FLAGS.verbose == "auto" else int(FLAGS.verbose)
    history = model.fit(data.batched(train_ds, FLAGS.batch_size, shuffle=True, seed=FLAGS.seed),
                        validation_data=data.batched(test_ds, 512), epochs=FLAGS.epochs,
                        callbacks=callbacks, verbose=verbose, shuffle=False)
    losses = history.history.get("loss", [])
    cli.require(bool(losses) and bool(np.all(np.isfinite(losses))),
                "training diverged (NaN/Inf loss): lower --learning_rate or --gamma; "
                "no model was written")

    metrics = evaluate(base, test_ds, FLAGS.sigma, FLAGS.seed)
    base.save(os.path.join(FLAGS.output_dir, "model.keras"))
    with open(os.path.join(FLAGS.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"clean test accuracy: {100 * metrics['clean_accuracy']:.2f}%")
    print(f"test accuracy under N(0, {FLAGS.sigma}^2) noise (one draw per image): "
          f"{100 * metrics['noisy_accuracy']:.2f}%")
    print(f"model written to {os.path.join(FLAGS.output_dir, 'model.keras')}")


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


def evaluate(base, test_ds, sigma: float, seed: int) -> dict[str, float]:
    """Clean accuracy and accuracy under one draw of N(0, σ²) noise per test image."""
    import numpy as np
    import tensorflow as tf

    from tfcert import data
    from tfcert.layers import GaussianNoise

    noise = GaussianNoise(sigma, seed=seed)
    predict = tf.function(lambda x: tf.argmax(base(x, training=False), axis=-1))
    correct = {"clean_accuracy": [], "noisy_accuracy": []}
    for x, y in data.batched(test_ds, 512):
        correct["clean_accuracy"].append(predict(x).numpy() == y.numpy())
        correct["noisy_accuracy"].append(predict(noise(x)).numpy() == y.numpy())
    return {**{k: float(np.mean(np.concatenate(v))) for k, v in correct.items()}, "sigma": sigma}


def main() -> None:
    """The ``tfcert-train`` / ``python train.py`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
