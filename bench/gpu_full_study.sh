#!/usr/bin/env bash
# The full-profile study of both datasets (3 seeds) at once on one GPU, on a fresh SQLite store:
# wall time of each and of both (target: 15 minutes on one H100-class GPU). Each study's step log
# goes to $RESULTS/full-study-<dataset>.log as it runs, so a run cut off by LIMIT seconds still
# shows every step that finished. Needs the project's Python environment and MEDMNIST_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/results/gpu}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-1200}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
timeout "$LIMIT" "$PYTHON" bench/perf.py --device cuda --workloads none --study --study-profile full \
    --study-dataset breastmnist,pneumoniamnist --out "$RESULTS/full-study.json" 2>&1 | tee "$RESULTS/full-study.txt"
status=${PIPESTATUS[0]}
grep -H "^\[study\].*: \(ran\|reused\|skipped\)" "$RESULTS"/full-study-*.log
exit "$status"
