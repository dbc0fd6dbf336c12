"""certify.py end to end: streamed TSV, resume without loss or duplicates, tables, plots, errors."""

import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from conftest import ROOT, run_in_process
from tfcert import results


def certify_process(*args, **kwargs):
    """``certify.py`` in a new Python (the script itself: flag parsing, exit status)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "certify.py"), *args],
                          capture_output=True, text=True, timeout=600, **kwargs)


def certify(*args):
    """``certify.py``'s run in this process (`tfcert.runs.certify`, conftest.run_in_process)."""
    from tfcert import runs

    return run_in_process(runs.certify, runs.CertifyConfig, args)


def common(model, out, count=30):
    return [f"--model={model}", "--dataset=digits", "--sigma=0.25", f"--num_examples={count}",
            "--num_samples=300", "--images_per_step=3", "--bounds=renyi,cohen,pixeldp",
            f"--output_dir={out}"]


@pytest.mark.slow
def test_certify_streams_resumes_and_summarizes(digits_model, tmp_path):
    out = tmp_path / "run"
    args = common(digits_model, out)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "certify.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tsv = out / "certify.tsv"
    deadline = time.time() + 300
    while time.time() < deadline and (not tsv.exists() or len(tsv.read_text().splitlines()) < 7):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = results.read_tsv(str(tsv))
    assert 6 <= len(partial) < 30
    assert not (out / "summary.txt").exists()  # nothing looks complete

    done = certify(*args)
    assert done.returncode == 0, done.stderr
    rows = results.read_tsv(str(tsv))
    indices = [int(r["index"]) for r in rows]
    assert sorted(indices) == list(range(30)) and len(set(indices)) == 30
    assert rows[: len(partial)] == partial  # old rows kept as they were
    for row in rows:
        counts = [int(c) for c in row["counts"].split(",")]
        assert sum(counts) == 300 and len(counts) == 10
        assert float(row["radius_pixeldp"]) <= float(row["radius_renyi"]) + 1e-9
        if row["prediction"] == "-1":
            assert float(row["radius_cohen"]) == 0.0
    assert "certified accuracy" in done.stdout and "renyi" in done.stdout
    for name in ("summary.txt", "certified_accuracy.tsv", "certified_accuracy.png", "config.json"):
        assert (out / name).exists()
    accuracy = np.loadtxt(out / "certified_accuracy.tsv", skiprows=1)
    assert np.all(np.diff(accuracy[:, 1:], axis=0) <= 0)  # non-increasing in the radius

    rerun = certify(*args)  # nothing left to do: same rows
    assert rerun.returncode == 0 and results.read_tsv(str(tsv)) == rows
    # ... and they are the rows of an uninterrupted run (per-example noise)
    whole = certify(*common(digits_model, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert without_seconds(rows) == without_seconds(
        results.read_tsv(str(tmp_path / "whole" / "certify.tsv")))
    # a torn last line (killed mid-write) is dropped with a warning and recomputed
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:-2]) + lines[-2][:7])
    repaired = certify(*args)
    assert repaired.returncode == 0 and "incomplete last line" in repaired.stderr
    assert without_seconds(results.read_tsv(str(tsv))) == without_seconds(rows)

    compare = certify(f"--analyze={tsv},{tsv}", f"--output_dir={tmp_path / 'cmp'}")
    assert compare.returncode == 0, compare.stderr
    assert (tmp_path / "cmp" / "certified_accuracy_compare.png").exists()


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow
def test_changed_settings_refuse_to_mix_runs(digits_model, tmp_path):
    """Issue: data flags were not recorded, so --split/--skip/--stride mixed runs."""
    out = tmp_path / "run"
    assert certify(*common(digits_model, out, 3)).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("config.json", "certify.tsv")}
    for changed, shown in (("--alpha=0.01", "--alpha (0.001 -> 0.01)"),
                           ("--split=train", "--split (test -> train)"),
                           ("--skip=3", "--skip (0 -> 3)"), ("--stride=2", "--stride (1 -> 2)"),
                           ("--dataset=mnist_subset", "--dataset (digits -> mnist_subset)")):
        other = certify(*common(digits_model, out, 3), changed)
        assert other.returncode == 1, changed
        lines = other.stderr.strip().splitlines()  # TF's own start-up lines may precede
        assert lines[-1].startswith("error: "), other.stderr
        assert sum(line.startswith("error") for line in lines) == 1, other.stderr
        if "dataset" not in changed:  # mnist_subset is refused earlier: the model does not fit
            assert f"differ from the run in {out}: {shown}" in lines[-1]
        assert {name: (out / name).read_bytes() for name in before} == before  # untouched
    grown = certify(*common(digits_model, out, 5), "--images_per_step=2")
    assert grown.returncode == 0, grown.stderr
    assert [r["index"] for r in results.read_tsv(str(out / "certify.tsv"))] == list("01234")


