"""TF Serving export: a TensorFlow-only process runs the signatures and gets the library's answers.

One small CNN trained on 8x8 digits under Gaussian noise is exported through the
`python export` entry point (in a process where tensorflow-serving-api cannot be
imported); a subprocess that blocks tfcert, TFP and Keras loads it and runs every
request of these tests at once (``served``); the tests compare its answers with
`SmoothedClassifier`, `tfcert.stats` / `tfcert.bounds` and scipy, and replay the
export's TF Serving warmup requests through the TF1 session path the server uses.
"""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats as sps

from test_smoothing import SHAPE, linear_problem  # noqa: F401 (fixture)

from tfcert import bounds, cli, data, export, models, stats
from tfcert.devices import GPU_PASS_MEMORY, MAX_PASS_SIZE, activation_bytes
from tfcert.export import saved_model
from tfcert.layers import GaussianNoise
from tfcert.layers.discretization import RandomizedDiscretization
from tfcert.sequential import StoppingRule, certify_sequential
from tfcert.smoothing import SmoothedClassifier
# TensorFlow's saved_model_cli of the interpreter running the tests (a venv's bin/ need
# not be on PATH)
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA, NUM_SAMPLES, ALPHA, PASS_SIZE = 0.25, 1000, 0.001, 256
SEEDS = [11, 12, 13, 14, 15, 16, 17, 2**40 + 5]
TARGETS = [0.25, 0.0, 0.1, 0.25, 0.4, 0.25, 1.0, 0.25]  # certify_target requests, per image
CLI_SELECTION = 8  # the CLI export's certify_target: Cohen's statistics, 8 selection draws
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}

# Runs in a fresh interpreter with TensorFlow only: tfcert, TFP and Keras cannot be
# imported, and the repository is not on sys.path.  Writes every answer to a JSON file.
SERVED = r'''
import importlib.util, json, sys
for blocked in ("tfcert", "tensorflow_probability", "keras", "tf_keras"):
    sys.modules[blocked] = None
import numpy as np
import tensorflow as tf

args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("client_rest", args["client"])
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)
x = np.load(args["images"])
seeds = np.asarray(args["seeds"], np.int64)
loaded = tf.saved_model.load(args["export"])
sig = loaded.signatures

def run(name, images, seed=None, target=None):
    extra = {} if seed is None else {"seed": tf.constant(seed)}
    if target is not None:
        extra["target_radius"] = tf.constant(target, tf.float32)
    outputs = sig[name](images=tf.constant(images), **extra)
    return {k: v.numpy().tolist() for k, v in outputs.items()}

def error(name, images, seed=None, target=None):
    try:
        run(name, images, seed, target)
        return ["no error", ""]
    except Exception as err:
        return [type(err).__name__, getattr(err, "message", str(err))]

targets = np.asarray(args["targets"], np.float32)

out = {
    "batch64": run("serving_default", x),
    "batch1": run("serving_default", x[:1]),
    "fresh": [run("serving_default", x[:8]) for _ in range(2)],
    "seeded": [run("certify_seeded", x[:8], seeds) for _ in range(2)],
    "seeded_pair": run("certify_seeded", x[[5, 2]], seeds[[5, 2]]),
    "predict_seeded": run("predict_seeded", x[:8], seeds),
    "predict": run("predict", x[:8]),
    "empty": {k: v.shape.as_list() for k, v in sig["serving_default"](images=x[:0]).items()},
    "batch3": {name: {k: np.shape(v) for k, v in run(
        name, x[:3], seeds[:3] if name.endswith("_seeded") else None,
        targets[:3] if "target" in name else None).items()} for name in sig},
    "target_seeded": [run("certify_target_seeded", x[:8], seeds, targets) for _ in range(2)],
    "target_fresh": run("certify_target", x[:8], target=targets),
}
bad = x[:2].copy()
nan, inf, high, low = (bad.copy() for _ in range(4))
nan[0, 3, 3, 0], inf[1, 0, 0, 0], high[0, 0, 0, 0], low[1, 7, 7, 0] = np.nan, np.inf, 1.01, -0.01
out["errors"] = {
    "nan": error("serving_default", nan), "inf": error("serving_default", inf),
    "above_one": error("serving_default", high), "below_zero": error("serving_default", low),
    "nan_predict": error("predict_seeded", nan, seeds[:2]),
    "image_size": error("serving_default", np.zeros((2, 9, 9, 1), np.float32)),
    "channels": error("serving_default", np.zeros((2, 8, 8, 3), np.float32)),
    "rank": error("serving_default", np.zeros((2, 64), np.float32)),
    "rank_3": error("serving_default", np.zeros((2, 8, 8), np.float32)),
    "rank_5": error("serving_default", np.zeros((2, 8, 8, 1, 1), np.float32)),
    "dtype_int": error("serving_default", np.zeros((2, 8, 8, 1), np.int32)),
    "dtype_double": error("serving_default", np.zeros((2, 8, 8, 1), np.float64)),
    "seed_length": error("certify_seeded", x[:2], seeds[:3]),
    "seed_dtype": error("certify_seeded", x[:2], seeds[:2].astype(np.int32)),
    "target_length": error("certify_target", x[:2], target=targets[:3]),
    "target_nan": error("certify_target_seeded", x[:2], seeds[:2], [0.25, np.nan]),
}
for form in ("instances", "inputs"):
    body = json.loads(json.dumps(client.request_body(x[:8], seeds, "certify_seeded", form)))
    response = json.loads(json.dumps(client.local_predict(args["export"], body)))
    out[f"rest_{form}"] = {k: v.tolist() for k, v in client.parse_response(response).items()}
out["rest_error"] = client.local_predict(args["export"], client.request_body(high))
body = client.request_body(x[:8], seeds, "certify_target_seeded", target_radius=targets)
out["rest_target"] = client.local_predict(args["export"], json.loads(json.dumps(body)))
out["constants"] = {name: getattr(loaded, name).numpy().item() for name in (
    "num_samples", "predict_num_samples", "alpha", "sigma", "num_classes", "pass_size")}
out["constants"]["bound"] = loaded.bound.numpy().decode()
out["constants"]["serving_device"] = loaded.serving_device.numpy().decode()
with open(loaded.config_file.asset_path.numpy().decode()) as f:
    out["asset"] = json.load(f)
randdisc = tf.saved_model.load(args["randdisc"]).signatures["certify_seeded"]
out["randdisc"] = [{k: v.numpy().tolist() for k, v in randdisc(
    images=tf.constant(x[:4]), seed=tf.constant(seeds[:4])).items()} for _ in range(2)]
out["modules"] = sorted(m for m in sys.modules if sys.modules[m] is not None and
                        m.split(".")[0] in ("tfcert", "tensorflow_probability", "keras"))
with open(args["output"], "w") as f:
    json.dump(out, f)
'''


