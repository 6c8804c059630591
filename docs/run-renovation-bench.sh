#!/bin/bash
# docs/benchmarks.md, "Issue 18: before and after the renovation": the max rate at p99 <= 50 ms (zero errors)
# of the `demo` and `demo_cached` pipelines, served by the commit before the renovation (OLD) and by the
# renovated one (NEW), alternating OLD, NEW, OLD, NEW... in one run, the same bundle, trace and load generator
# (this tree's `jizhictl bench`, python -m jizhi.tools.bench). Each server runs from `git archive` of its commit,
# laid out as setup.cfg installs it (workers/ and cube/ inside jizhi/) and put first on PYTHONPATH, so the
# working tree's edits do not leak in. ~4 min a round on 2 cores with DURATION=10.
#   bash docs/run-renovation-bench.sh OLD_COMMIT NEW_COMMIT      (ROUNDS=2 DURATION=10 BENCH_DIR=/tmp/jizhi-reno)
set -euo pipefail
OLD=${1:?usage: run-renovation-bench.sh OLD_COMMIT NEW_COMMIT}; NEW=${2:?usage: run-renovation-bench.sh OLD_COMMIT NEW_COMMIT}
ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-10}
W=${BENCH_DIR:-/tmp/jizhi-reno}
PY=${PY:-python}
EP=tcp://127.0.0.1:5597
SRC=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$W"
cd "$W"    # not the checkout: python -c and -m put the working directory first on sys.path
echo "start $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg) old $OLD new $NEW rounds $ROUNDS duration ${DURATION}s"

tree() {   # the importable tree of a commit: $W/src-<commit>/jizhi (with workers/ and cube/ inside), etc/, bin/
    local d="$W/src-$1"
    if [ ! -d "$d" ]; then
        mkdir -p "$d"
        git -C "$SRC" archive "$1" jizhi workers cube etc bin | tar -x -C "$d"
        mv "$d/workers" "$d/jizhi/workers"; mv "$d/cube" "$d/jizhi/cube"
    fi
    echo "$d"
}

[ -d "$W/demo/models/demo/1" ] || $PY -c "from jizhi.tools.demo import init_demo; init_demo('$W/demo')"
[ -f "$W/trace.npz" ] || $PY -c "from jizhi.tools.demo import generate_trace; generate_trace('$W/demo/models/demo/1', '$W/trace.npz', requests=30000, candidates=500)"
printf '[metrics]\nlisten = ""\n' > "$W/jizhi.toml"

for round in $(seq 1 "$ROUNDS"); do
    for which in old new; do
        commit=$OLD; [ $which = new ] && commit=$NEW
        d=$(tree "$commit")
        rm -rf "$W/run"
        PYTHONPATH="$d" setsid $PY "$d/bin/jizhid" --config "$W/jizhi.toml" --models "$W/demo/models" --instance reno \
            --frontend $EP --pipelines demo,demo_cached --run-dir "$W/run" > "$W/jizhid-$which-$round.log" 2>&1 < /dev/null &
        JIZHID=$!
        trap 'kill -TERM $JIZHID 2>/dev/null || true' EXIT
        $PY -m jizhi.client --wait-ready $EP
        # `ready` comes before the hot tiers are built (a niced builder per version, ~15 s of a core each):
        # wait for both, so that the first point does not share the machine with them.
        for _ in $(seq 1 120); do
            [ "$(grep -c "hot tier generation 1" "$W/jizhid-$which-$round.log")" -ge 2 ] && break; sleep 1
        done
        $PY -m jizhi.tools.bench --endpoint $EP --trace "$W/trace.npz" --pipeline demo,demo_cached \
            --find-max --start-rate 50 --duration "$DURATION" --warmup 2 --slo-ms 50 --max-other-cores 0.3 \
            --json "$W/bench-$which-$round.json" --quiet | sed "s/^/$which $round: /"
        kill -TERM $JIZHID; wait $JIZHID || true; trap - EXIT
    done
done
$PY - "$W" "$ROUNDS" <<'PY'
import json, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
for pipe in ("demo", "demo_cached"):
    got = {}
    for which in ("old", "new"):
        got[which] = [next(r["max"]["offered_rps"] for r in json.load(open(f"{w}/bench-{which}-{k}.json"))["runs"]
                           if r["pipeline"] == pipe) for k in range(1, rounds + 1)]
    o, n = statistics.median(got["old"]), statistics.median(got["new"])
    print(f"{pipe}: old {got['old']} median {o:.0f} req/s; new {got['new']} median {n:.0f} req/s; new/old {n / o:.3f}")
PY
echo "end $(date -Is) load $(cut -d' ' -f1-3 /proc/loadavg)"
pgrep -af -- "--instance reno" || echo "no jizhid of this run left"
ls /dev/shm | grep -E "^jizhi\.reno\." || echo "no /dev/shm segment of this run left"
