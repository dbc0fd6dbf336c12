"""absl flags from a `tfcert.runs` config class: one flag per field (its name, default, help,
kind and bounds), defined for the script that calls `define_flags`, and the config of
the parsed flags (`config_from_flags`)."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from absl import flags

flags.disclaim_key_flags()  # the flags defined here belong to the calling script

Config = TypeVar("Config")


def define_flags(config_class: type[Config]) -> None:
    """Defines a flag for every field of ``config_class`` (a `tfcert.runs` config).

    Args:
        config_class: `tfcert.runs.TrainConfig`, `CertifyConfig` or `AttackConfig`.
    """
    for field in dataclasses.fields(config_class):
        meta, name = field.metadata, field.name
        kind, default = meta["kind"], field.default
        if kind == "enum":
            flags.DEFINE_enum(name, default, list(meta["choices"]), meta["help"])
        elif kind == "list":
            flags.DEFINE_list(name, None if default is None else list(default), meta["help"])
        elif kind in ("integer", "float"):
            getattr(flags, f"DEFINE_{kind}")(name, default, meta["help"],
                                             lower_bound=meta["lower_bound"],
                                             upper_bound=meta["upper_bound"])
        elif kind == "dataset":  # a name or path on the command line
            flags.DEFINE_string(name, default, meta["help"])
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, meta["help"])


def config_from_flags(config_class: type[Config]) -> Config:
    """The config of the parsed flags, checked by the config (a bad combination is a
    `tfcert.cli.CliError`, the script's one-line error).

    Args:
        config_class: the class whose flags `define_flags` defined.
    """
    values = flags.FLAGS
    return config_class(**{f.name: values[f.name].value for f in dataclasses.fields(config_class)})
