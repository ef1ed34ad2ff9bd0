#!/usr/bin/env bash
# The GPU check: the full-profile studies of both datasets, run at once on one GPU, timed end to
# end (target: 15 minutes on one H100-class GPU); the table comes last. The tracking store lives in
# $STORE and each study's step log is appended to $RESULTS/full-study-<dataset>.log as it runs, so
# a call cut off by LIMIT seconds (or by a device call's 10-minute limit) is simply run again on the
# same machine: it reuses the finished steps, and the summary adds up every step's time over all
# calls. The step logs are copied to docs/bench/ (KEEP) when the studies have finished. Remove $STORE
# and the logs for a fresh measurement. DEVICE=cpu PROFILE=smoke exercises the script on a CPU.
# Needs the project's Python environment and MEDMNIST_ROOT.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PROFILE=${PROFILE:-full}
RESULTS=${RESULTS:-bench/results/$DEVICE}
STORE=${STORE:-$RESULTS/$PROFILE-study-store}
KEEP=${KEEP:-docs/bench}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-540}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
fi
timeout "$LIMIT" "$PYTHON" bench/perf.py --device "$DEVICE" --workloads none --study --study-profile "$PROFILE" \
    --study-dataset breastmnist,pneumoniamnist --study-store "$STORE" --out "$RESULTS/$PROFILE-study.json" \
    >> "$RESULTS/$PROFILE-study.txt" 2>&1
status=$?
for log in "$RESULTS"/"$PROFILE"-study-*.log; do
    grep -H "^\[study\].*: \(ran\|reused\|skipped\)" "$log"
    # the last run of each step counts (compare runs again in every call)
    sed -n 's/^\[study\] \([^:]*\): ran [0-9a-f]* (\([0-9]*\) s).*/\1 \2/p' "$log" \
        | awk -v file="$log" '{ t[$1] = $2 } END { for (s in t) { total += t[s]; n += 1 }
              printf "%s: %d steps ran, %d s of step time over all calls\n", file, n, total }'
    if [ "$status" = 0 ]; then
        cp "$log" "$KEEP/$(basename "$log" .log)-$DEVICE.log"
    fi
done
if [ "$status" = 0 ]; then
    "$PYTHON" bench/perf.py --render "$RESULTS/$PROFILE-study.json"
else
    echo "the studies did not finish within $LIMIT s (exit $status): run this script again to continue them"
    tail -n 5 "$RESULTS/$PROFILE-study.txt"
fi
exit "$status"
