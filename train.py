"""Trains a base classifier: ``python train.py --helpfull`` (same as ``tfcert-train``).

The flags and the program live in :mod:`tfcert.scripts.train`.
"""

from tfcert.scripts.train import main

if __name__ == "__main__":
    main()
