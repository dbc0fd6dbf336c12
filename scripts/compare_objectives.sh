#!/usr/bin/env bash
# The comparison of training objectives in docs/RESULTS.md §4: every objective trained on
# mnist_subset with the same budget rule, then certified on the same test digits.
#
#   bash scripts/compare_objectives.sh SIGMA [NUM_EXAMPLES] [NUM_SAMPLES] [METHODS...]
#
# MAX_RADIUS (default 1.0) and GRID_POINTS (default 5) set the radii of the table, e.g.
#   MAX_RADIUS=2.8 GRID_POINTS=15 bash scripts/compare_objectives.sh 0.7 100 10000 stn_paper
# DATASET (default mnist_subset) trains and certifies on another dataset, e.g.
#   DATASET=fashion_mnist bash scripts/compare_objectives.sh 0.5 200 2000 stn_paper
#
# denoiser_mse, denoiser_stab, denoiser_stab_mse train a denoiser (train.py --method=denoiser,
# Salman et al.'s objectives) for the `standard` model (trained first if missing) and certify
# standard ∘ denoiser (certify.py --denoiser), e.g.
#   bash scripts/compare_objectives.sh 0.5 200 2000 standard denoiser_mse denoiser_stab denoiser_stab_mse
#
# Budget rule (the same for every objective): 10% of the training split held out, at most
# 15 epochs, stop after 3 epochs without a better validation accuracy under one fixed draw
# of N(0, σ²) noise, keep the best epoch.  Resumable: a finished model or certificate is
# kept, an interrupted training or certification continues where it stopped.
# Outputs: runs/compare/sigma$SIGMA/<objective>/{train,certify}/ and the joint table/plot
# in runs/compare/sigma$SIGMA/table/ (runs/compare/$DATASET/sigma$SIGMA/ for another DATASET).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
PY="$(venv_python "")"
SIGMA=${1:?usage: compare_objectives.sh SIGMA [NUM_EXAMPLES] [NUM_SAMPLES] [METHODS...]}
NUM_EXAMPLES=${2:-200}
NUM_SAMPLES=${3:-2000}
shift $(( $# < 3 ? $# : 3 ))
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(standard gaussian stn_paper stn_stop_gradient stn_code
                                     consistency macer smoothadv)
DATASET=${DATASET:-mnist_subset}
OUT=runs/compare/sigma$SIGMA
[ "$DATASET" = mnist_subset ] || OUT=runs/compare/$DATASET/sigma$SIGMA
MAX_RADIUS=${MAX_RADIUS:-1.0}
GRID_POINTS=${GRID_POINTS:-5}

method_flags() {
  case "$1" in
    stn_paper) echo "--method=stn --stability_target=paper" ;;
    stn_stop_gradient) echo "--method=stn --stability_target=stop_gradient" ;;
    stn_code) echo "--method=stn --stability_target=stn_code" ;;
    smoothadv) echo "--method=smoothadv --warmup_epochs=3" ;;  # warm-up scaled to the budget
    standard|gaussian|consistency|macer) echo "--method=$1" ;;
    denoiser_mse|denoiser_stab)
      echo "--method=denoiser --denoiser_objective=${1#denoiser_} --classifier=$OUT/standard/train/model.keras" ;;
    # MSE pre-training shorter than the patience, or the budget rule stops before Stab starts
    denoiser_stab_mse)
      echo "--method=denoiser --denoiser_objective=stab_mse --denoiser_mse_epochs=2 --classifier=$OUT/standard/train/model.keras" ;;
    *) echo "unknown objective $1" >&2; return 1 ;;
  esac
}

TSVS=()
train() {  # train NAME: the model (or denoiser) of objective NAME, kept once finished
  local name=$1 flags
  flags=$(method_flags "$name")
  if [ ! -f "$OUT/$name/train/model.keras" ]; then
    # shellcheck disable=SC2086
    "$PY" train.py --dataset="$DATASET" $flags --sigma="$SIGMA" --validation_split=0.1 \
      --patience=3 --epochs=15 --output_dir="$OUT/$name/train" --verbose=2
  fi
}

for name in "${METHODS[@]}"; do
  model=(--model="$OUT/$name/train/model.keras")
  if [[ $name == denoiser_* ]]; then
    train standard
    model=(--model="$OUT/standard/train/model.keras" --denoiser="$OUT/$name/train/model.keras")
  fi
  train "$name"
  "$PY" certify.py "${model[@]}" --dataset="$DATASET" \
    --sigma="$SIGMA" --num_examples="$NUM_EXAMPLES" --num_samples="$NUM_SAMPLES" --alpha=0.001 \
    --bounds=renyi,cohen --max_radius="$MAX_RADIUS" --grid_points="$GRID_POINTS" \
    --output_dir="$OUT/$name/certify"
  TSVS+=("$OUT/$name/certify/certify.tsv")
done
mkdir -p "$OUT/table"
"$PY" certify.py --analyze="$(IFS=,; echo "${TSVS[*]}")" --max_radius="$MAX_RADIUS" \
  --grid_points="$GRID_POINTS" --output_dir="$OUT/table" | tee "$OUT/table/table.txt"