@pytest.mark.slow
def test_rows_do_not_depend_on_images_per_step_batch_size_or_shards(digits_model, tmp_path):
    """Issue: votes changed with --images_per_step.  Now every way of cutting the work
    (steps, pass sizes, shards joined by --merge) gives the rows of a single run."""
    single = certify(*common(digits_model, tmp_path / "single", 7), "--images_per_step=5")
    assert single.returncode == 0, single.stderr
    other = certify(*common(digits_model, tmp_path / "other", 7), "--images_per_step=3",
                    "--batch_size=50")
    assert other.returncode == 0, other.stderr
    reference = without_seconds(results.read_tsv(str(tmp_path / "single" / "certify.tsv")))
    assert without_seconds(results.read_tsv(str(tmp_path / "other" / "certify.tsv"))) == reference
    shards = [tmp_path / f"shard{j}" for j in range(3)]
    for j, shard in enumerate(shards):
        run = certify(*common(digits_model, shard, 7), "--num_shards=3", f"--shard_index={j}")
        assert run.returncode == 0, run.stderr
        indices = [int(r["index"]) for r in results.read_tsv(str(shard / "certify.tsv"))]
        assert indices == list(range(j, 7, 3))
    merged = certify(f"--merge={','.join(map(str, shards))}", f"--output_dir={tmp_path / 'm'}")
    assert merged.returncode == 0, merged.stderr
    assert without_seconds(results.read_tsv(str(tmp_path / "m" / "certify.tsv"))) == reference
    for name in ("summary.txt", "certified_accuracy.tsv", "certified_accuracy.png"):
        assert (tmp_path / "m" / name).exists()
    assert (tmp_path / "m" / "summary.txt").read_text() == (
        tmp_path / "single" / "summary.txt").read_text()


@pytest.mark.slow
def test_merge_refuses_incomplete_or_foreign_shards(digits_model, tmp_path):
    shards = [tmp_path / f"shard{j}" for j in range(2)]
    assert certify(*common(digits_model, shards[0], 4), "--num_shards=2").returncode == 0
    missing = certify(f"--merge={shards[0]}", f"--output_dir={tmp_path / 'm'}")
    assert missing.returncode == 1 and "each of the 2 shards once" in missing.stderr
    foreign = certify(*common(digits_model, shards[1], 4), "--num_shards=2", "--shard_index=1",
                      "--alpha=0.01")
    assert foreign.returncode == 0
    mixed = certify(f"--merge={shards[0]},{shards[1]}", f"--output_dir={tmp_path / 'm'}")
    assert mixed.returncode == 1 and "--alpha (0.001 -> 0.01)" in mixed.stderr
    assert not (tmp_path / "m").exists()
    twice = certify(f"--merge={shards[0]},{shards[0]}", f"--output_dir={tmp_path / 'm'}")
    assert twice.returncode == 1 and "shard indices [0, 0]" in twice.stderr


@pytest.mark.slow
def test_merge_into_another_runs_folder_leaves_it_untouched(digits_model, tmp_path):
    """Issue: --merge deleted the folder's certify.tsv before comparing its settings."""
    shards = [tmp_path / f"shard{j}" for j in range(2)]
    for j, shard in enumerate(shards):
        result = certify(*common(digits_model, shard, 4), "--num_shards=2", f"--shard_index={j}")
        assert result.returncode == 0, result.stderr
    other = tmp_path / "other"
    assert certify(*common(digits_model, other, 2), "--alpha=0.01").returncode == 0
    before = (other / "certify.tsv").read_text()
    merged = certify(f"--merge={shards[0]},{shards[1]}", f"--output_dir={other}")
    assert merged.returncode == 1 and "--alpha (0.01 -> 0.001)" in merged.stderr, merged.stderr
    assert (other / "certify.tsv").read_text() == before

