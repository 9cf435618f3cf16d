#!/usr/bin/env bash
# The model-zoo comparison and the Gaussian-noise study of docs/experiments.md (§5), on the simulated PASTIS
# that finetune_experiments.sh creates (run that first, or at least its data step).
# JOBS cells run at once, each with cores/JOBS threads (2 cores: 2 one-thread cells).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=experiments/_work/ft
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$W/mlflow.db}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
MODELS=${MODELS:-"utae utae_single_date utae_skip_mean utae_mean_attention utae_batchnorm convlstm convgru uconvlstm
  ubiconvlstm unet3d fpn_convlstm fcn_lstm stenn stcln"}
until [ -f $W/pastis.h5 ]; do sleep 10; done

$PY finetune.py sweep models --config experiments/configs/exp_pastis_zoo.yaml --data $W/pastis.h5 --seeds $SEEDS \
  --jobs $JOBS --models $MODELS --out $W/zoo
$PY finetune.py sweep noise --config experiments/configs/exp_pastis_zoo.yaml --data $W/pastis.h5 --seeds $SEEDS \
  --jobs $JOBS --sigmas 0 0.01 0.03 0.1 --noise-prob 0.5 --out $W/noise
