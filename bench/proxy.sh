#!/usr/bin/env bash
# bench/proxy.sh: what the gateway costs as a proxy, compared with calling the backend directly.
#
# Method:
#   * Build the release binary and the open-loop load generator (examples/loadgen.rs), then
#     start two processes on free loopback ports:
#       - `mofa-gateway sim`: the simulated model server, with no time to first token and no
#         pacing (--ttft-ms 0 --tokens-per-sec 0), so it answers as fast as it can;
#       - `mofa-gateway serve`: the gateway, with one model `mofa-sim` whose one local
#         deployment is the sim (max_concurrency 64, the default: above the 32 connections of
#         the full-load run; a burst beyond it queues rather than opening one new upstream
#         connection per request).
#   * Every request is the same non-streaming POST /v1/chat/completions,
#       {"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}
#   * After a warm-up of both (WARMUP seconds each), in one run and in this order, each load
#     first against the sim directly, then against the gateway:
#       1. full load, closed loop: wrk, CONNS connections (default 32), THREADS threads
#          (default 2), DURATION seconds (default 15). A Lua done() hook prints requests/s and
#          latency percentiles in microseconds, for exact parsing;
#       2. few connections, closed loop: wrk, LOW_CONNS connections (default 4), same
#          duration. The backend answers at once, so this can still drive the gateway near its
#          full rate: the report prints the share of the full-load rate it reached;
#       3. half load, open loop: loadgen sends requests at a fixed rate, half the requests/s
#          the gateway reached at full load (HALF_SHARE, default 0.5), for DURATION seconds
#          after a 2 s warm-up, whatever the answers (wrk cannot hold a fixed rate). loadgen
#          paces its launches with tokio's timer (1 ms resolution), so at 10 000 requests/s
#          they leave in bursts of ~10 per millisecond; direct and gateway see the same bursts.
#   * Reported per run: requests/s, p50, p99, failures (wrk: non-2xx/3xx responses and socket
#     errors; loadgen: anything but a 200) and the CPU seconds used during the run by the sim,
#     the gateway, the load generator, other processes and idle (from /proc), with a warning
#     when other processes took 5% of the CPU or more; then
#       - throughput ratio = gateway requests/s / direct requests/s at full load, against the
#         target >= 0.75;
#       - added p50 = gateway p50 - direct p50, in ms, at every load; the one at half load
#         against the target < 0.2 ms.
#   * The load generator, the sim and the gateway run on the same machine and share its cores:
#     through the gateway the CPU also runs a second server and a second hop, so the ratio is
#     the cost of the gateway on a box with no spare cores, not on one where it has its own.
#   * GW_WORKERS=N sets the gateway's server.worker_threads (default: unset, one per core).
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/proxy.sh    (env: CONNS THREADS DURATION LOW_CONNS WARMUP HALF_SHARE GW_WORKERS)

set -euo pipefail
export LC_ALL=C # decimal points in printf and awk

CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
LOW_CONNS=${LOW_CONNS:-4}
WARMUP=${WARMUP:-3}
HALF_SHARE=${HALF_SHARE:-0.5}
GW_WORKERS=${GW_WORKERS:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/mofa-gateway"
LOADGEN="$ROOT/target/release/examples/loadgen"
BODY='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'

for v in CONNS THREADS DURATION LOW_CONNS WARMUP; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
if ! [[ $HALF_SHARE =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then
    echo "error: HALF_SHARE must be a number in (0, 1] (got '$HALF_SHARE')" >&2
    exit 2
fi
if [[ -n $GW_WORKERS ]] && ! [[ $GW_WORKERS =~ ^[0-9]+$ ]]; then
    echo "error: GW_WORKERS must be an integer >= 0 (got '$GW_WORKERS')" >&2
    exit 2
fi
if ((THREADS > CONNS)); then
    echo "error: THREADS ($THREADS) must not exceed CONNS ($CONNS)" >&2
    exit 2
fi
LOW_THREADS=$((THREADS < LOW_CONNS ? THREADS : LOW_CONNS))
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 2; }
done

# --- wrk --------------------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "wrk not found; installing it with apt-get" >&2
        apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
    else
        echo "error: wrk is not installed; install it (Debian/Ubuntu: sudo apt-get install wrk)" >&2
        exit 2
    fi
fi

# Build, process handling (start, wait_ready, cleanup on exit) and free ports: bench/lib.sh.
source "$ROOT/bench/lib.sh"
read -r SIM_PORT GW_PORT < <(free_ports 2)
SIM_URL="http://127.0.0.1:$SIM_PORT/v1/chat/completions"
GW_URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"

start sim "$BIN" sim --listen "127.0.0.1:$SIM_PORT" --model mofa-sim --ttft-ms 0 --tokens-per-sec 0
SIM_PID=$LAST_PID
{
    if [[ -n $GW_WORKERS ]]; then
        printf '[server]\nworker_threads = %s\n\n' "$GW_WORKERS"
    fi
    cat <<EOF
[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
max_concurrency = 64
EOF
} >"$TMP/gateway.toml"
start gateway "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$GW_PORT"
GW_PID=$LAST_PID
wait_ready sim "$SIM_URL" "$SIM_PID"
wait_ready gateway "$GW_URL" "$GW_PID"

# --- wrk script -------------------------------------------------------------------------------
cat >"$TMP/chat.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'

-- One machine-readable line; latencies in microseconds.
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "RESULT rps=%.1f p50_us=%d p99_us=%d failed=%d sockerr=%d\n",
        summary.requests / (summary.duration / 1e6), latency:percentile(50),
        latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

# --- measurement helpers ----------------------------------------------------------------------
TICK=$(getconf CLK_TCK)
# CPU time (user + system, clock ticks) used so far by process $1.
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# Busy and idle CPU time (clock ticks, all CPUs together) of the whole machine so far.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
# CPU seconds of the finished children of a shell, from the output of `times` in file $1.
child_secs() {
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "%.2f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$1"
}
secs() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { printf "%.2f", (b - a) / t }'; }

# measure NAME CMD...: runs the load generator CMD, its output in $TMP/NAME.out, and writes
# the CPU seconds used meanwhile to $TMP/NAME.cpu, as key=value words.
measure() {
    local name=$1 sim0 gw0 busy0 idle0 sim1 gw1 busy1 idle1 c_sim c_gw c_load c_other
    shift
    sim0=$(proc_ticks "$SIM_PID")
    gw0=$(proc_ticks "$GW_PID")
    read -r busy0 idle0 < <(machine_ticks)
    # In a subshell whose only child is the load generator, so that `times` there gives its
    # CPU time.
    if ! ("$@" >"$TMP/$name.out" 2>"$TMP/$name.err" && times >"$TMP/load.times"); then
        cat "$TMP/$name.out" "$TMP/$name.err" >&2
        echo "error: $1 failed" >&2
        exit 1
    fi
    read -r busy1 idle1 < <(machine_ticks)
    sim1=$(proc_ticks "$SIM_PID")
    gw1=$(proc_ticks "$GW_PID")
    c_sim=$(secs "$sim0" "$sim1" "$TICK")
    c_gw=$(secs "$gw0" "$gw1" "$TICK")
    c_load=$(child_secs "$TMP/load.times")
    c_other=$(awk -v b="$(secs "$busy0" "$busy1" "$TICK")" -v x="$c_sim" -v y="$c_gw" \
        -v z="$c_load" 'BEGIN { o = b - x - y - z; printf "%.2f", o < 0 ? 0 : o }')
    printf 'cpu_sim=%s cpu_gw=%s cpu_load=%s cpu_other=%s cpu_idle=%s cpu_total=%s\n' \
        "$c_sim" "$c_gw" "$c_load" "$c_other" "$(secs "$idle0" "$idle1" "$TICK")" \
        "$(secs "$((busy0 + idle0))" "$((busy1 + idle1))" "$TICK")" >"$TMP/$name.cpu"
}

# closed_loop NAME URL CONNS THREADS SECONDS: a wrk run; results in $TMP/NAME.result.
closed_loop() {
    local name=$1 url=$2 conns=$3 threads=$4 dur=$5
    echo "== $name: wrk, $conns connections, $threads threads, ${dur}s -> $url" >&2
    measure "$name" wrk -t "$threads" -c "$conns" -d "${dur}s" --timeout 5s --latency \
        -s "$TMP/chat.lua" "$url"
    grep -v '^RESULT ' "$TMP/$name.out" | sed 's/^/    /' >&2
    if ! grep -q '^RESULT ' "$TMP/$name.out"; then
        echo "error: no RESULT line from wrk" >&2
        exit 1
    fi
    echo "$(sed -n 's/^RESULT //p' "$TMP/$name.out") load=${conns}conn $(<"$TMP/$name.cpu")" \
        >"$TMP/$name.result"
}

# open_loop NAME URL RATE SECONDS: a loadgen run at RATE requests/s; results in $TMP/NAME.result.
open_loop() {
    local name=$1 url=$2 rate=$3 dur=$4
    echo "== $name: loadgen, $rate requests/s, ${dur}s after 2 s of warm-up -> $url" >&2
    measure "$name" "$LOADGEN" --url "$url" --rate "$rate" --duration-s "$dur" --warmup-s 2 \
        --timeout-s 5 --body "$BODY"
    sed 's/^/    /' "$TMP/$name.out" >&2
    echo "$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["latency_ms"].get("200", {})
failed = sum(n for k, n in r["outcomes"].items() if k != "200")
print("rps=%.1f p50_us=%d p99_us=%d failed=%d sockerr=0 lag_p99_ms=%s" % (
    r["goodput_rps"], round(ok.get("p50", 0) * 1000), round(ok.get("p99", 0) * 1000), failed,
    r["launch_lag_ms"].get("p99", 0)))
' "$TMP/$name.out") load=${rate}rps $(<"$TMP/$name.cpu")" >"$TMP/$name.result"
}

# field NAME KEY: the value of KEY=... in the result of run NAME.
field() { tr ' ' '\n' <"$TMP/$1.result" | sed -n "s/^$2=//p"; }
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }
# added_p50 GATEWAY_RUN DIRECT_RUN: the difference of their p50, in ms.
added_p50() { awk -v g="$(field "$1" p50_us)" -v d="$(field "$2" p50_us)" \
    'BEGIN { printf "%.3f", (g - d) / 1000 }'; }
verdict() { if awk -v x="$1" -v op="$2" -v t="$3" \
    'BEGIN { exit !((op == ">=") ? (x >= t) : (x < t)) }'; then echo met; else echo "NOT met"; fi; }

# --- runs -------------------------------------------------------------------------------------
closed_loop warmup-direct "$SIM_URL" "$CONNS" "$THREADS" "$WARMUP"
closed_loop warmup-gateway "$GW_URL" "$CONNS" "$THREADS" "$WARMUP"
closed_loop direct "$SIM_URL" "$CONNS" "$THREADS" "$DURATION"
closed_loop gateway "$GW_URL" "$CONNS" "$THREADS" "$DURATION"
closed_loop direct-low "$SIM_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION"
closed_loop gateway-low "$GW_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION"
HALF_RATE=$(awk -v r="$(field gateway rps)" -v s="$HALF_SHARE" 'BEGIN { printf "%d", r * s }')
if ((HALF_RATE < 1)); then
    echo "error: the gateway's full-load rate is too low to derive a half-load rate" >&2
    exit 1
fi
open_loop direct-half "$SIM_URL" "$HALF_RATE" "$DURATION"
open_loop gateway-half "$GW_URL" "$HALF_RATE" "$DURATION"
ROWS=(direct gateway direct-low gateway-low direct-half gateway-half)

# --- summary ----------------------------------------------------------------------------------
echo
echo "mofa-gateway proxy benchmark: $(nproc) CPUs shared by the load generator, sim and gateway;" \
    "${DURATION}s per run; gateway worker_threads: ${GW_WORKERS:-default}"
echo "load: wrk connections (closed loop) or loadgen requests/s (open loop);" \
    "cpu_*: CPU seconds used during the run (load = wrk or loadgen, other = not started here)"
printf '%-13s %8s %9s %7s %7s %6s %7s %7s %6s %8s %9s %8s\n' run load req/s p50_ms p99_ms \
    failed sockerr cpu_sim cpu_gw cpu_load cpu_other cpu_idle
for r in "${ROWS[@]}"; do
    printf '%-13s %8s %9s %7s %7s %6s %7s %7s %6s %8s %9s %8s\n' "$r" "$(field "$r" load)" \
        "$(field "$r" rps)" "$(ms "$(field "$r" p50_us)")" "$(ms "$(field "$r" p99_us)")" \
        "$(field "$r" failed)" "$(field "$r" sockerr)" "$(field "$r" cpu_sim)" \
        "$(field "$r" cpu_gw)" "$(field "$r" cpu_load)" "$(field "$r" cpu_other)" \
        "$(field "$r" cpu_idle)"
done

# The verdicts use unrounded values; 3 decimals are shown.
ratio=$(awk -v g="$(field gateway rps)" -v d="$(field direct rps)" 'BEGIN { printf "%.6f", g / d }')
added_half=$(added_p50 gateway-half direct-half)
low_share=$(awk -v l="$(field gateway-low rps)" -v f="$(field gateway rps)" \
    'BEGIN { printf "%.0f", 100 * l / f }')
echo
echo "throughput, gateway / direct at $CONNS connections: $(printf '%.3f' "$ratio")" \
    "(target >= 0.75: $(verdict "$ratio" '>=' 0.75))"
echo "added p50 at $CONNS connections: $(added_p50 gateway direct) ms"
echo "added p50 at $LOW_CONNS connections: $(added_p50 gateway-low direct-low) ms" \
    "(that gateway run reached ${low_share}% of the $CONNS-connection gateway rate)"
echo "added p50 at half load, $HALF_RATE requests/s open loop: $added_half ms" \
    "(target < 0.2 ms: $(verdict "$added_half" '<' 0.2))"
for r in direct-half gateway-half; do
    if awk -v l="$(field "$r" lag_p99_ms)" 'BEGIN { exit !(l > 5) }'; then
        echo "warning: in run $r, loadgen launched requests up to $(field "$r" lag_p99_ms) ms" \
            "late (p99): it could not hold the rate"
    fi
done
# Other processes on the machine take CPU from the runs and bias the comparison: say so.
for r in "${ROWS[@]}"; do
    share=$(awk -v o="$(field "$r" cpu_other)" -v t="$(field "$r" cpu_total)" \
        'BEGIN { printf "%.0f", 100 * o / t }')
    if ((share >= 5)); then
        echo "warning: during run $r, other processes used ${share}% of the machine's CPU;" \
            "its figures are disturbed (rerun on a quiet machine)"
    fi
done
exit 0