@pytest.mark.slow
def test_a_model_that_does_not_fit_the_data_is_refused_before_any_output(digits_model, tmp_path):
    """Issue: an 8x8 digits model on mnist_subset ended in a traceback and left a folder."""
    out = tmp_path / "o"
    result = certify(f"--model={digits_model}", "--dataset=mnist_subset", "--sigma=0.25",
                     "--num_examples=2", f"--output_dir={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model ")
    assert "(8, 8, 1)" in result.stderr and "(28, 28, 1)" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--sigma=0.25"], "--model is required"),
    (["--model=/nonexistent.keras", "--sigma=0.25"], "does not exist"),
    (["--model=MODEL", "--sigma=0"], "--sigma must be > 0"),
    (["--model=MODEL", "--sigma=0.5", "--bounds=lp"], "unknown --bounds"),
    (["--model=MODEL", "--sigma=0.5", "--alpha=2"], "--alpha must be in (0, 1)"),
])
@pytest.mark.slow
def test_bad_flags(digits_model, tmp_path, args, message):
    args = [a.replace("MODEL", digits_model) for a in args]
    result = certify(*args, "--dataset=digits", f"--output_dir={tmp_path}/o")
    assert result.returncode == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    (b"not a zip file", "is not a .keras file"),
    (None, "cannot load model"),  # a zip archive, but not of a Keras model
])
@pytest.mark.slow
def test_corrupt_model_file(tmp_path, content, message):
    bad = tmp_path / "bad.keras"
    if content is None:
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("notes.txt", "no config.json here")
    else:
        bad.write_bytes(content)
    result = certify(f"--model={bad}", "--sigma=0.5", f"--output_dir={tmp_path}/o")
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--num_samples=0", "--no_such_flag=1"])
def test_unparsable_flag_is_one_error_line(tmp_path, flag):
    result = certify_process(flag, f"--output_dir={tmp_path}/o")  # absl's parsing itself
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("defense, extra", [("randdisc", []),
                                            ("randdisc_downsampled", ["--fixed_centers=0,1"])])
def test_randdisc_kl_certification(digits_model, tmp_path, defense, extra):
    out = tmp_path / defense
    result = certify(f"--model={digits_model}", "--dataset=digits", "--sigma=0.15",
                     f"--defense={defense}", "--eps=0.01,0.05", "--num_examples=4",
                     "--num_samples=100", "--num_center_samples=20", f"--output_dir={out}", *extra)
    assert result.returncode == 0, result.stderr
    assert "KL-certified accuracy" in result.stdout
    rows = results.read_tsv(str(out / "certify.tsv"))
    assert len(rows) == 4
    for row in rows:
        u_small, u_large = float(row["u_kl_0.01"]), float(row["u_kl_0.05"])
        assert 0 < u_small < u_large
        for eps in ("0.01", "0.05"):  # Prop. 2 with the corrected sign
            certified = float(row[f"margin_{eps}"]) > np.sqrt(2 * float(row[f"u_kl_{eps}"]))
            assert row[f"certified_{eps}"] == str(int(certified))
            # α + α′ for the Monte-Carlo bound over random centers; α alone when U_KL is
            # exact (fixed grayscale centers)
            expected = 0.001 if extra else 0.002
            assert float(row[f"failure_probability_{eps}"]) == pytest.approx(expected, rel=1e-9)
        assert row["rigorous"] == "1"  # grayscale: exact assignment probabilities
    assert "failure probability ≤" in result.stdout
    assert (out / "certified_accuracy.png").exists()
    compare = certify(f"--analyze={out}/certify.tsv,{out}/certify.tsv",
                      f"--output_dir={tmp_path / 'cmp'}")
    assert compare.returncode == 0 and "ℓ∞ ε" in compare.stdout
    assert (tmp_path / "cmp" / "certified_accuracy_compare.png").exists()


def test_bad_eps_grid(digits_model, tmp_path):
    result = certify(f"--model={digits_model}", "--sigma=0.15", "--defense=randdisc",
                     "--eps=0.1,abc", f"--output_dir={tmp_path}/o")
    assert result.returncode == 1 and "--eps must be" in result.stderr


@pytest.mark.slow
def test_early_stopping_and_bfloat16_flags(digits_model, tmp_path):
    early = certify(f"--model={digits_model}", "--dataset=digits", "--sigma=0.25",
                    "--num_examples=6", "--num_samples=3200", "--target_radius=0.2",
                    "--first_checkpoint=100", f"--output_dir={tmp_path / 'early'}")
    assert early.returncode == 0, early.stderr
    assert "early stopping at r = 0.2" in early.stdout
    samples = [int(r["samples"]) for r in results.read_tsv(str(tmp_path / "early" / "certify.tsv"))]
    assert len(samples) == 6 and all(100 <= s <= 3200 for s in samples) and min(samples) < 3200
    bf16 = certify(f"--model={digits_model}", "--dataset=digits", "--sigma=0.25",
                   "--num_examples=3", "--num_samples=200", "--compute_dtype=bfloat16",
                   f"--output_dir={tmp_path / 'bf16'}")
    assert bf16.returncode == 0, bf16.stderr
    rows = results.read_tsv(str(tmp_path / "bf16" / "certify.tsv"))
    assert [sum(map(int, r["counts"].split(","))) for r in rows] == [200] * 3


def test_analyze_labels_runs_by_the_shortest_distinct_folder_suffix():
    from tfcert.certification import run_labels

    assert run_labels(["/r/a/certify/certify.tsv", "/r/b/certify/certify.tsv"]) == [
        "a/certify", "b/certify"]
    assert run_labels(["/r/stn/certify.tsv", "/r/gauss/certify.tsv"]) == ["stn", "gauss"]