# A fresh TensorFlow-only process: peak memory of a request at n = 100,000 (one image).
BIG = r'''
import json, resource, sys
for blocked in ("tfcert", "tensorflow_probability", "keras", "tf_keras"):
    sys.modules[blocked] = None
import numpy as np
import tensorflow as tf

args = json.loads(sys.argv[1])
sig = tf.saved_model.load(args["export"]).signatures["certify_seeded"]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = sig(images=tf.constant(np.load(args["images"])[:1]), seed=tf.constant([1], tf.int64))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"counts": out["counts"].numpy().tolist(), "growth_mb": (after - before) / 1024}))
'''


def start(command, env: dict = ENV, **kwargs) -> subprocess.Popen:
    """Starts ``command`` in the background (the fixtures overlap their subprocesses)."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def finish(process: subprocess.Popen) -> str:
    """Waits for ``process``; returns its stdout, fails the test on a non-zero exit."""
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


class Trained(NamedTuple):
    model_path: str
    model: keras.Model
    images: np.ndarray  # 64 test digits
    images_path: str


def trained_small_cnn(sigma: float) -> keras.Model:
    """`tfcert.models.small_cnn` trained for 6 epochs (seconds on a CPU) on sklearn digits,
    the train split twice, each copy under Gaussian noise of std ``sigma`` (seed 0)."""
    x, y = data.load_arrays("digits", "train")
    keras.utils.set_random_seed(0)
    noisy = np.concatenate([x, x])
    noisy = noisy + np.random.default_rng(0).normal(0, sigma, noisy.shape).astype(np.float32)
    model = models.small_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(noisy, np.concatenate([y, y]), epochs=6, batch_size=128, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits) -> Trained:
    """small_cnn trained briefly on noisy digits (σ = 0.25), saved as .keras; 64 test images."""
    x_test = digits[2]
    model = trained_small_cnn(SIGMA)
    folder = tmp_path_factory.mktemp("model")
    model.save(folder / "model.keras")
    np.save(folder / "images.npy", x_test[:64])
    return Trained(str(folder / "model.keras"), model, x_test[:64], str(folder / "images.npy"))


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory) -> dict:
    """The exports: ``main`` by `python export ...` from the repository root (n = 1000,
    --serving_device=gpu with an explicit --pass_size; tensorflow_serving shadowed by a
    package that refuses to import; its stdout is ``cli_stdout``), and in-process while
    it runs ``randdisc`` (RandomizedDiscretization, n = 200, no radius, automatic GPU
    pass size) and ``big`` (n = 100,000, serving device cpu by default)."""
    base = tmp_path_factory.mktemp("serving")
    shadow = tmp_path_factory.mktemp("no_serving_api")
    (shadow / "tensorflow_serving").mkdir()
    (shadow / "tensorflow_serving" / "__init__.py").write_text(
        "raise ImportError('tensorflow-serving-api is not installed')\n")
    cli = start([sys.executable, "export", f"--model={trained.model_path}", f"--sigma={SIGMA}",
                 f"--num_samples={NUM_SAMPLES}", f"--alpha={ALPHA}", f"--pass_size={PASS_SIZE}",
                 "--serving_device=gpu", f"--base_dir={base}", "--name=digits",
                 "--dataset=digits", "--target_statistics=cohen",
                 f"--target_selection_samples={CLI_SELECTION}"], env={**ENV, "PYTHONPATH": str(shadow)}, cwd=ROOT)
    paths = {"randdisc": str(base / "randdisc" / "1"), "big": str(base / "big" / "1")}
    randdisc = RandomizedDiscretization(2, 0.15, 0.15)
    export.export_saved_model(SmoothedClassifier(trained.model, 10, randdisc), paths["randdisc"],
                              200, ALPHA, bound="none", serving_device="gpu")
    export.export_saved_model(SmoothedClassifier(trained.model, 10, GaussianNoise(SIGMA)),
                              paths["big"], 100_000, ALPHA, pass_size=512)
    return {**paths, "cli_stdout": finish(cli), "main": str(base / "digits" / "1")}


@pytest.fixture(scope="module")
def served(trained, exports, tmp_path_factory) -> dict:
    """Every answer of the processes that load the exports without tfcert, run at once:
    the SERVED script, the BIG script, ``saved_model_cli show --all`` and ``run``."""
    folder = tmp_path_factory.mktemp("served")
    first8 = folder / "first8.npy"
    np.save(first8, trained.images[:8])
    args = {"export": exports["main"], "randdisc": exports["randdisc"], "seeds": SEEDS,
            "targets": TARGETS,
            "images": trained.images_path, "output": str(folder / "out.json"),
            "client": os.path.join(ROOT, "export", "client_rest.py")}
    processes = {
        "served": start([sys.executable, "-c", SERVED, json.dumps(args)], cwd=str(folder)),
        "big": start([sys.executable, "-c", BIG, json.dumps({**args, "export": exports["big"]})],
                     cwd=str(folder)),
        "show": start([SAVED_MODEL_CLI, "show", "--dir", exports["main"], "--all"]),
        "run": start([SAVED_MODEL_CLI, "run", "--dir", exports["main"], "--tag_set", "serve",
                      "--signature_def", "certify_seeded", "--inputs", f"images={first8}",
                      "--input_exprs", f"seed={SEEDS}", "--outdir", str(folder / "run")]),
    }
    stdout = {name: finish(process) for name, process in processes.items()}
    with open(folder / "out.json") as f:
        out = json.load(f)
    run_outputs = {key: np.load(folder / "run" / f"{key}.npy").tolist() for key in out["seeded"][0]}
    return {**out, "big": json.loads(stdout["big"].strip().splitlines()[-1]),
            "show": stdout["show"], "run": run_outputs}


def arrays(outputs: dict) -> dict:
    return {k: np.asarray(v) for k, v in outputs.items()}


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_loads_and_certifies_in_a_tensorflow_only_process(served):
    assert served["modules"] == []
    assert served["empty"] == {"prediction": [0], "radius": [0], "counts": [0, 10],
                               "p1_lower": [0], "p2_upper": [0]}
    for key, batch in (("batch64", 64), ("batch1", 1)):
        out = arrays(served[key])
        assert out["prediction"].shape == out["radius"].shape == (batch,), key
        assert out["counts"].shape == (batch, 10)
        np.testing.assert_array_equal(out["counts"].sum(axis=1), NUM_SAMPLES)
        certified = out["prediction"] >= 0
        assert np.all(out["radius"][~certified] == 0) and np.all(out["radius"] >= 0)
        assert np.all(certified == (out["p1_lower"] > out["p2_upper"]))
    assert np.mean(arrays(served["batch64"])["prediction"] >= 0) > 0.5


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_agrees_statistically_with_smoothed_classifier_certify(served, trained):
    model, x = trained.model, trained.images
    ref = SmoothedClassifier(model, 10, GaussianNoise(SIGMA)).certify(
        x, NUM_SAMPLES, ALPHA, bound="renyi", batch_size=PASS_SIZE, seed=5)
    out = arrays(served["batch64"])
    margin = (ref.p1_lower - ref.p2_upper > 0.1) & (out["p1_lower"] - out["p2_upper"] > 0.1)
    assert margin.sum() > 30
    np.testing.assert_array_equal(out["prediction"][margin], ref.prediction[margin])
    # Vote frequencies of the reference's top class: two independent binomial estimates.
    top = np.argmax(ref.counts, axis=1)
    p_ref = ref.counts[np.arange(64), top] / NUM_SAMPLES
    p_out = out["counts"][np.arange(64), top] / NUM_SAMPLES
    pooled = (p_ref + p_out) / 2
    assert np.all(np.abs(p_ref - p_out) <= 5 * np.sqrt(2 * pooled * (1 - pooled) / NUM_SAMPLES)
                  + 1e-9)
    assert abs(out["radius"].mean() - ref.radius.mean()) < 0.05 * SIGMA
    assert sps.ks_2samp(out["radius"], ref.radius).pvalue > 1e-3


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_seeded_certificate_equals_the_library_on_the_same_votes(served, trained):
    """Row i's votes are the Python API's votes of image i alone with seed seed_i."""
    model, x = trained.model, trained.images
    smoothed = SmoothedClassifier(model, 10, GaussianNoise(SIGMA))
    out = arrays(served["seeded"][0])
    for i, seed in enumerate(SEEDS):
        votes = smoothed.sample_counts(x[i:i + 1], NUM_SAMPLES, PASS_SIZE, seed=int(seed))
        np.testing.assert_array_equal(out["counts"][i], votes[0])
    p1, p2, top = (np.asarray(v) for v in stats.simultaneous_bounds(out["counts"], ALPHA))
    np.testing.assert_allclose(out["p1_lower"], p1, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["p2_upper"], p2, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(out["prediction"], np.where(p1 > p2, top, -1))
    radius = np.where(p1 > p2, np.asarray(bounds.renyi_radius(p1, p2, SIGMA)), 0.0)
    assert np.all(out["radius"].astype(np.float64) <= radius)  # rounded down to float32
    np.testing.assert_allclose(out["radius"], radius, rtol=1e-6, atol=1e-12)


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_seeded_answers_repeat_per_row_and_unseeded_noise_is_fresh(served):
    first, second = (arrays(s) for s in served["seeded"])
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        # a row's answer does not depend on the rest of the batch
        np.testing.assert_array_equal(arrays(served["seeded_pair"])[key], first[key][[5, 2]])
    fresh = [arrays(s)["counts"] for s in served["fresh"]]
    assert not np.array_equal(fresh[0], fresh[1])
    assert not np.array_equal(fresh[0], first["counts"])


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_predict_is_the_binomial_test_of_top_against_runner_up(served):
    for key in ("predict_seeded", "predict"):
        out = arrays(served[key])
        counts = np.sort(out["counts"], axis=1)
        first, second = counts[:, -1], counts[:, -2]
        expected = [sps.binomtest(int(a), int(a + b)).pvalue for a, b in zip(first, second)]
        np.testing.assert_allclose(out["p_value"], expected, rtol=1e-8)
        top = np.argmax(out["counts"], axis=1)
        np.testing.assert_array_equal(out["prediction"],
                                      np.where(out["p_value"] <= ALPHA, top, -1))
    # same seeds and n: the same votes as the certificate
    np.testing.assert_array_equal(served["predict_seeded"]["counts"], served["seeded"][0]["counts"])


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_every_bad_request_is_rejected_with_invalid_argument(served):
    expected = {"nan": "NaN or Inf", "inf": "NaN or Inf", "nan_predict": "NaN or Inf",
                "above_one": "must be <= 1", "below_zero": "must be >= 0",
                "image_size": "shape [batch, 8, 8, 1]", "channels": "shape [batch, 8, 8, 1]",
                "rank": "shape [batch, 8, 8, 1]", "rank_3": "shape [batch, 8, 8, 1]",
                "rank_5": "shape [batch, 8, 8, 1]", "dtype_int": "expected to be a float",
                "dtype_double": "expected to be a float", "seed_length": "one entry per image",
                "seed_dtype": "expected to be a int64",
                "target_length": "target_radius must have shape [batch]",
                "target_nan": "target_radius contains NaN or Inf"}
    assert set(served["errors"]) == set(expected)
    for case, (kind, message) in served["errors"].items():
        assert kind == "InvalidArgumentError", (case, kind, message)
        assert expected[case] in message, (case, message)
    assert "must be <= 1" in served["rest_error"]["error"]


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_rest_json_round_trip_in_both_forms(served):
    direct = arrays(served["seeded"][0])
    for form in ("instances", "inputs"):
        answer = arrays(served[f"rest_{form}"])
        assert set(answer) == set(direct)
        for key in direct:
            np.testing.assert_array_equal(answer[key], direct[key])


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_constants_attributes_and_config_asset(served, exports, trained):
    want = {"num_samples": NUM_SAMPLES, "predict_num_samples": NUM_SAMPLES, "alpha": ALPHA,
            "sigma": SIGMA, "num_classes": 10, "pass_size": PASS_SIZE, "bound": "renyi",
            "serving_device": "gpu"}
    assert served["constants"] == want
    asset = served["asset"]
    assert {k: asset[k] for k in want} == want
    assert asset["image_shape"] == [8, 8, 1] and asset["noise"]["class_name"] == "GaussianNoise"
    assert asset["model_name"] == "digits" and export.WARMUP_FILE in asset["warmup"]
    assert asset["metadata"]["model_sha256"] == cli.file_sha256(trained.model_path)
    assert export.read_config(exports["main"]) == asset


def _session_replay(path: str, requests: dict) -> dict:
    """Each ``PredictRequest`` run as TF Serving runs its warmup records: the signature
    def's tensors fed and fetched in a TF1 session of the SavedModel."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, ["serve"], path)
        replies = {}
        for name, request in requests.items():
            sig = meta_graph.signature_def[name]
            feeds = {sig.inputs[k].name: tf.make_ndarray(v) for k, v in request.inputs.items()}
            replies[name] = session.run({k: v.name for k, v in sig.outputs.items()}, feeds)
    return replies


