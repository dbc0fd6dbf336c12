"""Trains a base classifier: ``python train.py --helpfull`` (same as ``tfcert-train``).

The flags live in :mod:`tfcert.scripts.train`, the run in :func:`tfcert.runs.train`.
"""

from tfcert.scripts.train import main

if __name__ == "__main__":
    main()
