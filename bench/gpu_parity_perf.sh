#!/usr/bin/env bash
# The GPU parity and speed check (under 8 minutes on one H100-class GPU): CPU/GPU fp32 parity and smallcnn
# under fp16 and bf16 autocast vs. fp32, the cost of MoCo's shuffling BN, the performance table in
# one pass (with the per-sample reference paths and feature switches), and a quick-profile study on
# a fresh store; the table is printed last.
# Results go to $RESULTS (default bench/results/gpu/). Needs the project's Python environment and MEDMNIST_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || exit 1

echo "== parity: CPU vs CUDA in fp32, same seed and model; autocast vs. fp32 =="
timeout 150 "$PYTHON" bench/gpu_parity.py 2>&1 | tee "$RESULTS/parity.txt"
parity=${PIPESTATUS[0]}

echo "== MoCo's shuffling BN: step cost on this GPU =="
timeout 90 "$PYTHON" bench/split_bn_cost.py --device cuda --batch 512 --rounds 10 --out "$RESULTS/split-bn.json" 2>&1 \
    | tee "$RESULTS/split-bn.txt"

echo "== performance table + quick-profile study =="
timeout 360 "$PYTHON" bench/perf.py --device cuda --dataset pneumoniamnist --models smallcnn,resnet18 \
    --workers 0,8 --min-time 1 --repeats 1 --compile resnet18/simclr --study --out "$RESULTS/perf-cuda.json" 2>&1 \
    | tee "$RESULTS/perf.txt"
perf=${PIPESTATUS[0]}
echo "parity exit $parity, perf exit $perf"
exit $(( parity || perf ))
