"""train.py end to end on digits, and its errors.

One test runs the script in a new Python (its flags and its entry point); the others run
`tfcert.runs.train` in this process with the same arguments (conftest.run_in_process):
a new Python spends ≈ 9 s importing TensorFlow."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_in_process


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def train(*args):
    """``train.py``'s run in this process (`tfcert.runs.train`)."""
    from tfcert import runs

    return run_in_process(runs.train, runs.TrainConfig, args)


@pytest.mark.slow
def test_train_stn_on_digits_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_script("--dataset=digits", "--method=stn", "--sigma=0.25", "--epochs=4",
                        f"--output_dir={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    assert "clean test accuracy" in result.stdout and "under N(0, 0.25^2)" in result.stdout
    for name in ("model.keras", "config.json", "log.csv", "metrics.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "stn" and config["model"] == "small_cnn" and config["sigma"] == 0.25
    assert config["stability_target"] == "stop_gradient"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clean_accuracy"] > 0.6 and 0 < metrics["noisy_accuracy"] <= 1
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 5 and "stability_loss" in log[0]


@pytest.mark.parametrize("args, message", [
    (["--method=bogus"], "--method"),
    (["--epochs=0"], "--epochs"),
    (["--dataset=nope"], "unknown --dataset"),
    (["--dataset=digits", "--method=stn", "--sigma=0"], "needs --sigma > 0"),
    (["--dataset=digits", "--patience=2"], "--patience needs --validation_split > 0"),
    (["--dataset=digits", "--validation_split=0.9"], "--validation_split"),
    (["--dataset=digits", "--strategy=multi_worker"], "keras-team/keras#20585"),
    (["--dataset=digits", "--mixed_precision=float8"], "--mixed_precision"),
])
def test_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
    result = train(*args, f"--output_dir={tmp_path}/out")
    assert message in _one_error_line(result)  # absl's own flag errors included
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset=digits", "stray"], "unexpected arguments"),
    (["--method=bogus"], "--method"),  # absl's own enum error
])
@pytest.mark.slow
def test_the_script_reports_bad_arguments_in_one_line(tmp_path, args, message):
    result = run_script(*args, f"--output_dir={tmp_path}/out")
    assert message in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def _one_error_line(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_dataset_is_one_line_error(tmp_path):
    result = train("--dataset=cifar10", f"--data_dir={tmp_path}", f"--output_dir={tmp_path}/o")
    assert "--download" in _one_error_line(result)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model, message", [
    ("app:ResNet50", "at least 32x32"),  # keras.applications refuses 8x8 inputs
    ("resnet", "unknown model"),
])
def test_a_model_that_cannot_be_built_for_the_data_is_refused_before_any_file(
        tmp_path, model, message):
    out = tmp_path / "run"
    result = train("--dataset=digits", f"--model={model}", "--epochs=1",
                        f"--output_dir={out}")
    error = _one_error_line(result)
    assert message in error and f"--model={model}" in error and "8x8x1" in error
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_methods_train_from_the_script(tmp_path, method):
    out = tmp_path / method
    result = train("--dataset=digits", f"--method={method}", "--eps=0.1", "--attack_steps=3",
                        "--epochs=1", f"--output_dir={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    assert (out / "model.keras").exists()
    header = (out / "log.csv").read_text().splitlines()[0]
    assert ("trades_loss" in header) == (method == "trades")


@pytest.mark.slow
@pytest.mark.parametrize("method, flags, regularizer", [
    ("consistency", ["--num_noise_samples=2", "--consistency_lambda=5"], "consistency_loss"),
    ("macer", ["--num_noise_samples=4", "--macer_beta=8"], "robustness_loss"),
    ("smoothadv", ["--attack_steps=2", "--smoothadv_eps=0.5", "--warmup_epochs=2"], None),
])
def test_noise_objectives_train_from_the_script(tmp_path, method, flags, regularizer):
    out = tmp_path / method
    result = train("--dataset=digits", f"--method={method}", "--sigma=0.25", *flags,
                        "--epochs=2", f"--output_dir={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    assert (out / "model.keras").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method
    assert all(config[flag[2:].split("=")[0]] == float(flag.split("=")[1]) for flag in flags)
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 3 and "classification_loss" in log[0]
    if regularizer:
        assert regularizer in log[0]


@pytest.mark.slow
def test_patience_stops_on_validation_accuracy_under_noise_and_keeps_the_best_epoch(tmp_path):
    import csv

    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.model_selection import train_test_split

    from tfcert import data
    from tfcert.runs import trainer

    out = tmp_path / "run"
    # A learning rate this high makes digits' validation accuracy peak within a few epochs.
    result = train("--dataset=digits", "--method=gaussian", "--sigma=0.25", "--epochs=40",
                        "--validation_split=0.2", "--patience=2", "--learning_rate=0.02",
                        f"--output_dir={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "log.csv", newline="") as f:
        logged = [float(row["val_noisy_accuracy"]) for row in csv.DictReader(f)]
    assert metrics["epochs_trained"] == len(logged)
    assert metrics["best_epoch"] == int(np.argmax(logged)) + 1
    # The patience rule, whatever the machine's float rounding makes the curve: training
    # went on while the best epoch so far (first strict maximum) was < 2 epochs back, and
    # stopped as soon as it was 2 back (or at --epochs).
    since_best = [e - int(np.argmax(logged[:e + 1])) for e in range(len(logged))]
    assert all(gap < 2 for gap in since_best[:-1]), since_best
    assert since_best[-1] == 2 or len(logged) == 40, since_best
    # The written model is the best epoch's: recompute its validation accuracy under the
    # same noise on the same held-out 20% of the training split.
    x, y = data.load_arrays("digits", "train")
    _, x_val, _, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    base = keras.models.load_model(out / "model.keras")
    val = trainer.noisy_batches(tf.data.Dataset.from_tensor_slices((x_val, y_val)), 0.25, 0)
    # One image whose top two logits differ by a float rounding step could flip between
    # processes (thread counts change summation order): allow one image of the 288.
    assert abs(trainer.accuracy(trainer.predictor(base), val) - max(logged)) <= 1 / len(y_val) + 1e-12


@pytest.mark.slow
def test_mirrored_mixed_precision_training_saves_a_float32_model(tmp_path):
    import keras

    out = tmp_path / "run"
    result = train("--dataset=digits", "--method=stn", "--sigma=0.25", "--epochs=3",
                        "--strategy=mirrored", "--mixed_precision=mixed_bfloat16",
                        f"--output_dir={out}", "--verbose=0")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "mirrored" and config["mixed_precision"] == "mixed_bfloat16"
    model = keras.models.load_model(out / "model.keras")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert keras.mixed_precision.global_policy().name == "float32"  # the caller's, restored
    # It learned in 16 bits: digits' chance level is 0.1 (3 epochs of float32 STN reach ~0.9).
    assert json.loads((out / "metrics.json").read_text())["clean_accuracy"] > 0.5


def test_a_backup_that_cannot_be_restored_is_a_one_line_error(tmp_path):
    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"not an HDF5 file")
    result = train("--dataset=digits", "--epochs=1", f"--output_dir={tmp_path / 'run'}")
    assert "delete that directory" in _one_error_line(result)
    assert not (tmp_path / "run" / "model.keras").exists()


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused_and_keeps_the_run(tmp_path):
    """Issue: a rerun with another --sigma silently resumed the interrupted run's backup."""
    out = tmp_path / "run"
    first = train("--dataset=digits", "--method=gaussian", "--sigma=0.25", "--epochs=1",
                       f"--output_dir={out}", "--verbose=0")
    assert first.returncode == 0, first.stderr
    (out / "backup").mkdir()  # as an interrupted run leaves it (its contents are not read)
    kept = {name: (out / name).read_bytes() for name in ("config.json", "log.csv", "model.keras")}
    again = train("--dataset=digits", "--method=gaussian", "--sigma=0.5", "--epochs=3",
                       f"--output_dir={out}", "--verbose=0")
    assert "--sigma (0.25 -> 0.5)" in _one_error_line(again)
    assert {name: (out / name).read_bytes() for name in kept} == kept
