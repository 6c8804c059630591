#!/usr/bin/env bash
# README, "Install and serve the demo": the demo bundle's creation time and jizhid's time to ready, on a first
# start (Numba compiling its kernels: an empty NUMBA_CACHE_DIR) and on a later one (the cache filled).
# Wall time and the CPU of every process of the run (jizhid's children are waited for, so /usr/bin/time counts
# them; a start's CPU is counted until it stops, right after ready). Usage: docs/run-startup-timings.sh [PORT]
set -euo pipefail
PORT=${1:-45777}
W=$(mktemp -d /tmp/jizhi-startup.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"
printf '[metrics]\nlisten = ""\n' > nometrics.toml
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. The demo bundle alone (what jizhid --demo runs first on a first use), Numba cache empty.
export NUMBA_CACHE_DIR=$W/numba1
mkdir -p "$NUMBA_CACHE_DIR"
/usr/bin/time -f "demo bundle (jizhictl demo init): %e s wall, %U+%S s CPU" \
    jizhictl demo init "$W/demo" > /dev/null 2> init.err || { cat init.err; exit 1; }
tail -1 init.err

start() {   # LABEL TAG: jizhid --demo until "ready: serving", then SIGTERM
    local t0 t1 timer pid
    t0=$(date +%s.%N)
    /usr/bin/time -f "%U %S" -o "cpu.$2" jizhid --demo --demo-dir "$W/demo" --instance "startup$$" \
        --run-dir "$W/run" --frontend "tcp://127.0.0.1:$PORT" --config nometrics.toml > "start.$2.log" 2>&1 &
    timer=$!
    until grep -q "ready: serving" "start.$2.log" 2> /dev/null; do
        kill -0 "$timer" 2> /dev/null || { tail "start.$2.log"; exit 1; }
        sleep 0.05
    done
    t1=$(date +%s.%N)
    pid=$(pgrep -P "$timer")          # jizhid, the child of /usr/bin/time
    kill -TERM "$pid"
    wait "$timer" || true
    printf "%s: %.1f s wall to ready; %s s CPU (every process of the run, start to stop)\n" "$1" \
        "$(echo "$t1 - $t0" | bc)" "$(awk '{print $1 + $2}' "cpu.$2")"
}

# 2. A start of that bundle with an empty Numba cache, then a second one with the cache it filled.
export NUMBA_CACHE_DIR=$W/numba2
mkdir -p "$NUMBA_CACHE_DIR"
start "first start (empty Numba cache)" cold
start "second start (Numba cache filled)" warm

# 3. The README's first use: jizhid --demo with no bundle and an empty Numba cache.
export NUMBA_CACHE_DIR=$W/numba3
mkdir -p "$NUMBA_CACHE_DIR"
rm -rf "$W/demo"
start "first use: jizhid --demo creating the bundle (empty Numba cache)" first
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
