"""certify.py and tfcert-attack --engine=beam (tfcert.beam_pipeline): the local engine's rows,
retries, resume."""

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_in_process
from tfcert import results

TWO_WORKERS = ("--runner=DirectRunner --direct_num_workers=2 "
               "--direct_running_mode=multi_processing")
IN_PROCESS = "--runner=DirectRunner"
MISSING = ("error: --engine=beam needs Apache Beam, which is not installed: "
           "pip install 'tfcert[beam]'")


CERTIFY = [os.path.join(ROOT, "certify.py")]
ATTACK = ["-m", "tfcert.scripts.attack"]


def run_script(script, *args, env=None, **kwargs):
    return subprocess.run([sys.executable, *script, *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)


def certify(*args, env=None, **kwargs):
    return run_script(CERTIFY, *args, env=env, **kwargs)


def attack(*args, env=None, **kwargs):
    return run_script(ATTACK, *args, env=env, **kwargs)


def certify_here(*args):
    """``certify.py``'s run in this process (conftest.run_in_process): for the local
    engine and Beam's in-process runner, whose runs need no worker processes."""
    from tfcert import runs

    return run_in_process(runs.certify, runs.CertifyConfig, args)


def attack_here(*args):
    """``tfcert-attack``'s run in this process, as `certify_here`."""
    from tfcert import runs

    return run_in_process(runs.attack, runs.AttackConfig, args)


def common(model, out, count=8, samples=300):
    return [f"--model={model}", "--dataset=digits", "--sigma=0.25", f"--num_examples={count}",
            f"--num_samples={samples}", "--images_per_step=2", "--bounds=renyi,cohen",
            f"--output_dir={out}"]


def beam(model, out, options, **kwargs):
    return [*common(model, out, **kwargs), "--engine=beam", f"--beam_options={options}"]


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def rows_of(out):
    return results.read_tsv(str(out / "certify.tsv"))


@pytest.fixture(scope="module")
def local_run(digits_model, tmp_path_factory):
    """The local engine's run directory for `common` (the rows every Beam run must equal)."""
    out = tmp_path_factory.mktemp("local") / "run"
    done = certify_here(*common(digits_model, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def beam_installed():
    pytest.importorskip("apache_beam")


@pytest.mark.slow
def test_two_worker_pipeline_with_a_dying_worker_writes_the_local_engines_rows(
        digits_model, local_run, tmp_path, beam_installed):
    """Two worker processes; the one of example 2's step dies after writing its part file
    (FnApiRunner would hang; the engine's watch fails the run and retries): no row lost
    or duplicated, and the run equals the local engine's.  (One run tests both: the
    two-worker pipeline and the dying worker were separate tests, each paying the two
    workers' start-up.)"""
    out, work = tmp_path / "beam", tmp_path / "work"
    options = f"{TWO_WORKERS} --tfcert_work_dir={work}"  # model staged and parts written there
    done = certify(*beam(digits_model, out, options), env={"TFCERT_BEAM_INJECT_FAILURE": "2:exit"})
    assert done.returncode == 0, done.stderr
    assert "warning: Beam pipeline attempt 1 failed (a Beam worker process died" in done.stderr
    rows = rows_of(out)
    assert [r["index"] for r in rows] == [str(i) for i in range(8)]  # each once, in order
    assert without_seconds(rows) == without_seconds(rows_of(local_run))
    for name in ("summary.txt", "certified_accuracy.tsv", "selection.json"):
        assert (out / name).read_text() == (local_run / name).read_text(), name
    assert (out / "certified_accuracy.png").exists()
    assert not work.exists() and not (out / "beam_parts").exists()  # merged, then removed
    assert "certified accuracy" in done.stdout
    before = rows_of(out)
    rerun = certify(*beam(digits_model, out, options))  # nothing left to certify
    assert rerun.returncode == 0, rerun.stderr
    assert rows_of(out) == before  # seconds included: no row was recomputed


@pytest.mark.slow
@pytest.mark.parametrize("options, seen", [
    # FnApiRunner fails the pipeline; the engine reruns the steps without rows (the same
    # runner in this process as with worker processes: run here, no worker start-up)
    (IN_PROCESS, "attempt 1 failed (injected failure at index 2"),
    # this runner retries the failed bundle itself: no engine retry
    ("--runner=BundleBasedDirectRunner", "injected failure at index 2"),
], ids=["worker_raises", "runner_retries_bundle"])  # a dying worker: the test above
def test_a_failed_worker_loses_and_duplicates_no_row(digits_model, local_run, tmp_path,
                                                     beam_installed, monkeypatch, caplog,
                                                     options, seen):
    """The injected failure strikes after the step's part file is written: the worst
    moment for duplicates (the retry finds the rows of the failed attempt)."""
    out = tmp_path / "beam"
    monkeypatch.setenv("TFCERT_BEAM_INJECT_FAILURE", "2")
    done = certify_here(*beam(digits_model, out, options))
    assert done.returncode == 0, done.stderr
    assert seen in done.stderr + caplog.text  # here, Beam logs a retried bundle's error
    engine_retried = "warning: Beam pipeline attempt 1 failed" in done.stderr
    assert engine_retried == ("BundleBased" not in options)
    rows = rows_of(out)
    assert [r["index"] for r in rows] == [str(i) for i in range(8)]  # each once, in order
    assert without_seconds(rows) == without_seconds(rows_of(local_run))


@pytest.mark.slow
def test_resume_after_a_kill_certifies_only_the_missing_examples(digits_model, tmp_path,
                                                                 beam_installed):
    """In-process runner (no worker start-up: the kill lands mid-run sooner); what is
    tested is the engine's part files and resume, the same for every runner."""
    out = tmp_path / "beam"
    args = beam(digits_model, out, IN_PROCESS, count=24, samples=2000)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "certify.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = out / "beam_parts"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("part-*.tsv"))) < 3:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group (kill -9 of the run)
    proc.wait()
    kept = {r["index"]: r for path in parts.glob("part-*.tsv") for r in results.read_tsv(str(path))}
    # at least the 3 part files of 2 examples waited for; not all 24: killed mid-run
    assert 6 <= len(kept) < 24 and not (out / "summary.txt").exists()

    resumed = certify(*args)
    assert resumed.returncode == 0, resumed.stderr
    rows = rows_of(out)
    assert [r["index"] for r in rows] == [str(i) for i in range(24)]
    # the killed run's rows are kept as they were (their seconds too: not recomputed)
    assert all(r == kept[r["index"]] for r in rows if r["index"] in kept)
    local = tmp_path / "local"
    reference = certify_here(*common(digits_model, local, count=24, samples=2000))
    assert reference.returncode == 0, reference.stderr
    assert without_seconds(rows) == without_seconds(rows_of(local))


@pytest.mark.parametrize("script", ["certify", "attack"])
def test_without_beam_a_one_line_error(digits_model, tmp_path, monkeypatch, script):
    # What Python raises when the package is absent: ModuleNotFoundError(name="apache_beam").
    import tfcert

    monkeypatch.setitem(sys.modules, "apache_beam", None)
    monkeypatch.delitem(sys.modules, "tfcert.beam_pipeline", raising=False)
    monkeypatch.delattr(tfcert, "beam_pipeline", raising=False)  # imported again, and fails
    out = tmp_path / "o"
    if script == "certify":
        result = certify_here(*beam(digits_model, out, TWO_WORKERS))
    else:
        result = attack_here(*attack_beam(digits_model, out, TWO_WORKERS))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == MISSING
    assert not out.exists()


def test_rows_are_gathered_once_per_index_and_written_sorted(tmp_path, beam_installed):
    from tfcert import beam_pipeline, certification

    columns = ["index", "label", "seconds"]
    parts = tmp_path / "parts"
    parts.mkdir()
    task = certification.CertifyTask(argparse.Namespace(model="m", model_sha256="0"), columns,
                                     images_per_step=2)

    def write(step, rows):
        path = beam_pipeline.part_path(str(parts), task.label(step), task.size(step))
        beam_pipeline.write_part(path, columns, rows)

    write((5, 6), [{"index": 5, "label": 1, "seconds": 0.5},
                   {"index": 6, "label": 2, "seconds": 0.5}])
    # a second attempt of an overlapping step (a speculative or retried worker)
    write((6,), [{"index": 6, "label": 2, "seconds": 0.25}])
    (parts / "part-0000000009-1.tsv.abc.partial").write_text("index\tla")  # a killed write
    table = [{"index": "10", "label": "0", "seconds": "1"}, {"index": "5", "label": "1",
                                                             "seconds": "2"}]
    rows = beam_pipeline.gather_rows(table, str(parts), columns, task.key)
    assert sorted(rows, key=int) == ["5", "6", "10"]
    assert rows["5"]["seconds"] == "2" and rows["6"]["seconds"] == "0.5"  # first row wins
    assert beam_pipeline.missing(["5", "9", "10"], rows) == ["9"]
    tsv = tmp_path / "certify.tsv"
    beam_pipeline.write_table(str(tsv), columns, rows, task.order)
    assert [r["index"] for r in results.read_tsv(str(tsv))] == ["5", "6", "10"]
    assert (beam_pipeline.part_path("d", task.label((5, 6)), task.size((5, 6)))
            == os.path.join("d", "part-0000000005-2.tsv"))
    assert task.steps(["1", "3", "4"]) == [(1, 3), (4,)]


def test_worker_threads_share_the_cores_among_local_workers(beam_installed):
    from tfcert import beam_pipeline, cli

    def threads(text):
        return beam_pipeline.worker_threads(beam_pipeline.parse_pipeline_options(text))

    cores = os.cpu_count()
    assert threads(TWO_WORKERS) == max(1, cores // 2)
    assert threads(TWO_WORKERS + " --intra_op_threads=3") == 3
    assert threads(IN_PROCESS) is None  # in the driver: TensorFlow's own default
    assert threads("--runner=DataflowRunner") is None  # a worker machine of its own
    with pytest.raises(cli.CliError, match="cannot be split"):
        beam_pipeline.parse_pipeline_options("--runner='DirectRunner")
    with pytest.raises(cli.CliError, match="invalid int value: 'two'"):
        beam_pipeline.parse_pipeline_options("--direct_num_workers=two")


# ---------------------------------------------------------------- tfcert-attack --engine=beam
def attack_common(model, out, count=8):
    """A randomized defense under EOT PGD: every kind of per-example draw (random start,
    EOT draws, the defense's draws on the clean and adversarial images)."""
    return [f"--model={model}", "--dataset=digits", "--defense=gaussian", "--sigma=0.2",
            "--attack=pgd_linf", "--eps=0.05,0.1", "--steps=3", "--eot_samples=2",
            f"--num_examples={count}", "--batch_size=3", f"--output_dir={out}"]


def attack_beam(model, out, options, **kwargs):
    return [*attack_common(model, out, **kwargs), "--engine=beam", f"--beam_options={options}"]


def attack_rows(out):
    return results.read_tsv(str(out / "attack.tsv"))


def by_eps_and_index(rows):
    """Rows without seconds in the Beam engine's order (ε, then index)."""
    return sorted(without_seconds(rows), key=lambda r: (float(r["eps"]), int(r["index"])))


@pytest.fixture(scope="module")
def local_attack(digits_model, tmp_path_factory):
    """The local engine's attack run for `attack_common` (batch size 3)."""
    out = tmp_path_factory.mktemp("local_attack") / "run"
    done = attack_here(*attack_common(digits_model, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_two_worker_attack_pipeline_with_a_killed_worker_writes_the_local_engines_rows(
        digits_model, local_attack, tmp_path, beam_installed):
    """Two worker processes; the one of example 2's steps dies after writing its part
    file: no row lost or duplicated, and the run equals the local engine's.  (One run
    tests both: the two-worker pipeline and the killed worker were separate tests, each
    paying the two workers' start-up.)"""
    out = tmp_path / "beam"
    done = attack(*attack_beam(digits_model, out, TWO_WORKERS),
                  env={"TFCERT_BEAM_INJECT_FAILURE": "2:exit"})
    assert done.returncode == 0, done.stderr
    assert "attempt 1 failed (a Beam worker process died" in done.stderr
    rows = attack_rows(out)
    assert [r["key"] for r in rows] == [f"{e}/{i}" for e in ("0.05", "0.1") for i in range(8)]
    assert by_eps_and_index(rows) == by_eps_and_index(attack_rows(local_attack))
    for name in ("summary.txt", "robust_accuracy.tsv"):
        assert (out / name).read_text() == (local_attack / name).read_text(), name
    assert (out / "robust_accuracy.png").exists() and not (out / "beam_parts").exists()
    assert "robust accuracy" in done.stdout


@pytest.mark.slow
def test_attack_resume_computes_only_the_missing_rows(digits_model, local_attack, tmp_path,
                                                      beam_installed):
    """A partly finished run (rows in attack.tsv and in a part file of a killed Beam run)
    is resumed: those rows are kept as they were (their seconds too), the rest computed."""
    out = tmp_path / "beam"
    first = attack_here(*attack_beam(digits_model, out, IN_PROCESS))
    assert first.returncode == 0, first.stderr
    rows = attack_rows(out)
    header = (out / "attack.tsv").read_text().splitlines()[0]
    kept_tsv, kept_part = rows[:5], rows[5:7]

    def tsv_text(part):
        return header + "\n" + "".join("\t".join(r.values()) + "\n" for r in part)

    (out / "attack.tsv").write_text(tsv_text(kept_tsv))
    (out / "beam_parts").mkdir()
    # a recomputed part of these rows would sort before this one and win: its seconds differ
    (out / "beam_parts" / "part-0000000005-killed-2.tsv").write_text(tsv_text(kept_part))
    (out / "summary.txt").unlink()
    resumed = attack_here(*attack_beam(digits_model, out, IN_PROCESS))
    assert resumed.returncode == 0, resumed.stderr
    after = {r["key"]: r for r in attack_rows(out)}
    assert len(after) == 16 and all(after[r["key"]] == r for r in kept_tsv + kept_part)
    assert "7/16" in resumed.stderr  # the progress starts at the 7 kept rows
    assert by_eps_and_index(after.values()) == by_eps_and_index(attack_rows(local_attack))
