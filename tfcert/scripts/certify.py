r"""Certifies a trained classifier under Gaussian noise (STN Algorithm 1; docs/SOUNDNESS.md).

    python certify.py --model=runs/stn/model.keras --dataset=mnist_subset --sigma=0.7 \
        --num_examples=500 --num_samples=10000 --alpha=0.001 --bounds=renyi,cohen \
        --output_dir=runs/certify_stn

Streams one row per example to ``<output_dir>/certify.tsv`` (index, label, prediction,
correct, radius per bound, p1_lower, p2_upper, counts, seconds) as it goes; rerunning
the same command resumes where it stopped (also after a kill), and a rerun whose
settings differ from the run's ``config.json`` is refused.  At the end it prints and
writes the certified accuracy over a radius grid per bound (``certified_accuracy.tsv``,
``.png``, ``summary.txt``).  ``--num_shards=N --shard_index=j`` certifies every N-th of
the selected examples (one process or machine per shard); ``--merge=D0,D1,...
--output_dir=D`` joins the finished shards into one run with the rows of a single run.
``--analyze=a.tsv,b.tsv`` draws several finished runs on one figure (e.g. several σ, as
STN Fig. 1).  The flags are the fields of `tfcert.runs.CertifyConfig`; the run is
`tfcert.runs.certify` (from Python: the same run, resumable either way).
"""

from __future__ import annotations

from tfcert import cli, runs
from tfcert.scripts import config_flags

config_flags.define_flags(runs.CertifyConfig)


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    runs.certify(config_flags.config_from_flags(runs.CertifyConfig))


def main() -> None:
    """The ``tfcert-certify`` / ``python certify.py`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
