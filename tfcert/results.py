"""Streamed, resumable result files and run directories for the long-running scripts.

A run directory holds ``config.json`` (the full configuration), one TSV that grows a
row at a time as results are computed, and the final tables/plots, written only when
the run completes.  Rerunning the same command resumes: rows already in the TSV are
kept and not recomputed, a torn last line left by an interruption is dropped, and a
run directory made with a different configuration is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence


class RunConfigMismatchError(RuntimeError):
    """The output directory holds a run with another configuration."""


def prepare_run_dir(output_dir: str, config: Mapping[str, Any], operational: Iterable[str],
                    defaults: Mapping[str, Any] | None = None,
                    results_file: str | None = None) -> None:
    """Checks ``output_dir`` against ``config``, then creates it and its ``config.json``.

    Every setting of ``config`` except the ``operational`` ones (scheduling, output and
    display options, which never change a row) is the run's identity: a directory
    holding a run whose identity differs is refused with `RunConfigMismatchError`
    *before anything is written*.  A setting missing from an older ``config.json`` is
    taken to have had its value in ``defaults``.

    Args:
        output_dir: the run directory.
        config: the full configuration (JSON-serialisable), e.g. every flag.
        operational: names of the settings that may change between resumes.
        defaults: values of settings an older run did not record.
        results_file: the run's result file (e.g. ``certify.tsv``): one without a
            ``config.json`` beside it cannot be checked, and is refused.

    Take the folder's lock (`lock_run_dir`) first: a refused second process then never
    rewrites the running one's ``config.json``.
    """
    path = os.path.join(output_dir, "config.json")
    config = json.loads(json.dumps(dict(config), default=str))  # as it reads back
    defaults = json.loads(json.dumps(dict(defaults or {}), default=str))  # tuples as lists
    if results_file and not os.path.exists(path) and os.path.exists(
            os.path.join(output_dir, results_file)):
        raise RunConfigMismatchError(
            f"{output_dir} holds a {results_file} but no config.json, so its rows cannot be "
            "checked against these settings; choose another --output_dir")
    if os.path.exists(path):
        old = read_config(path)
        skip = set(operational)
        changed = [k for k in sorted(set(old) | set(config)) if k not in skip
                   and old.get(k, defaults.get(k)) != config.get(k, defaults.get(k))]
        if changed:
            details = ", ".join(f"--{k} ({_show(old.get(k, defaults.get(k)))} -> "
                                f"{_show(config.get(k, defaults.get(k)))})" for k in changed)
            raise RunConfigMismatchError(
                f"the settings differ from the run in {output_dir}: {details}; use the same "
                "settings to resume it, or another --output_dir")
    os.makedirs(output_dir, exist_ok=True)
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(path: str) -> dict[str, Any]:
    """A run's ``config.json``, with a one-line error if it is corrupt."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise RunConfigMismatchError(
                f"{path} is corrupt ({err}); delete {os.path.dirname(path)} or choose another "
                "--output_dir") from err


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"  # one per writer
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lock_run_dir(output_dir: str):
    """Takes an exclusive lock on ``output_dir`` (created if needed) for this process
    (released at exit, also when killed); a second process writing the same run is refused."""
    import fcntl

    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:  # e.g. a file of that name
        raise RunConfigMismatchError(f"cannot use {output_dir} as the output folder ({err})")
    handle = open(os.path.join(output_dir, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise RunConfigMismatchError(
            f"another process is writing the run in {output_dir}; wait for it or choose "
            "another --output_dir") from err
    return handle


@contextlib.contextmanager
def locked_run_dir(output_dir: str) -> Iterator[None]:
    """`lock_run_dir` for the length of a block, released when it ends, also by an error
    (so that the same process can resume the run, e.g. from Python)."""
    handle = lock_run_dir(output_dir)
    try:
        yield
    finally:
        handle.close()


def remove_files(output_dir: str, names: Iterable[str]) -> None:
    """Deletes ``names`` in ``output_dir`` (an earlier completion's summaries: once new rows
    are on the way they would look current)."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


class ResultTable:
    """A TSV file written row by row, durable after each `append`, resumable.

    Args:
        path: the TSV file.
        columns: column names; an existing file must have the same header.
        key: the column that identifies a row (e.g. the example index).
    """

    def __init__(self, path: str, columns: Sequence[str], key: str):
        if key not in columns:
            raise ValueError(f"key {key!r} is not one of the columns {list(columns)}")
        self.path, self.columns, self.key = path, list(columns), key
        self.rows: list[dict[str, str]] = []
        if os.path.exists(path):
            self._load_existing()
        else:
            write_atomic(path, "\t".join(self.columns) + "\n")

    def _load_existing(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # torn last line from an interruption
            print(f"warning: dropped an incomplete last line of {self.path} (an interrupted "
                  "write); it is recomputed", file=sys.stderr)
            with open(self.path, "wb") as f:
                f.write(complete)
                f.flush()
                os.fsync(f.fileno())
        lines = complete.decode().splitlines()
        if not lines or lines[0].split("\t") != self.columns:
            raise RunConfigMismatchError(
                f"{self.path} has another header than {self.columns}; choose another "
                "--output_dir or delete the file")
        rows = [dict(zip(self.columns, line.split("\t"))) for line in lines[1:]
                if len(line.split("\t")) == len(self.columns)]
        first = {}
        for row in rows:  # a key written twice (older versions) counts once
            first.setdefault(row[self.key], row)
        self.rows = list(first.values())

    @property
    def done(self) -> set[str]:
        """Keys of the rows already written."""
        return {row[self.key] for row in self.rows}

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Appends rows (dicts by column), flushed and synced to disk before returning."""
        rows = [{c: _format(row[c]) for c in self.columns} for row in rows]
        with open(self.path, "a", newline="") as f:
            f.write(tsv_lines(self.columns, rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)


def tsv_lines(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """The TSV lines of ``rows`` (dicts by column; numbers to 6 significant digits, lists
    comma-joined): the one line format of every result table."""
    return "".join("\t".join(_format(row[c]) for c in columns) + "\n" for row in rows)


def write_tsv(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes a whole TSV (header and ``rows``) atomically (`write_atomic`), in the line
    format of `ResultTable`."""
    write_atomic(path, "\t".join(columns) + "\n" + tsv_lines(columns, rows))


def read_tsv(path: str) -> list[dict[str, str]]:
    """Reads a TSV written by `ResultTable` into a list of dicts of strings: its complete
    lines (a torn last line of an interrupted write, without its newline, is left out)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such result file: {path}")
    with open(path, newline="") as f:
        text = f.read()
    return list(csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1]), delimiter="\t"))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_format(v) for v in value)
    text = str(value)
    if "\t" in text or "\n" in text:
        raise ValueError(f"a TSV cell cannot contain tabs or newlines: {text!r}")
    return text