@pytest.mark.slow  # shares the ~1 min `exports` setup
def test_warmup_file_holds_one_valid_predict_request_per_signature(exports):
    """TF Serving's SavedModel warmup: a TFRecord of PredictionLog at
    assets.extra/tf_serving_warmup_requests, replayed at load (a failing record fails the
    load).  The CLI wrote it where tensorflow_serving could not be imported."""
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = os.path.join(exports["main"], export.WARMUP_FILE)
    logs = [prediction_log_pb2.PredictionLog.FromString(record)
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(export.SIGNATURES)
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request
                for log in logs}
    assert sorted(requests) == sorted(export.SIGNATURES)
    for name, request in requests.items():
        expected = predict_pb2.PredictRequest()
        expected.model_spec.name, expected.model_spec.signature_name = "digits", name
        expected.inputs["images"].CopyFrom(tf.make_tensor_proto(
            np.full((1, 8, 8, 1), export.WARMUP_PIXEL, np.float32)))
        if name.endswith("_seeded"):
            expected.inputs["seed"].CopyFrom(tf.make_tensor_proto(np.zeros([1], np.int64)))
        if "target" in name:
            expected.inputs["target_radius"].CopyFrom(tf.make_tensor_proto(
                np.zeros([1], np.float32)))
        assert request == expected, name
    for name, outputs in _session_replay(exports["main"], requests).items():
        assert {np.shape(value)[0] for value in outputs.values()} == {1}, name
        # certify_target's num_samples: its estimation draws and the selection draws
        drawn = outputs["num_samples"].sum() - CLI_SELECTION if "target" in name else NUM_SAMPLES
        assert outputs["counts"].sum() == drawn <= NUM_SAMPLES, name


