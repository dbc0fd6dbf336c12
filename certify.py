"""Certifies a trained classifier: ``python certify.py --helpfull`` (same as ``tfcert-certify``).

The flags live in :mod:`tfcert.scripts.certify`, the run in :func:`tfcert.runs.certify`
(its work in :mod:`tfcert.certification`).
"""

from tfcert.scripts.certify import main

if __name__ == "__main__":
    main()
