"""``python export --helpfull``: the export entry point of the checkout (same as ``tfcert-export``).

The flags and the program live in :mod:`tfcert.scripts.export`; this folder also holds the
TF Serving material (README, REST/gRPC clients, batching parameters, latency probe).
"""

import os
import sys

# `python export` puts export/ first on sys.path: import the tfcert of this checkout, not
# whatever other tfcert is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfcert.scripts.export import main  # noqa: E402

if __name__ == "__main__":
    main()