@pytest.mark.slow  # shares the ~1 min `exports` setup
def test_latency_probe_replays_the_warmup_file_and_times_every_signature(exports, trained):
    pytest.importorskip("tensorflow_serving")
    latency = _load_script("latency")
    assert latency.WARMUP_FILE == os.path.join(*export.WARMUP_FILE.split("/"))
    report = latency.measure(exports["main"], trained.images[:2], [1, 2], repeats=1)
    assert sorted(report["warmup"]) == sorted(export.SIGNATURES)
    assert sorted(report["warm"]) == sorted(f"{name} batch={batch}"
                                            for name in export.SIGNATURES for batch in (1, 2))
    for timing in [*report["warmup"].values(), *report["warm"].values()]:
        assert timing["wall_s"] > 0 and timing["cpu_s"] >= 0


def test_prediction_log_encoding_parses_as_the_tensorflow_serving_protos():
    """The hand-encoded wire format: field lengths needing 1, 2 and 3 varint bytes (an
    input of 98 KB), several inputs, a non-ASCII model name."""
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import prediction_log_pb2

    inputs = {"images": np.linspace(0, 1, 2 * 64 * 64 * 3, dtype=np.float32).reshape(2, 64, 64, 3),
              "seed": np.array([7, 2**40 + 5], np.int64)}
    log = prediction_log_pb2.PredictionLog.FromString(
        export.prediction_log("módel-ß", "certify_seeded", inputs))
    expected = prediction_log_pb2.PredictionLog()
    request = expected.predict_log.request
    request.model_spec.name, request.model_spec.signature_name = "módel-ß", "certify_seeded"
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    assert log == expected


def test_serving_device_chooses_the_automatic_pass_size(monkeypatch):
    """cpu: this machine's CPU cache over the activation bytes, gpu: GPU_PASS_MEMORY,
    whatever this machine has (a GPU or not); an explicit batch_size wins."""
    from tfcert import devices

    model, shape = models.stn_mnist(), (28, 28, 1)
    per_input = activation_bytes(model, shape)  # ≈ 0.29 MB: GPU size ≈ 900 < MAX_PASS_SIZE
    gpu = GPU_PASS_MEMORY // per_input
    assert 1 < gpu < MAX_PASS_SIZE
    monkeypatch.setattr(devices, "_cache_sizes", lambda: [4 * per_input])  # a tiny cache
    monkeypatch.setattr(devices, "_free_memory_bytes", lambda: 2 ** 40)  # no memory cap
    for has_gpu in (False, True):  # the exporting machine's devices do not matter
        monkeypatch.setattr(devices.tf.config, "list_physical_devices",
                            lambda kind=None, gpus=["GPU:0"] * has_gpu: gpus)
        smoothed = SmoothedClassifier(model, 10, GaussianNoise(SIGMA))
        assert export.serving_pass_size(smoothed, shape) == 4
        assert export.serving_pass_size(smoothed, shape, "cpu") == 4
        assert export.serving_pass_size(smoothed, shape, "gpu") == gpu
        # while certifying here the classifier uses this machine's device budget
        assert smoothed.pass_size(shape) == (gpu if has_gpu else 4)
    fixed = SmoothedClassifier(model, 10, GaussianNoise(SIGMA), batch_size=48)
    assert export.serving_pass_size(fixed, shape, "gpu") == 48
    with pytest.raises(ValueError, match="serving_device"):
        export.serving_pass_size(smoothed, shape, "tpu")


