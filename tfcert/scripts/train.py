r"""Trains a base classifier with one of tfcert's training objectives.

    tfcert-train --dataset=mnist_subset --method=stn --sigma=0.7 --gamma=1 \
        --epochs=10 --output_dir=runs/stn_mnist

Methods (``--method``): standard; gaussian (Gaussian augmentation, Cohen et al. 2019);
stn (stability training with noise, STN Sec. 5.1, ``--stability_target``); consistency
(Jeong & Shin 2020); macer (Zhai et al. 2020); smoothadv (Salman et al. 2019); pgd (Madry
PGD adversarial training); trades (TRADES).  See `tfcert.training` and
`tfcert.adversarial_training`.

Writes to --output_dir ``model.keras``, ``config.json`` (every flag), ``log.csv`` and
``metrics.json`` (and TensorBoard logs to ``--tensorboard_dir``).  ``--patience=P`` stops
when the validation accuracy under noise has not improved for P epochs and keeps the best
epoch's weights, the rule used to compare objectives in docs/RESULTS.md:

    tfcert-train --method=macer --sigma=0.5 --validation_split=0.1 --patience=3 --epochs=15

``--strategy=mirrored`` trains on every GPU of the machine, ``--batch_size`` being the
global batch (``multi_worker`` is refused: Keras 3's ``fit`` fails under
``MultiWorkerMirroredStrategy``, keras-team/keras#20585);
``--mixed_precision=mixed_float16`` (or ``mixed_bfloat16``) computes in 16 bits with float32
weights, and ``model.keras`` is saved as its float32 clone (`tfcert.training`):

    tfcert-train --method=stn --sigma=0.5 --strategy=mirrored --mixed_precision=mixed_float16

An interrupted run resumes from its last finished epoch and trains exactly as an
uninterrupted run would; resuming with other settings (anything but --epochs, --verbose,
--data_dir, --download, --tensorboard_dir) is refused.  The flags are the fields of
`tfcert.runs.TrainConfig`; the run (files, resume) is `tfcert.runs.train`.
"""

from __future__ import annotations

from tfcert import cli, runs
from tfcert.scripts import config_flags

config_flags.define_flags(runs.TrainConfig)


def run(argv: list[str]) -> None:
    cli.require(len(argv) == 1, f"unexpected arguments {argv[1:]}; all options are --flags")
    runs.train(config_flags.config_from_flags(runs.TrainConfig))


def main() -> None:
    """The ``tfcert-train`` / ``python train.py`` entry point."""
    cli.run(run)


if __name__ == "__main__":
    main()
