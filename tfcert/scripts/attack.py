r"""Robust accuracy of a defense under an attack over a sweep of ε.

    tfcert-attack --model=runs/std/model.keras --dataset=mnist_subset \
        --defense=randdisc --sigma=0.15 --attack=pgd_linf --eps=0.05,0.1,0.2,0.3 \
        --steps=40 --eot_samples=20 --output_dir=runs/attack_randdisc

(also ``python -m tfcert.scripts.attack``).  Streams ``attack.tsv`` as it goes and resumes; ends
with ``robust_accuracy.tsv``, ``.png`` and ``summary.txt``; ``--analyze=a.tsv,b.tsv``
draws finished runs on one figure.  ``--engine=beam --beam_options="..."`` computes the
same rows on an Apache Beam pipeline (docs/SCALING.md).  The flags are the fields of
`tfcert.runs.AttackConfig`; the run is `tfcert.runs.attack` (logic:
:mod:`tfcert.robust_accuracy`).
"""

from __future__ import annotations

from tfcert import cli, runs
from tfcert.scripts import config_flags

config_flags.define_flags(runs.AttackConfig)


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    runs.attack(config_flags.config_from_flags(runs.AttackConfig))


def main() -> None:
    """The ``tfcert-attack`` / ``python -m tfcert.scripts.attack`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
