"""Certifies a trained classifier: ``python certify.py --helpfull`` (same as ``tfcert-certify``).

The flags and the program live in :mod:`tfcert.scripts.certify`, the run logic in
:mod:`tfcert.certification`.
"""

from tfcert.scripts.certify import main

if __name__ == "__main__":
    main()
