"""tfcert.runs: configs that check themselves like the scripts, and whole runs from Python
(in-process engines: interrupted and resumed runs, CLI-then-Python resume, Beam)."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from tfcert import certification, cli, results, runs


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("make, message", [
    (lambda: runs.CertifyConfig(sigma=0.25), "--model is required"),
    (lambda: runs.CertifyConfig(model="m", sigma=0), "--sigma must be > 0"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, alpha=2), "--alpha must be in (0, 1)"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, bounds=("lp",)), "unknown --bounds"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, num_samples=0),
     "--num_samples must be >= 1, got 0"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, defense="randdisc", eps=("0.1", "abc")),
     "--eps must be a comma list of finite budgets >= 0"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, statistics="bogus"),
     "--statistics must be one of simultaneous, cohen, got 'bogus'"),
    (lambda: runs.AttackConfig(model="m", eps=(0.1,), step_size=float("inf")),
     "--step_size must be a finite number"),
    (lambda: runs.AttackConfig(model="m", eps=(0.1,), attack="transfer"), "--source_model"),
    (lambda: runs.AttackConfig(model="m", eps=(0.1,), defense="smoothed"),
     "--defense=smoothed needs --sigma > 0"),
    (lambda: runs.TrainConfig(dataset="digits", patience=2),
     "--patience needs --validation_split > 0"),
    (lambda: runs.TrainConfig(dataset="nope"), "unknown --dataset=nope"),
    (lambda: runs.TrainConfig(validation_split=0.9), "--validation_split must be <= 0.5"),
    (lambda: runs.TrainConfig(epochs="3"), "--epochs must be an integer, got '3'"),
    (lambda: runs.CertifyConfig(model="m", sigma=0.5, alpha=None), "--alpha must be set"),
])
def test_a_config_refuses_bad_options_with_the_scripts_message(make, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_configs_are_frozen_and_normal():
    config = runs.CertifyConfig(model="m", sigma=1, defense="randdisc", eps=[0.1, 0.05],
                                num_examples=3)
    assert config.sigma == 1.0 and isinstance(config.sigma, float)
    assert config.eps == ("0.1", "0.05") and config.bounds == ("renyi", "cohen")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sigma = 2.0
    assert config.to_dict()["num_examples"] == 3
    assert runs.CertifyConfig.defaults()["num_samples"] == 1000
    # analyses and merges need no model
    assert runs.CertifyConfig(analyze=["a.tsv"]).analyze == ("a.tsv",)
    assert runs.AttackConfig(analyze="a.tsv,b.tsv").analyze == ("a.tsv", "b.tsv")


def test_one_eps_grid_sorted_each_once():
    assert cli.eps_grid(["0.1", "0.05", "0.1"], "inf") == [0.05, 0.1]
    assert cli.eps_grid([2.0, 0.5], "2") == [0.5, 2.0]
    with pytest.raises(cli.CliError, match="has values > 1"):
        cli.eps_grid(["2"], "inf")


def test_a_selection_subset_keeps_the_order_asked_and_refuses_other_indices():
    selection = cli.Selection(np.array([3, 5, 7]), np.arange(3.0).reshape(3, 1, 1, 1),
                              np.array([0, 1, 2]), None)
    step = selection.subset((7, 3))
    assert step.indices.tolist() == [7, 3] and step.labels.tolist() == [2, 0]
    assert step.images[:, 0, 0, 0].tolist() == [2.0, 0.0]
    with pytest.raises(cli.CliError, match="index 4 is not in the data selection"):
        selection.subset((3, 4))


def certify_config(model, out, **changes):
    settings = dict(model=model, dataset="digits", sigma=0.25, num_examples=7, num_samples=200,
                    images_per_step=2, bounds=("renyi", "cohen"), output_dir=str(out))
    return runs.CertifyConfig(**{**settings, **changes})


@pytest.mark.slow
def test_an_interrupted_certify_run_resumes_to_the_rows_of_an_uninterrupted_one(
        digits_model, tmp_path, monkeypatch):
    whole = runs.certify(certify_config(digits_model, tmp_path / "whole"))
    assert [r["index"] for r in whole] == [str(i) for i in range(7)]

    run = certify_config(digits_model, tmp_path / "run")
    original, calls = certification.CertifyTask.run, []

    def failing(task, step):  # the third step fails: a crash mid-run
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(task, step)

    monkeypatch.setattr(certification.CertifyTask, "run", failing)
    with pytest.raises(KeyboardInterrupt):
        runs.certify(run)
    partial = results.read_tsv(str(tmp_path / "run" / "certify.tsv"))
    assert [r["index"] for r in partial] == ["0", "1", "2", "3"]
    assert not (tmp_path / "run" / "summary.txt").exists()
    monkeypatch.setattr(certification.CertifyTask, "run", original)

    rows = runs.certify(run)  # the same process resumes: the lock was released
    assert rows[:4] == partial  # kept as they were
    assert without_seconds(rows) == without_seconds(whole)
    assert results.read_tsv(str(tmp_path / "run" / "certify.tsv")) == rows
    for name in ("summary.txt", "certified_accuracy.tsv", "certified_accuracy.png"):
        assert (tmp_path / "run" / name).exists()
    assert ((tmp_path / "run" / "summary.txt").read_text()
            == (tmp_path / "whole" / "summary.txt").read_text())
    with pytest.raises(results.RunConfigMismatchError, match=r"--alpha \(0.001 -> 0.01\)"):
        runs.certify(certify_config(digits_model, tmp_path / "run", alpha=0.01))


@pytest.mark.slow
def test_a_run_started_with_the_script_is_resumed_from_python_and_back(digits_model, tmp_path):
    out = tmp_path / "run"
    script = subprocess.run(
        [sys.executable, os.path.join(ROOT, "certify.py"), f"--model={digits_model}",
         "--dataset=digits", "--sigma=0.25", "--num_examples=4", "--num_samples=200",
         "--images_per_step=2", "--bounds=renyi,cohen", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert script.returncode == 0, script.stderr
    first = results.read_tsv(str(out / "certify.tsv"))
    config = (out / "config.json").read_text()

    rows = runs.certify(certify_config(digits_model, out))  # 3 more examples
    assert rows[:4] == first  # resumed, not restarted
    assert (out / "config.json").read_text() == config.replace(
        '"num_examples": 4', '"num_examples": 7')  # the same run identity
    whole = runs.certify(certify_config(digits_model, tmp_path / "whole"))
    assert without_seconds(rows) == without_seconds(whole)

    again = subprocess.run(  # and the script resumes the Python run (nothing left to do)
        [sys.executable, os.path.join(ROOT, "certify.py"), f"--model={digits_model}",
         "--dataset=digits", "--sigma=0.25", "--num_examples=7", "--num_samples=200",
         "--images_per_step=3", "--bounds=renyi,cohen", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert results.read_tsv(str(out / "certify.tsv")) == rows


@pytest.mark.slow
def test_a_python_run_killed_mid_run_is_finished_by_the_script(digits_model, tmp_path):
    """A notebook's run (only tfcert.runs) killed with SIGKILL, then resumed by the command
    with the same settings: the rows of an uninterrupted run, the killed run's kept."""
    out = tmp_path / "run"
    code = (f"from tfcert import runs\nruns.certify(runs.CertifyConfig(model={digits_model!r}, "
            f"dataset='digits', sigma=0.25, num_examples=20, num_samples=2000, "
            f"images_per_step=2, output_dir={str(out)!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tsv = out / "certify.tsv"
    deadline = time.time() + 300
    while time.time() < deadline and (not tsv.exists() or len(tsv.read_text().splitlines()) < 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = results.read_tsv(str(tsv))
    assert 4 <= len(partial) < 20

    script = subprocess.run(
        [sys.executable, os.path.join(ROOT, "certify.py"), f"--model={digits_model}",
         "--dataset=digits", "--sigma=0.25", "--num_examples=20", "--num_samples=2000",
         "--images_per_step=2", f"--output_dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert script.returncode == 0, script.stderr
    rows = results.read_tsv(str(tsv))
    assert rows[:len(partial)] == partial
    whole = runs.certify(certify_config(digits_model, tmp_path / "whole", num_examples=20,
                                        num_samples=2000, bounds=("renyi", "cohen")))
    assert without_seconds(rows) == without_seconds(whole)


@pytest.mark.slow
def test_shards_merged_from_python_give_the_rows_of_one_run(digits_model, tmp_path):
    whole = runs.certify(certify_config(digits_model, tmp_path / "whole", num_examples=5))
    shards = [str(tmp_path / f"shard{j}") for j in range(2)]
    for j, shard in enumerate(shards):
        rows = runs.certify(certify_config(digits_model, shard, num_examples=5, num_shards=2,
                                           shard_index=j))
        assert [r["index"] for r in rows] == [str(i) for i in range(j, 5, 2)]
    merged = runs.certify(runs.CertifyConfig(merge=shards, output_dir=str(tmp_path / "m")))
    assert without_seconds(merged) == without_seconds(whole)


@pytest.mark.slow
def test_the_beam_engine_in_process_gives_the_local_engines_rows(digits_model, tmp_path):
    pytest.importorskip("apache_beam")
    local = runs.certify(certify_config(digits_model, tmp_path / "local", num_examples=5))
    beam = runs.certify(certify_config(digits_model, tmp_path / "beam", num_examples=5,
                                       engine="beam", beam_options="--runner=DirectRunner"))
    assert without_seconds(beam) == without_seconds(local)
    assert not (tmp_path / "beam" / "beam_parts").exists()


@pytest.mark.slow
def test_an_attack_run_resumes_and_extends_from_python(digits_model, tmp_path):
    def config(out, eps):
        return runs.AttackConfig(model=digits_model, dataset="digits", defense="gaussian",
                                 sigma=0.2, attack="pgd_linf", eps=eps, steps=2, eot_samples=2,
                                 num_examples=4, batch_size=3, output_dir=str(out))

    first = runs.attack(config(tmp_path / "run", (0.05,)))
    assert [r["key"] for r in first] == [f"0.05/{i}" for i in range(4)]
    extended = runs.attack(config(tmp_path / "run", (0.1, 0.05)))  # adds ε = 0.1 only
    assert extended[:4] == first
    whole = runs.attack(config(tmp_path / "whole", (0.05, 0.1)))
    assert without_seconds(extended) == without_seconds(whole)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["randomness"] == "per-example" and recorded["steps"] == 2


@pytest.mark.slow
def test_train_from_python_writes_the_run(tmp_path):
    out = tmp_path / "run"
    metrics = runs.train(runs.TrainConfig(dataset="digits", method="gaussian", sigma=0.25,
                                          epochs=1, output_dir=str(out), verbose="0"))
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 1 and 0 < metrics["clean_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "small_cnn" and config["tensorboard_dir"] is None
    assert (out / "model.keras").exists()


@pytest.mark.slow
def test_train_writes_tensorboard_logs(tmp_path):
    config = runs.TrainConfig(dataset="digits", method="standard", epochs=1, verbose="0",
                              output_dir=str(tmp_path / "run"),
                              tensorboard_dir=str(tmp_path / "tb"))
    if importlib.util.find_spec("tensorboard") is None:  # not a dependency of TensorFlow 2.21
        with pytest.raises(cli.CliError, match="pip install tensorboard"):
            runs.train(config)
        assert not (tmp_path / "run").exists()
        return
    runs.train(config)
    assert any(name.startswith("events.out.tfevents")
               for _, _, files in os.walk(tmp_path / "tb") for name in files)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "certify", "attack", "export"])
def test_every_library_module_imports_with_any_one_script(script):
    """No library module defines flags: all of them and one script share a process."""
    modules = sorted(
        "tfcert." + os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "tfcert"))[:-3]
        .replace(os.sep, ".").replace(".__init__", "")
        for d, _, files in os.walk(os.path.join(ROOT, "tfcert")) for f in files
        if f.endswith(".py") and "scripts" not in d)
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += f"import tfcert.scripts.{script}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
