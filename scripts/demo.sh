#!/usr/bin/env bash
# The main job end to end on the embedded mnist_subset data: install tfcert into .venv/ (once),
# train an STN model,
# certify test images (Renyi and Cohen radii side by side), export it for TF Serving and query it.
# Outputs go to runs/demo/ (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
PY="$(venv_python "")"
rm -rf runs/demo
SIGMA=0.5
"$PY" train.py --dataset=mnist_subset --method=stn --sigma=$SIGMA --gamma=1 --epochs=3 \
  --output_dir=runs/demo/train --verbose=2
"$PY" certify.py --model=runs/demo/train/model.keras --dataset=mnist_subset --sigma=$SIGMA \
  --num_examples=200 --num_samples=500 --alpha=0.001 --bounds=renyi,cohen \
  --output_dir=runs/demo/certify
"$PY" export --model=runs/demo/train/model.keras --sigma=$SIGMA --num_samples=1000 --alpha=0.001 \
  --bound=renyi --base_dir=runs/demo/serving --name=tfcert_mnist
# A TF Serving REST request for three test digits, answered in-process by the exported model
# (the server itself is not installable here; see export/README.md for serving it).
"$PY" -c "from tfcert import cli; cli.import_tensorflow_quietly(); import numpy as np; from tfcert import data; np.save('runs/demo/images.npy', data.load_arrays('mnist_subset', 'test')[0][:3])"
"$PY" export/client_rest.py --images=runs/demo/images.npy --signature=certify_seeded --seed 1 2 3 \
  --model=tfcert_mnist --local=runs/demo/serving/tfcert_mnist/1
