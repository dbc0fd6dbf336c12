"""certify.py --engine=beam (tfcert.beam_pipeline): the local engine's rows, retries, resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from tfcert import results

TWO_WORKERS = ("--runner=DirectRunner --direct_num_workers=2 "
               "--direct_running_mode=multi_processing")
IN_PROCESS = "--runner=DirectRunner"
MISSING = ("error: --engine=beam needs Apache Beam, which is not installed: "
           "pip install 'tfcert[beam]'")


def certify(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "certify.py"), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


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
    done = certify(*common(digits_model, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def beam_installed():
    pytest.importorskip("apache_beam")


@pytest.mark.slow
def test_two_worker_pipeline_writes_the_local_engines_rows(digits_model, local_run, tmp_path,
                                                           beam_installed):
    out, work = tmp_path / "beam", tmp_path / "work"
    options = f"{TWO_WORKERS} --tfcert_work_dir={work}"  # model staged and parts written there
    done = certify(*beam(digits_model, out, options))
    assert done.returncode == 0, done.stderr
    assert without_seconds(rows_of(out)) == without_seconds(rows_of(local_run))
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
@pytest.mark.parametrize("options, failure, seen", [
    # FnApiRunner fails the pipeline; the engine reruns the steps without rows
    (TWO_WORKERS, "2", "attempt 1 failed (RuntimeError: injected failure at index 2"),
    # a worker process dies: FnApiRunner would hang; the engine's watch fails the run instead
    (TWO_WORKERS, "2:exit", "attempt 1 failed (a Beam worker process died"),
    # this runner retries the failed bundle itself: no engine retry
    ("--runner=BundleBasedDirectRunner", "2", "injected failure at index 2"),
], ids=["worker_raises", "worker_process_dies", "runner_retries_bundle"])
def test_a_failed_worker_loses_and_duplicates_no_row(digits_model, local_run, tmp_path,
                                                     beam_installed, options, failure, seen):
    """The injected failure strikes after the step's part file is written: the worst
    moment for duplicates (the retry finds the rows of the failed attempt)."""
    out = tmp_path / "beam"
    done = certify(*beam(digits_model, out, options),
                   env={"TFCERT_BEAM_INJECT_FAILURE": failure})
    assert done.returncode == 0, done.stderr
    assert seen in done.stderr
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
    reference = certify(*common(digits_model, local, count=24, samples=2000))
    assert reference.returncode == 0, reference.stderr
    assert without_seconds(rows) == without_seconds(rows_of(local))


def test_without_beam_a_one_line_error(digits_model, tmp_path):
    shim = tmp_path / "shim" / "apache_beam"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(  # what Python raises when the package is absent
        'raise ModuleNotFoundError("No module named \'apache_beam\'", name="apache_beam")\n')
    path = os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "o"
    result = certify(*beam(digits_model, out, TWO_WORKERS), env={"PYTHONPATH": path})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == MISSING
    assert not out.exists()


def test_rows_are_gathered_once_per_index_and_written_sorted(tmp_path, beam_installed):
    from tfcert import beam_pipeline

    columns = ["index", "label", "seconds"]
    parts = tmp_path / "parts"
    parts.mkdir()
    beam_pipeline.write_part(beam_pipeline.part_path(str(parts), (5, 6)), columns,
                             [{"index": 5, "label": 1, "seconds": 0.5},
                              {"index": 6, "label": 2, "seconds": 0.5}])
    # a second attempt of an overlapping step (a speculative or retried worker)
    beam_pipeline.write_part(beam_pipeline.part_path(str(parts), (6,)), columns,
                             [{"index": 6, "label": 2, "seconds": 0.25}])
    (parts / "part-0000000009-1.tsv.abc.partial").write_text("index\tla")  # a killed write
    table = [{"index": "10", "label": "0", "seconds": "1"}, {"index": "5", "label": "1",
                                                             "seconds": "2"}]
    rows = beam_pipeline.gather_rows(table, str(parts), columns)
    assert sorted(rows, key=int) == ["5", "6", "10"]
    assert rows["5"]["seconds"] == "2" and rows["6"]["seconds"] == "0.5"  # first row wins
    assert beam_pipeline.missing(["5", "9", "10"], rows) == ["9"]
    tsv = tmp_path / "certify.tsv"
    beam_pipeline.write_table(str(tsv), columns, rows)
    assert [r["index"] for r in results.read_tsv(str(tsv))] == ["5", "6", "10"]
    assert beam_pipeline.part_path("d", (5, 6)) == os.path.join("d", "part-0000000005-2.tsv")


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