@pytest.mark.slow  # shares the ~1 min `exports` setup
def test_config_records_serving_device_and_pass_size(exports, trained):
    main, randdisc, big = (export.read_config(exports[k]) for k in ("main", "randdisc", "big"))
    # --serving_device=gpu --pass_size=256: the explicit size wins
    assert (main["serving_device"], main["pass_size"]) == ("gpu", PASS_SIZE)
    gpu = min(GPU_PASS_MEMORY // activation_bytes(trained.model, (8, 8, 1)), MAX_PASS_SIZE)
    assert (randdisc["serving_device"], randdisc["pass_size"]) == ("gpu", gpu)
    assert (big["serving_device"], big["pass_size"]) == ("cpu", 512)


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_every_signature_tensor_has_a_leading_batch_dimension(exports, served):
    """TF Serving's batching concatenates every input along dimension 0 and splits every
    output along it (it fails a batch whose output has no dimension 0 of the batch size)."""
    from tensorflow.core.protobuf import saved_model_pb2

    for key in ("main", "randdisc", "big"):
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(exports[key], "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        signatures = proto.meta_graphs[0].signature_def
        assert sorted(k for k in signatures if not k.startswith("__")) == sorted(export.SIGNATURES)
        for name in export.SIGNATURES:
            sig = signatures[name]
            for tensor, info in [*sig.inputs.items(), *sig.outputs.items()]:
                dims = [d.size for d in info.tensor_shape.dim]
                assert not info.tensor_shape.unknown_rank and dims[:1] == [-1], (key, name, tensor)
    assert sorted(served["batch3"]) == sorted(export.SIGNATURES)
    for name, shapes in served["batch3"].items():
        assert {shape[0] for shape in shapes.values()} == {3}, (name, shapes)


def _batching_parameters_class():
    """The BatchingParameters fields the example file sets, with the field numbers of
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto (not in the
    tensorflow-serving-api wheel)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="test_export/batching.proto", package="test_export", syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name])
    message = file.message_type.add(name="BatchingParameters")
    for number, name in enumerate(("max_batch_size", "batch_timeout_micros",
                                   "max_enqueued_batches", "num_batch_threads"), start=1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          label=field.LABEL_OPTIONAL, type_name=".google.protobuf.Int64Value")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(
        "test_export.BatchingParameters"))


def test_batching_parameters_example_and_server_flags_are_documented():
    from google.protobuf import text_format

    with open(os.path.join(ROOT, "export", "batching_parameters.txt")) as f:
        parameters = text_format.Parse(f.read(), _batching_parameters_class()())  # no other fields
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                 "num_batch_threads"):
        assert parameters.HasField(name), name
    assert parameters.max_batch_size.value >= 1 and parameters.num_batch_threads.value >= 1
    assert parameters.max_enqueued_batches.value >= 1
    # a digits certificate at n = 100,000 takes ≈ 0.5 s here (export/README.md §3.4):
    # waiting up to 10 ms for batch-mates adds at most 2%
    assert 0 <= parameters.batch_timeout_micros.value <= 10_000
    with open(os.path.join(ROOT, "export", "README.md")) as f:
        readme = f.read()
    for flag in ("--enable_batching", "--batching_parameters_file=", "--rest_api_timeout_in_ms=",
                 "--enable_model_warmup", "tf_serving_warmup_requests", "--serving_device=gpu"):
        assert flag in readme, flag


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_cli_prints_signatures_and_versioned_path(exports):
    path, stdout = exports["main"], exports["cli_stdout"]
    assert path.endswith(os.path.join("digits", "1"))
    assert f"SavedModel written to {path}" in stdout
    for name in export.SIGNATURES:
        assert f"signature_def['{name}']" in stdout
    assert "inputs['seed']: int64 (-1,)" in stdout and "outputs['radius']: float32 (-1,)" in stdout
    assert f"pass_size={PASS_SIZE} (serving_device=gpu)" in stdout
    looks = StoppingRule(0.0).looks(NUM_SAMPLES)  # --stopping_method=mixture by default
    assert f"certify_target: mixture, {len(looks)} looks [{looks[0]}, " in stdout
    assert f"{NUM_SAMPLES}], Cohen's statistics with {CLI_SELECTION} selection draws" in stdout
    assert f"warmup: {export.WARMUP_FILE}, one request per signature for model 'digits'" in stdout


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_randdisc_export_runs_seeded_without_a_radius(served):
    first, second = (arrays(r) for r in served["randdisc"])
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    np.testing.assert_array_equal(first["counts"].sum(axis=1), 200)
    np.testing.assert_array_equal(first["radius"], 0.0)


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_graph_has_the_loop_and_certificate_and_no_pyfunc_or_xla(exports):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exports["main"], "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    nodes = [*graph.node, *(n for fn in graph.library.function for n in fn.node_def)]
    ops = {n.op for n in nodes}
    assert {"While", "Betainc", "StatelessRandomNormalV2", "RandomUniformInt"} <= ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaLaunch", "_XlaCompile",
                      "_XlaRun"}
    assert not any(n.attr["_XlaMustCompile"].b for n in nodes if "_XlaMustCompile" in n.attr)
    assert not any(fn.attr["_XlaMustCompile"].b for fn in graph.library.function
                   if "_XlaMustCompile" in fn.attr)
    assert export.forbidden_ops(exports["main"]) == set()


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_every_serving_op_has_a_gpu_kernel(exports):
    """TF Serving's GPU image can place the whole sampling loop and certificate on the GPU."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import kernels

    if not any(k.device_type == "GPU" for k in kernels.get_registered_kernels_for_op(
            "MatMul").kernel):
        pytest.skip("this TensorFlow build has no GPU kernels")
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(exports["main"], "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = {fn.signature.name: fn for fn in proto.meta_graphs[0].graph_def.library.function}
    todo = [name for name in library if "signature_wrapper" in name]
    seen, ops = set(todo), set()
    while todo:  # every function reachable from the signatures (loop bodies, branches)
        for node in library[todo.pop()].node_def:
            called = [v.func.name for v in node.attr.values() if v.HasField("func")]
            called += [f.name for v in node.attr.values() for f in v.list.func]
            for name in [node.op, *called]:
                if name in library and name not in seen:
                    seen.add(name)
                    todo.append(name)
            if node.op not in library:
                ops.add(node.op)
    devices = {op: {k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel}
               for op in ops}
    assert {op for op, d in devices.items() if not d & {"GPU", "DEFAULT"}} == set()
    assert {"Conv2D", "Betainc", "StatelessRandomNormalV2", "While"} <= ops


class _Escaping(keras.Model):
    """A base model whose call leaves the graph (py_function) and forces XLA."""

    def __init__(self):
        super().__init__(name="escaping")
        self.dense = keras.layers.Dense(2)
        self.xla = tf.function(lambda v: v * 1.0, jit_compile=True)

    def call(self, x, training=None):
        logits = self.xla(self.dense(tf.reshape(x, [-1, 16])))
        out = tf.py_function(lambda v: v, [logits], tf.float32)
        out.set_shape(logits.shape)
        return out


@pytest.mark.slow
def test_export_refuses_python_functions_and_xla(tmp_path):
    model = _Escaping()
    model(tf.zeros([1, 4, 4, 1]))
    smoothed = SmoothedClassifier(model, 2, GaussianNoise(0.5))
    with pytest.raises(ValueError, match="must not run") as error:
        export.export_saved_model(smoothed, str(tmp_path / "1"), 10, 0.01, image_shape=(4, 4, 1))
    assert "EagerPyFunc" in str(error.value) and "_XlaMustCompile" in str(error.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_saved_model_cli_show_lists_every_signature(served):
    for name in export.SIGNATURES:
        assert f"signature_def['{name}']" in served["show"]
    for line in ("inputs['images'] tensor_info:", "dtype: DT_FLOAT", "shape: (-1, 8, 8, 1)",
                 "inputs['seed'] tensor_info:", "outputs['prediction'] tensor_info:"):
        assert line in served["show"]


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_saved_model_cli_run_gives_the_seeded_answers(served):
    """saved_model_cli loads through the TF1 session path, as TF Serving does."""
    assert served["run"] == served["seeded"][0]


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_hundred_thousand_samples_run_in_bounded_memory(served):
    np.testing.assert_array_equal(np.sum(served["big"]["counts"], axis=1), 100_000)
    # All 100,000 noisy copies at once would take > 600 MB in the two conv layers alone.
    assert served["big"]["growth_mb"] < 300


def test_versioned_path_and_no_overwrite(tmp_path):
    base = str(tmp_path)
    assert export.versioned_path(base, "m") == os.path.join(base, "m", "1")
    for name in ("1", "7", "notes", ".7.partial-x"):
        os.makedirs(os.path.join(base, "m", name))
    assert export.versioned_path(base, "m") == os.path.join(base, "m", "8")
    assert export.versioned_path(base, "m", 3) == os.path.join(base, "m", "3")
    with pytest.raises(ValueError, match="model name"):
        export.versioned_path(base, "../m")
    open(os.path.join(base, "m", "7", "saved_model.pb"), "w").close()
    smoothed = SmoothedClassifier(models.small_cnn(), 10, GaussianNoise(SIGMA))
    with pytest.raises(FileExistsError):
        export.export_saved_model(smoothed, os.path.join(base, "m", "7"), 10, ALPHA)


def test_export_argument_checks(tmp_path):
    model = models.small_cnn()
    smoothed = SmoothedClassifier(model, 10, GaussianNoise(SIGMA))
    path = str(tmp_path / "1")
    for kwargs, message in (({"bound": "lp"}, "unknown bound"), ({"alpha": 1.0}, "alpha"),
                            ({"num_samples": 0}, "num_samples"), ({"pass_size": 0}, "pass_size"),
                            ({"serving_device": "tpu"}, "serving_device"),
                            ({"target_statistics": "bonferroni"}, "statistics"),
                            ({"target_statistics": "cohen", "target_selection_samples": 0},
                             "target_selection_samples")):
        args = {"num_samples": 10, "alpha": ALPHA, **kwargs}
        with pytest.raises(ValueError, match=message):
            export.export_saved_model(smoothed, path, **args)
    randdisc = SmoothedClassifier(model, 10, RandomizedDiscretization(2, 0.15, 0.15))
    with pytest.raises(ValueError, match="GaussianNoise"):
        export.export_saved_model(randdisc, path, 10, ALPHA, bound="renyi")
    assert not os.path.exists(path)


# An exporter that has started its partial folder (as `export_saved_model` does) and is
# still writing: prints the folder, then waits to be killed.
EXPORTER = r'''
import os, sys, time
from tfcert.export import saved_model
partial, lock = saved_model._start_partial(sys.argv[1], sys.argv[2])
os.makedirs(os.path.join(partial, "saved_model", "variables"))
print(partial, flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_a_killed_exports_partial_folder_is_removed_by_the_next_export_a_running_ones_kept(
        tmp_path):
    """Issue 25: a killed export left a hidden ``.<version>.partial-*`` folder for good."""
    parent = tmp_path / "m"
    parent.mkdir()
    exporters = [subprocess.Popen([sys.executable, "-c", EXPORTER, str(parent), version],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
                 for version in ("3", "4")]
    try:
        killed, running = [process.stdout.readline().strip() for process in exporters]
        assert killed and running, [process.stderr.read()[-2000:] for process in exporters]
        exporters[0].kill()
        exporters[0].wait()
        old = parent / ".2.partial-k1ll3d"  # as a killed export of an earlier tfcert left it
        (old / "saved_model").mkdir(parents=True)
        (old / "tfcert_config.json").write_text("{}")
        smoothed = SmoothedClassifier(models.small_cnn(), 10, GaussianNoise(SIGMA))
        export.export_saved_model(smoothed, str(parent / "5"), 10, ALPHA)
        assert sorted(os.listdir(parent)) == sorted(["5", os.path.basename(running)])
        assert os.path.isdir(os.path.join(running, "saved_model", "variables"))
    finally:
        for process in exporters:
            process.kill()
            process.communicate()
    partial, lock = saved_model._start_partial(str(parent), "6")  # once it is gone, it goes too
    lock.close()
    assert sorted(os.listdir(parent)) == sorted(["5", os.path.basename(partial)])


def _load_script(name: str):
    """export/<name>.py as a module (the folder is not a package; as when run as a script,
    its own folder is on sys.path)."""
    sys.path.insert(0, os.path.join(ROOT, "export"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "export", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def test_rest_request_body_shapes():
    client = _load_script("client_rest")
    x = np.zeros((2, 8, 8, 1), np.float32)
    rows = client.request_body(x, [4, 5], "certify_seeded")
    assert rows["signature_name"] == "certify_seeded" and len(rows["instances"]) == 2
    assert rows["instances"][1]["seed"] == 5
    assert np.shape(rows["instances"][0]["images"]) == (8, 8, 1)
    columns = client.request_body(x, form="inputs")
    assert columns == {"signature_name": "serving_default", "inputs": {"images": x.tolist()}}
    with pytest.raises(ValueError, match="one seed per image"):
        client.request_body(x, signature="predict_seeded")
    targets = client.request_body(x, [4, 5], "certify_target_seeded", target_radius=0.25)
    assert [row["target_radius"] for row in targets["instances"]] == [0.25, 0.25]
    columns = client.request_body(x, signature="certify_target", form="inputs",
                                  target_radius=[0.5, 0.0])
    assert columns["inputs"]["target_radius"] == [0.5, 0.0] and "seed" not in columns["inputs"]
    with pytest.raises(ValueError, match="one target_radius per image"):
        client.request_body(x, signature="certify_target")
    with pytest.raises(ValueError, match="no target_radius"):
        client.request_body(x, [4, 5], "certify_seeded", target_radius=0.25)
    with pytest.raises(ValueError, match="got 3 target_radius values for 2 images"):
        client.request_body(x, signature="certify_target", target_radius=[0.1, 0.2, 0.3])


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_grpc_client_and_models_config(exports, served, trained):
    """Needs tensorflow-serving-api (the gRPC client's dependency)."""
    pytest.importorskip("tensorflow_serving")
    from google.protobuf import text_format
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(ROOT, "export", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "tfcert", "/models/tfcert", "tensorflow")
    client = _load_script("client_grpc")
    signatures = tf.saved_model.load(exports["main"]).signatures
    for name, targets, expected in (("certify_seeded", None, served["seeded"][0]),
                                    ("certify_target_seeded", TARGETS,
                                     served["target_seeded"][0])):
        request = client.build_request("tfcert", trained.images[:8], SEEDS, name,
                                       target_radius=targets)
        request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        signature = signatures[request.model_spec.signature_name]
        outputs = signature(**{k: tf.constant(tf.make_ndarray(v))
                               for k, v in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        for key, value in client.parse_response(response).items():
            np.testing.assert_array_equal(value, expected[key], err_msg=f"{name} {key}")


@pytest.mark.slow
def test_export_entry_point_imports_its_own_checkout(tmp_path):
    """Issue: `python export` imported whatever tfcert came first on sys.path."""
    impostor = tmp_path / "tfcert"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the wrong tfcert')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # ahead of site-packages
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export"), "--sigma=0.5"],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert "the wrong tfcert" not in proc.stderr
    assert proc.returncode == 1 and "--model is required" in proc.stderr


# ------------------------------------------ certify_target: early stopping in the graph
TARGET_SAMPLES = 2000  # n of the exports below
# The rule of each export below: `digits` the default (mixture, looks 32, 36, 40, …, 2000),
# `checkpoints` looks 100, 200, 400, 800, 1600, 2000 (so its images stop at several),
# `linear` the betting sequence from 100 draws (every +10%; 100 draws certify every image
# of `test_a_request_decided_at_the_first_look_stops_the_loop`): each method in a graph.
RULES = {"digits": StoppingRule(0.0),
         "checkpoints": StoppingRule(0.0, "checkpoints", first_look=100),
         "linear": StoppingRule(0.0, "betting", first_look=100)}
LINEAR_SIGMA, LINEAR_SAMPLES, LINEAR_ALPHA = 0.5, 4000, 1e-4


class TargetExports(NamedTuple):
    digits: SmoothedClassifier  # the trained digits CNN, σ = SIGMA (exports digits, checkpoints)
    linear: SmoothedClassifier  # the linear classifier of `linear_problem`, σ = 0.5
    paths: dict                 # name → SavedModel directory
    signatures: dict            # name → the loaded signatures


@pytest.fixture(scope="module")
def target_exports(trained, linear_problem, tmp_path_factory) -> TargetExports:
    """``digits``, ``checkpoints``: n = 2,000, Rényi radius; ``linear``: n = 4,000,
    α = 1e-4, Cohen's radius (exact for a linear classifier); rules `RULES`."""
    folder = tmp_path_factory.mktemp("target")
    digits = SmoothedClassifier(trained.model, 10, GaussianNoise(SIGMA))
    linear = SmoothedClassifier(linear_problem[0], 2, GaussianNoise(LINEAR_SIGMA))
    paths = {name: str(folder / name) for name in RULES}
    for name in ("digits", "checkpoints"):
        export.export_saved_model(digits, paths[name], TARGET_SAMPLES, ALPHA,
                                  pass_size=PASS_SIZE, early_stopping=RULES[name])
    export.export_saved_model(linear, paths["linear"], LINEAR_SAMPLES, LINEAR_ALPHA,
                              bound="cohen", pass_size=512, early_stopping=RULES["linear"])
    return TargetExports(digits, linear, paths,
                         {k: tf.saved_model.load(v).signatures for k, v in paths.items()})


def target_request(signatures, images, targets, seeds=None) -> dict:
    """The answer of ``certify_target_seeded`` (``certify_target`` without seeds)."""
    inputs = {"images": tf.constant(images, tf.float32),
              "target_radius": tf.constant(targets, tf.float32)}
    if seeds is None:
        return arrays({k: v.numpy() for k, v in signatures["certify_target"](**inputs).items()})
    inputs["seed"] = tf.constant(seeds, tf.int64)
    return arrays({k: v.numpy() for k, v in signatures["certify_target_seeded"](**inputs).items()})


def float32_down(x: np.ndarray) -> np.ndarray:
    """float64 → float32 rounded down, as the export rounds its radii."""
    y = np.asarray(x, np.float64).astype(np.float32)
    return np.where(y.astype(np.float64) > x, np.nextafter(y, np.float32(0)), y)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.slow
def test_certify_target_equals_the_python_api_on_the_same_seeds(target_exports, trained,
                                                                linear_problem, name):
    """Image i with seed s_i: the answer of ``sc.certify(x[i:i+1], early_stopping=rule,
    seed=s_i)`` with the export's rule (each method), field by field, whatever else is in
    the request: the graph runs the same `tfcert.sequential.look`."""
    if name == "linear":
        smoothed, n, alpha, bound, batch_size = (target_exports.linear, LINEAR_SAMPLES,
                                                 LINEAR_ALPHA, "cohen", 512)
        x, targets = linear_problem[1][:8], np.float32([0.1, 0.25, 0.4, 0.0, 0.3, 0.2, 0.5, 0.1])
    else:
        smoothed, n, alpha, bound, batch_size = (target_exports.digits, TARGET_SAMPLES, ALPHA,
                                                 "renyi", PASS_SIZE)
        x, targets = trained.images[:8], np.float32(TARGETS)
    out = target_request(target_exports.signatures[name], x, targets, SEEDS)
    for i, seed in enumerate(SEEDS):
        rule = dataclasses.replace(RULES[name], target_radius=float(targets[i]))
        ref = smoothed.certify(x[i:i + 1], n, alpha, bound, batch_size=batch_size,
                               early_stopping=rule, seed=seed)
        for key in ("prediction", "num_samples", "counts"):
            np.testing.assert_array_equal(out[key][i], getattr(ref, key)[0], err_msg=f"{key} {i}")
        assert_same_bounds({key: out[key][i] for key in BOUND_KEYS},
                           {"p1_lower": ref.p1_lower[0], "p2_upper": ref.p2_upper[0],
                            "radius": float32_down(ref.radius)[0]})
    # the looks really stop per image: several stopping looks, most before the last
    assert len(set(out["num_samples"])) >= 3 and np.sum(out["num_samples"] < n) >= 5
    np.testing.assert_array_equal(out["counts"].sum(axis=1), out["num_samples"])
    pair = target_request(target_exports.signatures[name], x[[5, 2]], targets[[5, 2]],
                          np.asarray(SEEDS)[[5, 2]])
    for key in ("prediction", "num_samples", "counts"):
        np.testing.assert_array_equal(pair[key], out[key][[5, 2]])
    assert_same_bounds(pair, {key: out[key][[5, 2]] for key in BOUND_KEYS})


BOUND_KEYS = ("p1_lower", "p2_upper", "radius")


def assert_same_bounds(ours: dict, reference: dict) -> None:
    """p1_lower, p2_upper and radius equal up to the last bits of the bisections.

    Eigen evaluates float64 ``log`` / ``lgamma`` on its SIMD path or its scalar path
    depending on an element's position in the vector, and the two may differ in the last
    bit; so a confidence-sequence bound computed in a request of other images than the
    reference's may move by a few ulps (measured: 2 ulps of p2_upper, 1.1e-16).  1e-12
    absolute on the bounds (the bisection's sensitivity to a last-bit change of log E is
    far below it) and 1e-6 relative on the float32 radius (a few float32 ulps).
    Predictions, sample counts and votes are compared exactly."""
    for key in ("p1_lower", "p2_upper"):
        np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(ours["radius"], reference["radius"], rtol=1e-6, atol=0)


def _tie_image(model: keras.Model) -> np.ndarray:
    """An image on the decision boundary w·x + b = 0 of the linear classifier."""
    weights, bias = model.layers[-1].get_weights()
    w, b = weights[:, 1].astype(np.float64), float(bias[1])
    x = np.full(w.size, 0.5) - (0.5 * w.sum() + b) * w  # ‖w‖ = 1
    assert np.all((x >= 0) & (x <= 1))
    return x.reshape(1, *SHAPE).astype(np.float32)


@pytest.mark.slow
def test_easy_images_stop_early_and_an_undecidable_one_uses_every_sample(target_exports,
                                                                         linear_problem):
    model, x, _, exact = linear_problem
    easy = np.flatnonzero(exact > 0.6)[:4]  # certified at r = 0.25 after a few hundred draws
    images = np.concatenate([x[easy], _tie_image(model)])
    # target 0 on the tie: the reachable radius is never below it, so no futility stop
    out = target_request(target_exports.signatures["linear"], images, [0.25] * 4 + [0.0],
                         [1, 2, 3, 4, 5])
    assert np.all(out["num_samples"][:4] < LINEAR_SAMPLES // 4)
    assert np.all(out["radius"][:4] >= 0.25)
    assert out["num_samples"][4] == LINEAR_SAMPLES and out["prediction"][4] == -1
    np.testing.assert_array_equal(out["counts"].sum(axis=1), out["num_samples"])


@pytest.mark.slow
def test_a_request_decided_at_the_first_look_stops_the_loop(target_exports, linear_problem):
    """Images far from the boundary and target 0: all certified at the first look, so
    the loop ends there (with fresh noise too)."""
    _, x, label, exact = linear_problem
    far = np.argsort(exact)[-6:]  # exact radii 0.62-0.78: p(1) >= Φ(1.24) ≈ 0.89 at σ = 0.5
    looks = export.read_config(target_exports.paths["linear"])["target_looks"]
    for seeds in (np.arange(6), None):
        out = target_request(target_exports.signatures["linear"], x[far], np.zeros(6), seeds)
        np.testing.assert_array_equal(out["num_samples"], looks[0])
        np.testing.assert_array_equal(out["counts"].sum(axis=1), looks[0])
        np.testing.assert_array_equal(out["prediction"], label[far])


@pytest.mark.slow
def test_bad_target_radius_is_invalid_argument(target_exports, trained):
    x, signatures = tf.constant(trained.images[:2]), target_exports.signatures["digits"]
    cases = {"length": ([0.25, 0.25, 0.25], "target_radius must have shape [batch]"),
             "rank": ([[0.25], [0.25]], "target_radius must have shape [batch]"),
             "scalar": (0.25, "target_radius must have shape [batch]"),
             "nan": ([0.25, np.nan], "target_radius contains NaN or Inf"),
             "inf": ([np.inf, 0.25], "target_radius contains NaN or Inf"),
             "negative": ([0.25, -0.1], "target_radius must be >= 0")}
    for name, extra in (("certify_target", {}),
                        ("certify_target_seeded", {"seed": tf.constant([1, 2], tf.int64)})):
        for case, (targets, message) in cases.items():
            with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
                signatures[name](images=x, target_radius=tf.constant(targets, tf.float32),
                                 **extra)


@pytest.mark.slow
def test_target_signatures_have_core_ops_only_and_the_schedule_in_the_config(target_exports):
    for key, path in target_exports.paths.items():
        assert export.forbidden_ops(path) == set(), key
        assert {"certify_target", "certify_target_seeded"} <= set(
            target_exports.signatures[key])
    for name in ("digits", "checkpoints"):
        config, rule = export.read_config(target_exports.paths[name]), RULES[name]
        plan = rule.plan(TARGET_SAMPLES, ALPHA)
        assert config["stopping_method"] == rule.method
        assert config["target_looks"] == list(plan.looks) == list(rule.looks(TARGET_SAMPLES))
        assert config["target_levels"] == list(plan.levels)
        assert config["target_final_level"] == plan.final_level
        assert config["futility_level"] == rule.futility_level
        assert config["prior"] == list(rule.prior)
        assert config["target_statistics"] == "simultaneous"
        assert config["target_selection_samples"] == 0
    checkpoints = export.read_config(target_exports.paths["checkpoints"])
    assert checkpoints["target_looks"] == [100, 200, 400, 800, 1600, 2000]
    # 1e-15: a float64 sum of 6 shares of α = 1e-3 rounds by < 6 · 2**-53 · 1e-3
    assert abs(sum(checkpoints["target_levels"]) - ALPHA) < 1e-15
    mixture = export.read_config(target_exports.paths["digits"])
    assert mixture["target_looks"][:3] == [32, 36, 40] and mixture["target_final_level"] > 0
    # the sequence holds at every look at one level; with the final share, α in all
    assert set(mixture["target_levels"]) == {mixture["target_levels"][-1]}
    assert mixture["target_levels"][-1] + mixture["target_final_level"] == pytest.approx(
        ALPHA, rel=1e-15)


def test_certify_target_is_sound_on_a_linear_classifier(target_exports, linear_problem):
    """No certificate beyond the exact radius |w·x + b| (‖w‖ = 1), never a wrong class,
    and far fewer draws than n."""
    _, x, label, exact = linear_problem
    out = target_request(target_exports.signatures["linear"], x, np.full(len(x), 0.25),
                         np.arange(len(x)))
    certified = out["prediction"] >= 0
    np.testing.assert_array_equal(out["prediction"][certified], label[certified])
    # 1e-9: float32 model arithmetic and float64 rounding (as test_sequential)
    assert np.all(out["radius"] <= exact + 1e-9) and np.all(out["radius"][~certified] == 0)
    # as test_sequential: nearly the fixed-n certified accuracy at the target, for far
    # fewer draws (measured with the betting rule of `RULES`: 1,270 draws per image of
    # 4,000; test_sequential's bound, half of n, as the weakest method's)
    fixed = target_exports.linear.certify(x, LINEAR_SAMPLES, LINEAR_ALPHA, bound="cohen",
                                          batch_size=512, seed=4)
    at_target = {name: np.mean((prediction == label) & (radius >= 0.25)) for name, prediction,
                 radius in (("early", out["prediction"], out["radius"]),
                            ("fixed", fixed.prediction, fixed.radius))}
    assert at_target["early"] >= at_target["fixed"] - 0.05
    assert out["num_samples"].mean() < 0.5 * LINEAR_SAMPLES


@pytest.mark.slow  # shares the ~1 min `served` setup
def test_target_signatures_in_a_tensorflow_only_process(served, trained):
    """The CLI export's certify_target_seeded (n = 1,000, Cohen's statistics with
    CLI_SELECTION selection draws) without tfcert: repeatable, the library's sequential
    answers, the same through the REST JSON mapping."""
    first, second = (arrays(s) for s in served["target_seeded"])
    default = StoppingRule(0.0)  # the CLI's --stopping_method=mixture and its schedule
    assert served["asset"]["stopping_method"] == "mixture"
    assert served["asset"]["target_looks"] == list(default.looks(NUM_SAMPLES))
    assert served["asset"]["target_statistics"] == "cohen"
    assert served["asset"]["target_selection_samples"] == CLI_SELECTION
    smoothed = SmoothedClassifier(trained.model, 10, GaussianNoise(SIGMA))
    for i, seed in enumerate(SEEDS):
        ref = certify_sequential(smoothed, trained.images[i:i + 1], NUM_SAMPLES,
                                 StoppingRule(TARGETS[i]), ALPHA, statistics="cohen",
                                 num_selection_samples=CLI_SELECTION,
                                 batch_size=PASS_SIZE, seed=seed)
        for key in ("prediction", "num_samples", "counts"):
            np.testing.assert_array_equal(first[key][i], getattr(ref, key)[0], err_msg=key)
    rest = client_rows(served["rest_target"])
    for key in first:
        np.testing.assert_array_equal(second[key], first[key])
        np.testing.assert_array_equal(rest[key], first[key])
    fresh = arrays(served["target_fresh"])  # num_samples: the selection draws too
    np.testing.assert_array_equal(fresh["counts"].sum(axis=1) + CLI_SELECTION,
                                  fresh["num_samples"])
    assert np.all(fresh["num_samples"] <= NUM_SAMPLES + CLI_SELECTION)


def client_rows(response: dict) -> dict:
    """Output name → array of a row-format REST response."""
    rows = response["predictions"]
    return {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
