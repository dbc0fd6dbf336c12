"""Calibrated pass size (tfcert.pass_sizes): the choice, the cache, its key, the cap, the
opt-outs, and votes that never depend on it.  Rates are injected (a fake clock), except in
`test_the_real_default_path`, which only checks what holds whatever the timings."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcert import devices, pass_sizes
from tfcert.keys import noise_block_size
from tfcert.layers import GaussianNoise
from tfcert.smoothing import SmoothedClassifier

SHAPE = (4, 4, 1)
NUM_SAMPLES = 10_000  # per image: more than a calibration of 8 images needs (asserted below)
IMAGES = np.random.default_rng(0).random((8, *SHAPE)).astype(np.float32)


def small_model(units: int = 2) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                             keras.layers.Dense(units)])


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on (conftest turns it off for the other tests), cache in ``tmp_path``."""
    monkeypatch.setenv(pass_sizes.MODE_ENV, "calibrate")
    monkeypatch.setenv(pass_sizes.CACHE_DIR_ENV, str(tmp_path))
    return tmp_path / pass_sizes.CACHE_FILE


def fake_rates(monkeypatch, rates: dict[int, float]) -> list[int]:
    """`pass_sizes.measure` on a fake clock: a chunk at pass size s takes draws / rates[s]
    seconds.  Returns the list of pass sizes measured (one entry per calibration)."""
    real_measure, calls = pass_sizes.measure, []

    def measure(run, chunks):
        now = [0.0]

        def timed(size, draws):
            classified = run(size, draws)
            now[0] += classified / rates[size]
            return classified

        calls.append(sorted(chunks))
        return real_measure(timed, chunks, clock=lambda: now[0])

    monkeypatch.setattr(pass_sizes, "measure", measure)
    return calls


def no_measuring(monkeypatch):
    def measure(run, chunks):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(pass_sizes, "measure", measure)


