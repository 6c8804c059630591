#!/bin/bash
# docs/benchmarks.md, "Structured features on against off, and against LEGACY" (issue 6): max pairs/s at
# p99 <= 50 ms with N = 100, 500 and 1000 candidates per request, one jizhid per N serving
#   demo             the fused plan, structured features on (the default, workers/model_inference.py)
#   demo_per_pair    the same plan with structured = false: every stage per pair (the user's features read,
#                    hashed, looked up and fed to the network once per candidate; the naive per-pair graph)
#   legacy           one monolithic stage, one request at a time, one sample per pair
#   demo_cached      (N = 500 only) structured features, the hot tier and the query cache
# one pipeline after another in one run; then the DLRM (on / off) at N = 500. ~35-40 min on 2 cores.
set -euo pipefail
cd "${JIZHI_SRC:-$(dirname "$0")/..}"
PY=.venv/bin/python
W=${BENCH_DIR:-/tmp/jizhi-bench}
EP=tcp://127.0.0.1:5597
mkdir -p "$W/structured"
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg) commit $(git rev-parse --short HEAD)"
[ -d "$W/demo/models/demo/1" ] || $PY -c "from jizhi.tools.demo import init_demo; init_demo('$W/demo')"
sed -e 's/^name = "demo"/name = "demo_per_pair"/' -e '/^on_unknown/a structured = false' \
    etc/pipelines/demo.toml > "$W/structured/demo_per_pair.toml"
grep -q '^structured = false' "$W/structured/demo_per_pair.toml"

printf '[metrics]\nlisten = ""\n' > "$W/structured/jizhi.toml"

measure() {     # measure NAME MODELS PIPELINE_FILES BENCH_PIPELINES TRACE: one jizhid, find-max per pipeline
    setsid .venv/bin/jizhid --config "$W/structured/jizhi.toml" --models "$2" --instance struct$1 \
        --frontend $EP --pipelines "$3" --run-dir "$W/structured/run$1" > "$W/structured/jizhid$1.log" 2>&1 < /dev/null &
    JIZHID=$!
    trap 'kill -TERM $JIZHID 2>/dev/null || true' EXIT
    $PY -m jizhi.client --wait-ready $EP
    for _ in $(seq 120); do grep -q "hot tier generation 1" "$W/structured/jizhid$1.log" && break; sleep 0.5; done
    $PY -m jizhi.tools.bench --endpoint $EP --trace "$5" --pipeline "$4" --find-max --start-rate 25 \
        --duration 20 --warmup 2 --slo-ms 50 --cpu --run-dir "$W/structured/run$1" --max-other-cores 0.3 \
        --json "$W/structured/$1.json" --quiet | tee "$W/structured/$1.txt"
    kill -TERM $JIZHID; wait $JIZHID || true; trap - EXIT
}

for N in ${NS:-100 500 1000}; do     # NS="500" for one N
    T="$W/structured/trace$N.npz"
    Q=$(( 4000000 / N ))     # enough requests for the fastest pipeline's 20 s points without a repeat
    [ $Q -lt 20000 ] && Q=20000
    [ -f "$T" ] || $PY -c "from jizhi.tools.demo import generate_trace; generate_trace('$W/demo/models/demo/1', '$T', requests=$Q, candidates=$N)"
    PIPES=demo,demo_per_pair,legacy
    [ $N = 500 ] && PIPES=$PIPES,demo_cached
    measure n$N "$W/demo/models" "demo,$W/structured/demo_per_pair.toml,legacy,demo_cached" $PIPES "$T"
done

# The DLRM-shaped model without a user tower (jizhi/tools/dlrm.py: 13 dense features, 16 fields of dim 64, dot
# interaction, top MLP 256-128-1), imported with jizhictl import's code path, at N = 500.
D="$W/structured/dlrm"
[ -d "$D/models/dlrm/1" ] || $PY -m jizhi.tools.dlrm make "$D" --trace-requests 20000 --candidates 500 --quiet
measure dlrm "$D/models" "$D/dlrm.toml,$D/dlrm_per_pair.toml" dlrm,dlrm_per_pair "$D/trace.npz"

$PY - "$W/structured" <<'PYEOF'
import json, sys
d = sys.argv[1]
import os
for n in (100, 500, 1000):
    if not os.path.exists(f"{d}/n{n}.json"):
        continue
    runs = {r["pipeline"]: r["max"] for r in json.load(open(f"{d}/n{n}.json"))["runs"]}
    best = {p: m["goodput_pairs_s"] for p, m in runs.items()}
    line = ", ".join(f"{p} {v:,.0f}" for p, v in best.items())
    print(f"N={n}: max pairs/s at p99 <= 50 ms: {line}")
    on, off, legacy = best.get("demo"), best.get("demo_per_pair"), best.get("legacy")
    if on and off:
        print(f"  structured on / off: {on / off:.2f}x")
    if on and legacy:
        print(f"  demo / legacy: {on / legacy:.2f}x")
    if best.get("demo_cached") and legacy:
        print(f"  demo_cached / legacy: {best['demo_cached'] / legacy:.2f}x")
if os.path.exists(f"{d}/dlrm.json"):
    best = {r["pipeline"]: r["max"]["goodput_pairs_s"] for r in json.load(open(f"{d}/dlrm.json"))["runs"]}
    print(f"DLRM, N=500: dlrm {best['dlrm']:,.0f}, dlrm_per_pair {best['dlrm_per_pair']:,.0f} pairs/s: "
          f"structured on / off {best['dlrm'] / best['dlrm_per_pair']:.2f}x")
PYEOF
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
ls /dev/shm | grep -E "^jizhi\.struct" || echo "no /dev/shm segment of this run left"
