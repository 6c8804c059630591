#!/bin/bash
# docs/benchmarks.md: every figure of the page, in one run. ~10-20 min on 2 cores.
set -euo pipefail
cd "${JIZHI_SRC:-$(dirname "$0")/..}"
PY=.venv/bin/python
W=${BENCH_DIR:-/tmp/jizhi-bench}
EP=tcp://127.0.0.1:5599
mkdir -p "$W"
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"

# 0. The demo bundle (default sizes: 10,000 users, 100,000 items) and a trace
#    of 30,000 requests x 500 candidates (enough for 1,500 requests/s x 20 s
#    without a repeat). Made once, reused.
[ -d "$W/demo/models/demo/1" ] || $PY -c "from jizhi.tools.demo import init_demo; init_demo('$W/demo')"
[ -f "$W/trace.npz" ] || $PY -c "from jizhi.tools.demo import generate_trace; generate_trace('$W/demo/models/demo/1', '$W/trace.npz', requests=30000, candidates=500)"

# 1. The broker micro-benchmark (starts and stops its own jizhid per prefetch value).
$PY -m jizhi.tools.microbench --max-other-cores 0.3 --json "$W/microbench.json" | tee "$W/microbench.txt"

# 2. The server: the three pipelines in one jizhid, in its own session.
setsid .venv/bin/jizhid --models "$W/demo/models" --instance bench --frontend $EP \
    --pipelines demo,demo_unfused,legacy --run-dir "$W/run" > "$W/jizhid.log" 2>&1 < /dev/null &
JIZHID=$!
trap 'kill -TERM $JIZHID 2>/dev/null || true' EXIT
$PY -m jizhi.client --wait-ready $EP

# 3. Max rate at p99 <= 50 ms, zero errors, 20 s points, per pipeline, with CPU accounting.
$PY -m jizhi.tools.bench --endpoint $EP --trace "$W/trace.npz" --pipeline demo,demo_unfused,legacy \
    --find-max --start-rate 50 --duration 20 --warmup 2 --slo-ms 50 --cpu --run-dir "$W/run" \
    --max-other-cores 0.3 \
    --json "$W/bench.json" --quiet | tee "$W/bench.txt"

kill -TERM $JIZHID; wait $JIZHID || true; trap - EXIT

# 4. The ceiling (server stopped): one pinned process per core, batch 1 and 4.
$PY -m jizhi.tools.bench --ceiling --bundle "$W/demo/models/demo/1" --trace "$W/trace.npz" --duration 20 \
    --max-other-cores 0.3 --json "$W/ceiling_b1.json" | tee "$W/ceiling.txt"
$PY -m jizhi.tools.bench --ceiling --batch 4 --bundle "$W/demo/models/demo/1" --trace "$W/trace.npz" --duration 20 \
    --max-other-cores 0.3 --json "$W/ceiling_b4.json" | tee -a "$W/ceiling.txt"

# 5. Hot reload under load: a jizhid serving only `demo` from a private copy of version 1 (new versions are
#    published into it), three new versions one after another at half the fused plan's maximum of step 3.
RATE=$($PY -c "import json; r = [x for x in json.load(open('$W/bench.json'))['runs'] if x['pipeline'] == 'demo'][0]; print(r['max']['offered_rps'] / 2)")
rm -rf "$W/reload/models" && mkdir -p "$W/reload/models/demo" && cp -r "$W/demo/models/demo/1" "$W/reload/models/demo/1"
printf '[metrics]\nlisten = ""\n' > "$W/reload/jizhi.toml"
setsid .venv/bin/jizhid --config "$W/reload/jizhi.toml" --models "$W/reload/models" --instance benchreload \
    --frontend $EP --pipelines demo --run-dir "$W/reload/run" > "$W/reload/jizhid.log" 2>&1 < /dev/null &
JIZHID=$!
trap 'kill -TERM $JIZHID 2>/dev/null || true' EXIT
$PY -m jizhi.client --wait-ready $EP
$PY -m jizhi.tools.reloadbench --endpoint $EP --run-dir "$W/reload/run" --models "$W/reload/models" --trace "$W/trace.npz" \
    --rate "$RATE" --reloads 3 --max-other-cores 0.3 --json "$W/reload.json" --quiet | tee "$W/reload.txt"
kill -TERM $JIZHID; wait $JIZHID || true; trap - EXIT

echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
pgrep -af -- "--run-dir $W/(reload/)?run( |$)|$W/(reload/)?run/plan|jizhi-microbench" || echo "no jizhi process of this run left"
ls /dev/shm | grep -E "^jizhi\.(bench|benchreload|mb[0-9]+p)" || echo "no /dev/shm segment of this run left"
