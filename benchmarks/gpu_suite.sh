#!/usr/bin/env bash
# Every GPU benchmark of issue 13 in one run that ends within ~9 minutes, for a short lease of a GPU machine
# whose Python already has torch, timm, accelerate, einops, h5py, safetensors, scipy and tqdm.
#
#   make gpu-wheels                     # once, where pip works: hdf5plugin + crc32c wheels into .whl/
#   bash benchmarks/gpu_suite.sh OUT    # on the GPU machine, from the repository root
#
# Writes OUT/suite.log (everything, in order), OUT/env.txt and OUT/fold_*.json: few files, so that they all
# come back from a remote machine. Steps run by priority; each has its own time limit, capped by what is
# left of SUITE_SECONDS (default 540), so a slow or hanging step cannot take the rest with it. The numbers
# go to benchmarks/RESULTS.md with the hardware from env.txt.
# SUITE_SMOKE=1 SUITE_DEVICE=cpu bash benchmarks/gpu_suite.sh /tmp/x: the same steps at toy sizes (tried on CPU).
set -u
OUT=${1:-${OUT:-/tmp/sitskit_gpu_suite}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${SUITE_SECONDS:-540} ))
LOG="$OUT/suite.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/sitskit_inductor

if ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU image lacks, carried as wheels (make gpu-wheels)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sitskit_site \
        .whl/*.whl && export PYTHONPATH="/tmp/sitskit_site:$PYTHONPATH"
fi
HAVE_DATA=1
$PY -c "import hdf5plugin, crc32c" 2>/dev/null || HAVE_DATA=0

{
    date -u; uname -a; nproc; free -g | head -2
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
    echo "data steps (hdf5plugin, crc32c importable): $HAVE_DATA"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee "$LOG"

# step NAME LIMIT_S CMD...: run with the smaller of LIMIT_S and the time left; log everything to suite.log
step() {
    local name=$1 limit=$2 left rc
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "== $name: skipped, ${left}s left" | tee -a "$LOG"; return; fi
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E '(it/s|patch/s|s/it)\]' >> "$LOG"
    rc=${PIPESTATUS[0]}
    echo "   -> exit $rc" | tee -a "$LOG"
}
data_step() {
    if (( HAVE_DATA )); then step "$@"; else echo "== $1: skipped, no hdf5plugin/crc32c (make gpu-wheels)" | tee -a "$LOG"; fi
}

DEV=${SUITE_DEVICE:-cuda}
VS="benchmarks/bench_vs_reference.py --device $DEV --repeats 5 --warmup 2"
FOLD=490 PRE="--steps 10" BF="--train-steps 40 --size 128"
if [[ ${SUITE_SMOKE:-0} == 1 ]]; then
    VS="$VS --repeats 1 --warmup 0 --utae-size 32 --stcln-size 16 --dates 6 --batch 1"
    FOLD=4 PRE="--steps 1 --crop 8 --dates 6 --batch-size 1" BF="--train-steps 1 --size 16 --skip-stcln"
fi
step  vs_reference_fp32     120 $PY $VS
data_step fold_utae         150 $PY benchmarks/bench_fold_inference.py --simulate $FOLD --device $DEV --workers 12 \
                                --configs fp32 bf16 fp32+nchw bf16+compile --json "$OUT/fold_utae.json"
step  pretrain_paper_fp32    45 $PY benchmarks/bench_pretrain.py --device $DEV $PRE --warmup 2 --markdown
step  pretrain_paper_bf16    45 $PY benchmarks/bench_pretrain.py --device $DEV $PRE --warmup 2 --markdown \
                                --mixed-precision bf16
step  pretrain_paper_bf16_compile 120 $PY benchmarks/bench_pretrain.py --device $DEV $PRE --warmup 3 --markdown \
                                --mixed-precision bf16 --compile
step  vs_reference_bf16      90 $PY $VS --bf16
data_step bf16_accuracy      90 $PY benchmarks/bench_bf16.py --device $DEV $BF
step  vs_reference_compile  150 $PY $VS --compile --only utae-eval utae-train
echo "== done $(date -u +%H:%M:%S)" | tee -a "$LOG"