def test_candidates_chunks_and_the_choice():
    assert pass_sizes.candidates(113, 1808) == [32, 64, 128, 256, 512, 1024]
    assert pass_sizes.candidates(1706, 4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert pass_sizes.candidates(3, 48) == [1, 2, 4, 8, 16, 32]  # ResNet50-like
    assert pass_sizes.candidates(1, 1) == [1]
    assert pass_sizes.chunk_draws(64, 8, 16) == 128  # 1,024 draws over 8 images
    assert pass_sizes.chunk_draws(4096, 8, 16) == 512
    assert pass_sizes.chunk_draws(64, 1000, 16) == 16  # one noise block per image
    # the median, not the mean: one slow measurement (another job) does not decide
    assert pass_sizes.fastest({64: [10, 10, 10], 128: [11, 11, 1], 256: [9, 12, 12]}) == 256
    # relative to its round: 128 is 10% faster in every round, whatever the load
    assert pass_sizes.fastest({64: [100, 50, 100], 128: [110, 55, 110], 256: [40, 100, 40]}) == 128
    assert pass_sizes.fastest({64: [5.0], 128: [5.0]}) == 64  # a tie: the smaller pass


def test_measure_times_interleaved_rounds_after_an_untimed_warm_up():
    now, order = [0.0], []

    def run(size, draws):
        order.append(size)
        now[0] += draws / {64: 100.0, 128: 200.0}[size]
        return draws

    rates = pass_sizes.measure(run, {64: 10, 128: 20}, clock=lambda: now[0])
    assert order == [64, 128] * (1 + pass_sizes.ROUNDS)
    # rel 1e-12: float64 rounding of the fake clock's differences (sums of ~0.1 s steps)
    assert rates == {64: pytest.approx([100.0] * pass_sizes.ROUNDS, rel=1e-12),
                     128: pytest.approx([200.0] * pass_sizes.ROUNDS, rel=1e-12)}


def test_calibration_chooses_the_fastest_size_and_caches_it(calibrating, monkeypatch):
    calls = fake_rates(monkeypatch, {64: 1e5, 128: 1.1e5, 256: 1.3e5, 512: 1.2e5,
                                     1024: 1e5, 2048: 1e5, 4096: 1e5})
    sc = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    memory_size = sc.pass_size(SHAPE)
    assert memory_size == SmoothedClassifier(small_model(), 2, GaussianNoise(0.5),
                                             auto_pass_size="memory").pass_size(SHAPE)
    sc.sample_counts(IMAGES[:1], 100, seed=0)  # too few draws: no calibration
    assert not calls and sc.pass_size(SHAPE) == memory_size and not calibrating.exists()
    counts = sc.sample_counts(IMAGES, NUM_SAMPLES, seed=0)
    assert len(calls) == 1 and sc.pass_size(SHAPE) == 256
    np.testing.assert_array_equal(counts, sc.sample_counts(IMAGES, NUM_SAMPLES, batch_size=64,
                                                           seed=0))
    entry, = json.loads(calibrating.read_text()).values()
    assert entry["pass_size"] == 256 and entry["model"] == sc.base_model.name
    sc.sample_counts(IMAGES, NUM_SAMPLES, seed=0)
    assert len(calls) == 1  # in memory
    # another process, the same architecture with other weights: the file, no measuring
    no_measuring(monkeypatch)
    other = small_model()
    other.set_weights([w + 1.0 for w in other.get_weights()])
    fresh = SmoothedClassifier(other, 2, GaussianNoise(0.25))
    assert fresh.pass_size(SHAPE) == 256
    fresh.sample_counts(IMAGES, NUM_SAMPLES, seed=0)


def test_another_model_shape_or_dtype_is_calibrated_anew(calibrating, monkeypatch):
    calls = fake_rates(monkeypatch, {2 ** k: 1e5 * (2 ** k == 128) + 1.0 for k in range(13)})
    SmoothedClassifier(small_model(), 2, GaussianNoise(0.5)).sample_counts(IMAGES, NUM_SAMPLES)
    assert len(calls) == 1
    for sc, shape in ((SmoothedClassifier(small_model(3), 3, GaussianNoise(0.5)), SHAPE),
                      (SmoothedClassifier(small_model(), 2, GaussianNoise(0.5),
                                          compute_dtype="bfloat16"), SHAPE)):
        assert sc.pass_size(shape) != 128
        sc.sample_counts(IMAGES, NUM_SAMPLES)
        assert sc.pass_size(shape) == 128
    assert len(calls) == 3 and len(json.loads(calibrating.read_text())) == 3
    keys = {pass_sizes.calibration_key(small_model(), shape, "float32")
            for shape in (SHAPE, (8, 8, 1), (4, 4, 3))}
    assert len(keys) == 3


def test_an_unreadable_cache_is_ignored_with_a_warning_and_rewritten(calibrating,
                                                                     monkeypatch):
    calls = fake_rates(monkeypatch, {2 ** k: 1e5 * (2 ** k == 512) + 1.0 for k in range(13)})
    calibrating.write_text('{"truncated": ')
    sc = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    with pytest.warns(UserWarning, match="ignoring the pass size cache"):
        sc.sample_counts(IMAGES, NUM_SAMPLES, seed=0)
    assert len(calls) == 1 and sc.pass_size(SHAPE) == 512
    entry, = json.loads(calibrating.read_text()).values()
    assert entry["pass_size"] == 512
    assert [name for name in os.listdir(calibrating.parent)] == [pass_sizes.CACHE_FILE]
    calibrating.write_text("[1, 2]")  # valid JSON, not a cache
    with pytest.warns(UserWarning, match="not a JSON object"):
        assert pass_sizes.lookup("any") is None


def test_the_memory_cap_bounds_candidates_and_cached_sizes(calibrating, monkeypatch):
    sc = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    per_input = devices.activation_bytes(sc.inference_model, SHAPE)
    monkeypatch.setattr("tfcert.smoothing.pass_memory_cap", lambda: 256 * per_input)
    calls = fake_rates(monkeypatch, {2 ** k: float(2 ** k) for k in range(13)})  # faster if larger
    sc.sample_counts(IMAGES, NUM_SAMPLES)
    assert calls[0][-1] == 256 and sc.pass_size(SHAPE) == 256
    key = pass_sizes.calibration_key(sc.inference_model, SHAPE, "float32")
    pass_sizes.store(key, 4096, {4096: [1.0]}, "m")  # measured with more free memory
    assert SmoothedClassifier(small_model(), 2, GaussianNoise(0.5)).pass_size(SHAPE) == 256


def test_opting_out_keeps_the_memory_heuristic(calibrating, monkeypatch):
    no_measuring(monkeypatch)
    memory = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5), auto_pass_size="memory")
    size = memory.pass_size(SHAPE)
    memory.sample_counts(IMAGES, NUM_SAMPLES)
    monkeypatch.setenv(pass_sizes.MODE_ENV, "memory")
    by_env = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    by_env.sample_counts(IMAGES, NUM_SAMPLES)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        strategy_model = small_model()
    replicated = SmoothedClassifier(strategy_model, 2, GaussianNoise(0.5), auto_pass_size=
                                    "calibrate", strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
    replicated.sample_counts(IMAGES, NUM_SAMPLES)
    assert by_env.pass_size(SHAPE) == replicated.pass_size(SHAPE) == size
    assert not calibrating.exists()
    monkeypatch.setenv(pass_sizes.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="TFCERT_PASS_SIZE"):
        SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    with pytest.raises(ValueError, match="auto_pass_size"):
        SmoothedClassifier(small_model(), 2, GaussianNoise(0.5), auto_pass_size="fast")


def test_a_server_elsewhere_gets_the_memory_size(calibrating, monkeypatch):
    """Exports (``device="cpu"/"gpu"``) keep the deterministic memory size: this machine's
    timings say nothing about the server's."""
    fake_rates(monkeypatch, {2 ** k: 1e5 * (2 ** k == 64) + 1.0 for k in range(13)})
    sc = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    sc.sample_counts(IMAGES, NUM_SAMPLES)
    assert sc.pass_size(SHAPE) == 64
    memory = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5), auto_pass_size="memory")
    for device in ("cpu", "gpu"):
        assert sc.pass_size(SHAPE, device) == memory.pass_size(SHAPE, device)


def test_the_real_default_path(calibrating):
    """Real timings (whatever they are): a size among the candidates is stored, and the
    votes are those of any single pass size, from any first draw, in any stream."""
    sc = SmoothedClassifier(small_model(), 2, GaussianNoise(0.5))
    sizes = sc.pass_size_candidates(SHAPE)
    chunks = [pass_sizes.chunk_draws(s, len(IMAGES), noise_block_size(SHAPE)) for s in sizes]
    assert pass_sizes.calibration_draws(chunks) <= NUM_SAMPLES
    counts = sc.sample_counts(IMAGES, NUM_SAMPLES, seed=3, first_draw=5)
    assert sc.pass_size(SHAPE) in sizes
    assert json.loads(calibrating.read_text())
    for size in (1, 100, 4096):
        np.testing.assert_array_equal(
            counts, sc.sample_counts(IMAGES, NUM_SAMPLES, batch_size=size, seed=3, first_draw=5))
