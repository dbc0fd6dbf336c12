"""ResultTable / run directories: durable appends, torn-line recovery, config mismatch."""

import json

import numpy as np
import pytest

from tfcert import results


def test_append_resume_and_torn_line(tmp_path):
    path = str(tmp_path / "r.tsv")
    table = results.ResultTable(path, ["index", "value"], "index")
    table.append([{"index": 0, "value": 0.5}, {"index": 1, "value": [1, 2]}])
    with open(path, "a") as f:
        f.write("2\t0.7")  # interrupted mid-line
    again = results.ResultTable(path, ["index", "value"], "index")
    assert again.done == {"0", "1"}
    assert again.rows[1]["value"] == "1,2"
    again.append([{"index": 2, "value": 0.25}])
    assert open(path).read().splitlines()[-1] == "2\t0.25"
    assert len(results.read_tsv(path)) == 3


def test_header_mismatch_is_refused(tmp_path):
    path = str(tmp_path / "r.tsv")
    results.ResultTable(path, ["index", "a"], "index")
    with pytest.raises(results.RunConfigMismatchError, match="header"):
        results.ResultTable(path, ["index", "b"], "index")


def test_run_dir_refuses_other_settings_but_allows_operational_ones_to_change(tmp_path):
    out = str(tmp_path / "run")
    results.prepare_run_dir(out, {"sigma": 0.5, "batch_size": 10}, ["batch_size"])
    results.prepare_run_dir(out, {"sigma": 0.5, "batch_size": 99}, ["batch_size"])
    assert json.load(open(f"{out}/config.json"))["batch_size"] == 99
    before = open(f"{out}/config.json").read()
    # every setting not declared operational is compared, also one never seen before
    for config, shown in (({"sigma": 0.25, "batch_size": 99}, r"--sigma \(0.5 -> 0.25\)"),
                          ({"sigma": 0.5, "split": "train"}, r"--split \(None -> train\)")):
        with pytest.raises(results.RunConfigMismatchError, match=shown):
            results.prepare_run_dir(out, config, ["batch_size"])
    assert open(f"{out}/config.json").read() == before  # refused runs write nothing


def test_settings_an_older_run_did_not_record_take_their_defaults(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"sigma": 0.5}))
    results.prepare_run_dir(str(out), {"sigma": 0.5, "split": "test"}, [], {"split": "test"})
    with pytest.raises(results.RunConfigMismatchError, match=r"--split \(test -> train\)"):
        results.prepare_run_dir(str(out), {"sigma": 0.5, "split": "train"}, [],
                                {"split": "test"})


def test_a_refused_run_creates_no_folder(tmp_path):
    """The check comes before any write: a mismatch leaves the file system as it was."""
    out = tmp_path / "run"
    results.prepare_run_dir(str(out), {"sigma": 0.5}, [])
    (out / "config.json").write_text("{not json")
    with pytest.raises(results.RunConfigMismatchError, match="corrupt"):
        results.prepare_run_dir(str(out), {"sigma": 0.5}, [])
    assert (out / "config.json").read_text() == "{not json"


def test_a_second_writer_is_refused(tmp_path):
    lock = results.lock_run_dir(str(tmp_path))
    with pytest.raises(results.RunConfigMismatchError, match="another process"):
        results.lock_run_dir(str(tmp_path))
    lock.close()
    results.lock_run_dir(str(tmp_path)).close()  # free again once the first one is gone


def test_duplicate_keys_count_once(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("index\tvalue\n0\ta\n1\tb\n0\tc\n")
    table = results.ResultTable(str(path), ["index", "value"], "index")
    assert [r["value"] for r in table.rows] == ["a", "b"]


def test_cells_cannot_break_the_format(tmp_path):
    table = results.ResultTable(str(tmp_path / "r.tsv"), ["index"], "index")
    with pytest.raises(ValueError, match="tabs or newlines"):
        table.append([{"index": "a\tb"}])


def test_compared_runs_get_one_colour_per_run_and_one_dash_per_bound(tmp_path):
    from tfcert.analysis import plot_curves
    from tfcert.certification import run_styles

    labels = [f"run{i}" for i in range(11)]  # more runs than tab10 has colours
    bounds = {label: ["renyi", "cohen"] for label in labels}
    styles = run_styles([(label, []) for label in labels], bounds)
    assert styles["run0 renyi"]["color"] == styles["run0 cohen"]["color"]
    assert len({styles[f"{label} renyi"]["color"] for label in labels}) == len(labels)
    assert {styles[f"{label} renyi"]["linestyle"] for label in labels} == {"-"}
    assert {styles[f"{label} cohen"]["linestyle"] for label in labels} == {"--"}
    grid = np.linspace(0.0, 1.0, 50)
    path = tmp_path / "compare.png"
    plot_curves(grid, {name: 1.0 - grid for name in styles}, str(path), styles=styles)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_result_file_without_its_config_is_refused(tmp_path):
    """Issue: rows copied into a folder without config.json were reused unchecked."""
    (tmp_path / "certify.tsv").write_text("index\tlabel\n0\t1\n")
    with pytest.raises(results.RunConfigMismatchError, match="no config.json"):
        results.prepare_run_dir(str(tmp_path), {"sigma": 0.5}, set(), results_file="certify.tsv")
    assert not (tmp_path / "config.json").exists()


def test_the_lock_is_taken_before_the_config_is_written(tmp_path):
    """Issue: a refused second process had already rewritten the running one's config.json."""
    run = tmp_path / "new" / "run"
    lock = results.lock_run_dir(str(run))  # creates the folder
    results.prepare_run_dir(str(run), {"sigma": 0.5}, set())
    with pytest.raises(results.RunConfigMismatchError, match="another process"):
        results.lock_run_dir(str(run))
    lock.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(results.RunConfigMismatchError, match="cannot use"):
        results.lock_run_dir(str(tmp_path / "file"))
