"""tfcert-attack (python -m tfcert.scripts.attack) end to end: streamed TSV, resume and extension, tables, errors."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, run_in_process
from tfcert import cli, results, robust_accuracy


def attack_process(*args):
    """``tfcert-attack`` in a new Python (the script itself: flag parsing, exit status)."""
    return subprocess.run([sys.executable, "-m", "tfcert.scripts.attack", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def attack(*args):
    """``tfcert-attack``'s run in this process (`tfcert.runs.attack`, conftest.run_in_process)."""
    from tfcert import runs

    return run_in_process(runs.attack, runs.AttackConfig, args)


def one_line_error(proc) -> str:
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr
    return last


@pytest.mark.slow
def test_attack_streams_resumes_extends_and_analyzes(digits_model, tmp_path):
    out = tmp_path / "run"
    common = [f"--model={digits_model}", "--dataset=digits", "--defense=none",
              "--attack=pgd_linf", "--num_examples=40", "--batch_size=15", "--steps=5",
              f"--output_dir={out}"]
    first = attack(*common, "--eps=0.05")
    assert first.returncode == 0, first.stderr
    tsv = out / "attack.tsv"
    assert len(results.read_tsv(str(tsv))) == 40

    # An interrupted run: 25 complete rows and a torn line.
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:26]) + lines[26][:9])
    kept = results.read_tsv(str(tsv))[:25]
    second = attack(*common, "--eps=0.05,0.1")  # resumes 0.05 and adds 0.1
    assert second.returncode == 0, second.stderr
    rows = results.read_tsv(str(tsv))
    assert rows[:25] == kept
    assert sorted(r["key"] for r in rows) == sorted(f"{e}/{i}" for e in ("0.05", "0.1")
                                                    for i in range(40))
    for row in rows:
        assert float(row["distance"]) <= float(row["eps"]) + 1e-6
        assert row["robust"] == str(int(row["adv_prediction"] == row["label"]))
    table = np.loadtxt(out / "robust_accuracy.tsv", skiprows=1)
    for eps, accuracy in table:
        assert accuracy == pytest.approx(np.mean([r["robust"] == "1" for r in rows
                                                  if float(r["eps"]) == eps]))
    assert table[1, 1] <= table[0, 1]
    assert "robust accuracy" in second.stdout and "none/pgd_linf" in second.stdout
    for name in ("config.json", "summary.txt", "robust_accuracy.png"):
        assert (out / name).exists()

    again = attack(*common, "--eps=0.05,0.1")  # nothing left to do
    assert again.returncode == 0 and results.read_tsv(str(tsv)) == rows
    mismatch = attack(*common, "--eps=0.05", "--steps=7")
    assert "--steps (5 -> 7)" in one_line_error(mismatch)
    assert results.read_tsv(str(tsv)) == rows

    compare = attack(f"--analyze={tsv},{tsv}", f"--output_dir={tmp_path / 'cmp'}")
    assert compare.returncode == 0, compare.stderr
    assert (tmp_path / "cmp" / "robust_accuracy_compare.png").exists()

    # Issue: --analyze drew a killed run's curve with ε values measured on different images.
    unfinished = tmp_path / "unfinished" / "attack.tsv"
    unfinished.parent.mkdir()
    unfinished.write_text("".join(tsv.read_text().splitlines(keepends=True)[:60]))
    refused = attack(f"--analyze={unfinished}", f"--output_dir={tmp_path / 'cmp2'}")
    assert "is unfinished (rows per ε: " in one_line_error(refused)
    wrong_kind = attack(f"--analyze={out / 'config.json'}", f"--output_dir={tmp_path / 'cmp2'}")
    assert "is not an attack.tsv" in one_line_error(wrong_kind)
    certify_it = subprocess.run([sys.executable, "certify.py", f"--analyze={tsv}",
                                 f"--output_dir={tmp_path / 'cmp3'}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
    assert "is not a certify.tsv" in one_line_error(certify_it)


@pytest.mark.slow
def test_minimum_norm_attack_serves_every_eps(digits_model, tmp_path):
    out = tmp_path / "cw"
    proc = attack(f"--model={digits_model}", "--dataset=digits", "--attack=cw_l2",
                  "--eps=0.3,0.6,1.2", "--num_examples=30", "--batch_size=30", "--steps=30",
                  "--binary_search_steps=3", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    rows = results.read_tsv(str(out / "attack.tsv"))
    assert len(rows) == 90
    for row in rows:  # one C&W example per image, judged at each ε
        within = float(row["distance"]) <= float(row["eps"])
        prediction = row["adv_prediction"] if within else row["clean_prediction"]
        assert row["robust"] == str(int(prediction == row["label"]))
    accuracy = np.loadtxt(out / "robust_accuracy.tsv", skiprows=1)[:, 1]
    assert np.all(np.diff(accuracy) <= 0) and accuracy[-1] < accuracy[0]


@pytest.mark.parametrize("args,message", [
    (["--eps=abc"], "--eps"),
    (["--eps=0.1", "--attack=transfer"], "--source_model"),
    (["--eps=0.1", "--defense=smoothed"], "--sigma"),
    # Issue 25: an infinite ℓ2 budget was attacked and reported 0% robust accuracy; a
    # non-finite --step_size reached the attack.
    (["--attack=pgd_l2", "--eps=0.5,inf"], "--eps must be a comma list of finite budgets"),
    (["--eps=0.1", "--step_size=inf"], "--step_size must be a finite number"),
])
@pytest.mark.slow
def test_bad_flags_give_one_line_errors(digits_model, tmp_path, args, message):
    proc = attack(f"--model={digits_model}", "--dataset=digits",
                  f"--output_dir={tmp_path / 'bad'}", *args)
    assert message in one_line_error(proc)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("attack, norm", [("pgd_l2", "inf"), ("cw_l2", "inf"),
                                          ("boundary", "inf"), ("transfer", "2"),
                                          ("pgd_linf", "inf")])
@pytest.mark.parametrize("eps", ["inf", "nan", "-inf", "1e400", "0.1,nan", "-0.1", "0.2,-1"])
def test_non_finite_or_negative_eps_is_refused(attack, norm, eps):
    """Issue 25 (in-process: the check `run` makes before any output)."""
    options = SimpleNamespace(eps=eps.split(","), attack=attack, transfer_norm=norm)
    with pytest.raises(cli.CliError, match=f"finite budgets >= 0 .*, got {eps}$"):
        cli.eps_grid(options.eps, robust_accuracy.attack_norm(options))


@pytest.mark.parametrize("changed, shown", [("--split=train", "--split (test -> train)"),
                                            ("--skip=2", "--skip (0 -> 2)"),
                                            ("--stride=2", "--stride (1 -> 2)")])
@pytest.mark.slow
def test_data_flags_are_part_of_the_run(digits_model, tmp_path, changed, shown):
    """Issue: the shared data flags were not recorded, so other examples mixed into a run."""
    common = [f"--model={digits_model}", "--dataset=digits", "--attack=pgd_linf", "--eps=0.05",
              "--num_examples=3", "--steps=2", f"--output_dir={tmp_path / 'run'}"]
    first = attack(*common)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "run" / "attack.tsv").read_bytes()
    error = one_line_error(attack(*common, changed))
    assert f"differ from the run in {tmp_path / 'run'}: {shown}" in error
    assert (tmp_path / "run" / "attack.tsv").read_bytes() == before


@pytest.mark.slow
def test_a_model_that_does_not_fit_the_data_is_refused_before_any_output(digits_model, tmp_path):
    proc = attack(f"--model={digits_model}", "--dataset=mnist_subset", "--eps=0.1",
                  "--num_examples=2", f"--output_dir={tmp_path / 'bad'}")
    assert "(8, 8, 1)" in one_line_error(proc)
    assert not (tmp_path / "bad").exists()


def same_rows(rows, other):
    """Rows equal but for seconds; distances to the TSV's 6 significant digits (rel 1e-5),
    as a batch size may change the model's float32 outputs in the last bits."""
    assert [r["key"] for r in rows] == [r["key"] for r in other]
    for row, twin in zip(rows, other):
        assert {k: v for k, v in row.items() if k not in ("seconds", "distance")} == {
            k: v for k, v in twin.items() if k not in ("seconds", "distance")}
        assert float(row["distance"]) == pytest.approx(float(twin["distance"]), rel=1e-5)


@pytest.mark.slow
def test_rows_do_not_depend_on_the_batch_size(digits_model, tmp_path):
    """Per-example randomness: C&W with EOT through Gaussian noise (the attack's draws and
    the defense's clean and adversarial draws), one attack serving every ε."""
    runs = {}
    for batch_size in (2, 5):
        out = tmp_path / f"b{batch_size}"
        proc = attack(f"--model={digits_model}", "--dataset=digits", "--defense=gaussian",
                      "--sigma=0.2", "--attack=cw_l2", "--eps=0.3,1.2", "--num_examples=6",
                      "--steps=4", "--binary_search_steps=2", "--eot_samples=2",
                      f"--batch_size={batch_size}", f"--output_dir={out}")
        assert proc.returncode == 0, proc.stderr
        runs[batch_size] = sorted(results.read_tsv(str(out / "attack.tsv")),
                                  key=lambda r: (float(r["eps"]), int(r["index"])))
    same_rows(runs[2], runs[5])
    config = json.loads((tmp_path / "b2" / "config.json").read_text())
    assert config["randomness"] == "per-example"


def test_a_run_of_the_per_batch_seeding_is_refused(digits_model, tmp_path):
    """Runs made before per-example seeding (no "randomness" in config.json) drew other
    numbers: they cannot be continued."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"attack": "pgd_linf", "batch_size": 100}))
    proc = attack(f"--model={digits_model}", "--dataset=digits", "--eps=0.1",
                  "--num_examples=2", f"--output_dir={out}")
    assert "older tfcert-attack that seeded the attack randomness per batch" in one_line_error(
        proc)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_the_script_runs_and_refuses_a_bad_flag_in_one_line(digits_model, tmp_path):
    """The console script itself (the other tests run its run in-process): a tiny sweep,
    and absl's refusal of an out-of-range flag as one ``error:`` line."""
    done = attack_process(f"--model={digits_model}", "--dataset=digits", "--eps=0.05",
                          "--num_examples=2", "--steps=2", f"--output_dir={tmp_path / 'o'}")
    assert done.returncode == 0, done.stderr
    assert len(results.read_tsv(str(tmp_path / "o" / "attack.tsv"))) == 2
    one_line_error(attack_process("--steps=0", f"--output_dir={tmp_path / 'bad'}"))
    assert not (tmp_path / "bad").exists()
