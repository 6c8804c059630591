#!/bin/bash
# The offline tuner on the demo (jizhictl tune, jizhi/tools/tune.py): 16 evaluations of the fused demo plan, then the
# shipped default against the chosen setting, 3 times each, alternating. Each measurement starts its own jizhid
# (instances tune<pid>n<N>, free loopback ports), so nothing may serve or benchmark meanwhile: run it on a quiet
# machine. About (16 + 6) x (5 + 20 + ~15) s = 15 min on 2 cores.
#
#   docs/run-tune-bench.sh RATE
#
# RATE (requests/s) is the fixed offered load of every measurement: 70-80 % of the shipped default's maximum
# at p99 <= 50 ms from `jizhictl bench --find-max` on the same machine (docs/benchmarks.md; e.g. 0.75 x 325).
set -euo pipefail
RATE=${1:?usage: docs/run-tune-bench.sh RATE, requests/s: 70-80 % of the max of the default demo plan from jizhictl bench --find-max}
cd "${JIZHI_SRC:-$(dirname "$0")/..}"
PY=.venv/bin/python
W=${TUNE_DIR:-/tmp/jzb/tune}
MODELS=/tmp/jzb/demo/models
TRACE=/tmp/jzb/trace30k.npz
mkdir -p "$W"
[ -d "$MODELS/demo/1" ] || $PY -c "from jizhi.tools.demo import init_demo; init_demo('/tmp/jzb/demo')"
[ -f "$TRACE" ] || $PY -c "from jizhi.tools.demo import generate_trace; generate_trace('$MODELS/demo/1', '$TRACE', requests=30000, candidates=500)"
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$W/run.log"

# `jizhictl tune` (jizhi/tools/commands.py registers it); the module itself otherwise (the same command).
if .venv/bin/jizhictl tune --help > /dev/null 2>&1; then TUNE=(.venv/bin/jizhictl tune); else TUNE=($PY -m jizhi.tools.tune); fi
set +e
"${TUNE[@]}" --models "$MODELS" --trace "$TRACE" --pipeline etc/pipelines/demo.toml \
    --rate "$RATE" --slo-p99 50 --evals ${EVALS:-16} --repeats ${REPEATS:-3} --duration 20 --warmup 5 --seed 1 \
    --max-other-cores 0.3 --quiet --out "$W" 2>&1 | tee -a "$W/run.log"
rc=${PIPESTATUS[0]}
set -e

echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$W/run.log"
pgrep -af -- "--instance tune[0-9]+n[0-9]+ " || echo "no jizhid of the tuner left"
ls /dev/shm | grep -E "^jizhi\.tune[0-9]+n[0-9]+\." || echo "no /dev/shm segment of the tuner left"
echo "rc=$rc" | tee -a "$W/run.log"
exit "$rc"
