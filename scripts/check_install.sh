#!/usr/bin/env bash
# A plain, non-editable `pip install` of this checkout into a fresh virtual environment of
# $PYTHON (default python3), then the console scripts from another directory: train,
# certify and export a small digits model (the export must hold its TF Serving warmup file).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root"
bin="$work/venv/bin"
cd "$work"
"$bin/tfcert-train" --dataset=digits --model=small_cnn --epochs=1 --method=stn --sigma=0.25 \
  --output_dir=train --verbose=0
"$bin/tfcert-certify" --model=train/model.keras --dataset=digits --sigma=0.25 --num_examples=4 \
  --num_samples=200 --output_dir=certify
"$bin/tfcert-export" --model=train/model.keras --sigma=0.25 --num_samples=200 \
  --base_dir=serving --name=digits
"$bin/tfcert-attack" --model=train/model.keras --dataset=digits --eps=0.05 --num_examples=4 \
  --steps=2 --output_dir=attack
test -s serving/digits/1/assets.extra/tf_serving_warmup_requests
echo "plain install on $("$bin/python" --version): console scripts work"
