#!/usr/bin/env bash
# The model-zoo comparison and the Gaussian-noise study of docs/experiments.md (§5), on the simulated PASTIS
# that finetune_experiments.sh creates (run that first, or at least its data step).
# JOBS cells run at once, each with cores/JOBS threads (2 cores: 2 one-thread cells). Cheap cells first;
# HEAVY (FPN-ConvLSTM, STENN) run last with HEAVY_SEEDS only. STCLN runs at the §3 size (widths 16/32, 2
# layers): the paper-size STCLN needs about an hour per 60-step cell on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=experiments/_work/ft
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$W/mlflow.db}
SEEDS=${SEEDS:-"0 1 2"}
HEAVY_SEEDS=${HEAVY_SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
MODELS=${MODELS:-"utae utae_single_date utae_skip_mean utae_mean_attention utae_batchnorm uconvlstm ubiconvlstm unet3d"}
RECURRENT=${RECURRENT:-"fcn_lstm convlstm convgru"}
HEAVY=${HEAVY:-"fpn_convlstm stenn"}
until [ -f $W/pastis.h5 ]; do sleep 10; done
sweep() { local kind=$1; shift; $PY finetune.py sweep "$kind" --config experiments/configs/exp_pastis_zoo.yaml --data $W/pastis.h5 --jobs $JOBS "$@"; }

sweep noise --seeds $SEEDS --sigmas 0 0.01 0.03 0.1 --noise-prob 0.5 --out $W/noise
sweep models --seeds $SEEDS --models $MODELS --out $W/zoo
sweep models --seeds $SEEDS --models stcln --out $W/zoo_stcln_small -- \
  --model.kwargs "{encoder_kwargs: {widths: [16, 32], n_head: 4, d_ffn: 64, n_layers: 2}}"
sweep models --seeds $SEEDS --models $RECURRENT --out $W/zoo
sweep models --seeds $HEAVY_SEEDS --models $HEAVY --out $W/zoo
$PY experiments/summarize_sweeps.py zoo zoo_stcln_small noise
