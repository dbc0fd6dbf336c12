"""The oracle limit of early stopping, from section 7 reports of ``benchmarks/bench.py``.

    python benchmarks/wald_oracle.py runs/bench30/stn.json runs/bench30/digits_renyi.json

An oracle that knew in advance which images it will certify (the *clear* and *near the
target* classes of the report: top class correct, p > p*) would spend nothing on the
others and exactly Wald's bound on these.  Prints its samples per image and its ratio to
fixed n, and the same with one more image given up (the "one image fewer" a comparison
at equal certified accuracy allows), which saves at most ``max_samples`` draws.
"""

from __future__ import annotations

import json
import sys

CERTIFIABLE = ("clear", "near the target")


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: python benchmarks/wald_oracle.py REPORT.json ... "
                 "(written by benchmarks/bench.py --output_json)")
    for path in paths:
        with open(path) as f:
            report = json.load(f)["certification"]["early_stopping"]
        classes, n, images = report["image_classes"], report["max_samples"], report["images"]
        total = sum(classes[k]["images"] * classes[k]["wald"] for k in CERTIFIABLE)
        skipped = images - sum(classes[k]["images"] for k in CERTIFIABLE)
        print(f"{path}: oracle {total / images:.1f} samples per image "
              f"({n * images / total:.1f}x fewer than n = {n}), nothing on {skipped} images; "
              f"one more image given up: at least {(total - n) / images:.1f} "
              f"(at most {n * images / (total - n):.1f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
