#!/bin/bash
# docs/benchmarks.md, "Caches on against off": max pairs/s at p99 <= 50 ms on the demo trace
# (N = 500), with the hot tier and the query cache off, the hot tier on, and both on, one after
# another on the same machine, plus the hit ratios. ~10 min on 2 cores.
set -euo pipefail
cd "${JIZHI_SRC:-$(dirname "$0")/..}"
PY=.venv/bin/python
W=${BENCH_DIR:-/tmp/jizhi-bench}
EP=tcp://127.0.0.1:5598
mkdir -p "$W/caches"
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -d "$W/demo/models/demo/1" ] || $PY -c "from jizhi.demo import init_demo; init_demo('$W/demo')"
[ -f "$W/trace.npz" ] || $PY -c "from jizhi.demo import generate_trace; generate_trace('$W/demo/models/demo/1', '$W/trace.npz', requests=30000, candidates=500)"

serve() {   # serve NAME HOT_TIER_MB PIPELINES
    printf '[metrics]\nlisten = ""\n[cube]\nhot_tier_mb = %s\n' "$2" > "$W/caches/$1.toml"
    setsid .venv/bin/jizhid --config "$W/caches/$1.toml" --models "$W/demo/models" --instance cache$1 \
        --frontend $EP --pipelines "$3" --run-dir "$W/caches/run-$1" > "$W/caches/$1.log" 2>&1 < /dev/null &
    JIZHID=$!
    trap 'kill -TERM $JIZHID 2>/dev/null || true' EXIT
    $PY -m jizhi.client --wait-ready $EP
    # The hot tier is built by a child after start: wait for it (or for nothing to build).
    for _ in $(seq 120); do grep -q "hot tier generation 1" "$W/caches/$1.log" && break; [ "$2" = 0 ] && break; sleep 0.5; done
}

run() {     # run NAME PIPELINES
    $PY -m jizhi.bench --endpoint $EP --trace "$W/trace.npz" --pipeline "$2" --find-max --start-rate 100 \
        --duration 20 --warmup 2 --slo-ms 50 --cpu --run-dir "$W/caches/run-$1" --max-other-cores 0.3 \
        --json "$W/caches/$1.json" --quiet | tee "$W/caches/$1.txt"
    .venv/bin/jizhictl stats --run-dir "$W/caches/run-$1" --json > "$W/caches/$1.stats.json"
    .venv/bin/jizhictl stats --run-dir "$W/caches/run-$1" | tail -4 | tee -a "$W/caches/$1.txt"
    kill -TERM $JIZHID; wait $JIZHID || true; trap - EXIT
}

serve off 0 demo;                 run off demo               # LMDB only, no query cache
serve hot 512 demo;               run hot demo               # the hot tier holds the whole cube
serve both 512 demo_cached;       run both demo_cached       # hot tier + query cache (120 s window)

$PY - "$W/caches" <<'PYEOF'
import json, sys
d = sys.argv[1]
best = {}
for name in ("off", "hot", "both"):
    runs = json.load(open(f"{d}/{name}.json"))["runs"]
    m = runs[0]["max"]
    best[name] = m
    st = json.load(open(f"{d}/{name}.stats.json"))
    cube = next(iter(st.get("cube", {}).values()), {})
    pipe = next(iter(st["pipelines"].values()))
    timings = m.get("timings_us") or {}
    print(f"{name:5s} max {m['offered_rps']:.0f} req/s, {m['goodput_pairs_s']:,.0f} pairs/s, p99 {m['p99_ms']:.1f} ms; "
          f"hot-tier hit ratio {cube.get('hot_ratio')}; mean stage us {timings}")
for name in ("hot", "both"):
    print(f"{name} / off: {best[name]['goodput_pairs_s'] / best['off']['goodput_pairs_s']:.2f}x pairs/s")
PYEOF
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
ls /dev/shm | grep -E "^jizhi\.cache(off|hot|both)\." || echo "no /dev/shm segment of this run left"
