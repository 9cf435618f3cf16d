#!/usr/bin/env bash
# The model-zoo comparison and the Gaussian-noise study of docs/experiments.md (§6), on the simulated PASTIS
# that finetune_experiments.sh creates (run that first, or at least its data step).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=experiments/_work/ft
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$W/mlflow.db}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=${SEEDS:-"0 1 2"}
until [ -f $W/pastis.h5 ]; do sleep 10; done

$PY finetune.py sweep models --config experiments/configs/exp_pastis_zoo.yaml --data $W/pastis.h5 --seeds $SEEDS \
  --models ${MODELS:-utae convlstm unet3d fcn_lstm stenn} --out $W/zoo
$PY finetune.py sweep noise --config experiments/configs/exp_pastis_zoo.yaml --data $W/pastis.h5 --seeds $SEEDS \
  --sigmas 0 0.01 0.03 --noise-prob 0.5 --out $W/noise
