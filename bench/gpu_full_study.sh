#!/usr/bin/env bash
# The full-profile study of both datasets (3 seeds) at once on one GPU: wall time of each and of
# both (target: 15 minutes on one H100-class GPU). The tracking store lives in $STORE and each
# study's step log is appended to $RESULTS/full-study-<dataset>.log as it runs, so a call cut off
# by LIMIT seconds (or by a device call's time limit) can be run again on the same machine: it
# reuses the finished steps, and the summary adds up every step's time over all calls. Remove
# $STORE and the logs for a fresh measurement. Needs the project's Python environment and MEDMNIST_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/results/gpu}
STORE=${STORE:-$RESULTS/full-study-store}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-540}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
timeout "$LIMIT" "$PYTHON" bench/perf.py --device cuda --workloads none --study --study-profile full \
    --study-dataset breastmnist,pneumoniamnist --study-store "$STORE" --out "$RESULTS/full-study.json" 2>&1 \
    | tee -a "$RESULTS/full-study.txt"
status=${PIPESTATUS[0]}
grep -H "^\[study\].*: \(ran\|reused\|skipped\)" "$RESULTS"/full-study-*.log
for log in "$RESULTS"/full-study-*.log; do
    # the last run of each step counts (compare runs again in every call)
    sed -n 's/^\[study\] \([^:]*\): ran [0-9a-f]* (\([0-9]*\) s).*/\1 \2/p' "$log" \
        | awk -v file="$log" '{ t[$1] = $2 } END { for (s in t) { total += t[s]; n += 1 }
              printf "%s: %d steps ran, %d s of step time over all calls\n", file, n, total }'
done
exit "$status"
