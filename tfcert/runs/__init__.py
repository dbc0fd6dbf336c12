"""Whole runs from Python: the library behind ``tfcert-train``, ``tfcert-certify`` and
``tfcert-attack``.

Each script is its flags turned into a config and one call here::

    from tfcert import runs

    runs.train(runs.TrainConfig(dataset="digits", method="stn", sigma=0.25, epochs=4,
                                output_dir="runs/stn"))
    rows = runs.certify(runs.CertifyConfig(model="runs/stn/model.keras", dataset="digits",
                                           sigma=0.25, num_examples=50,
                                           output_dir="runs/certify"))
    runs.attack(runs.AttackConfig(model="runs/stn/model.keras", dataset="digits",
                                  eps=(0.05, 0.1), output_dir="runs/attack"))

A config's fields are the script's flags (names, defaults, checks and error messages), and
a run records them in its ``config.json``: a run started here and resumed with the
script (or the reverse) is the same run.  Rerunning an interrupted run resumes it.
"""

from tfcert.runs.config import AttackConfig, CertifyConfig, TrainConfig
from tfcert.runs.driver import attack, certify
from tfcert.runs.trainer import train

__all__ = ["AttackConfig", "CertifyConfig", "TrainConfig", "attack", "certify", "train"]
