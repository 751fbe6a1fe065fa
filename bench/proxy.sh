#!/usr/bin/env bash
# bench/proxy.sh: what the gateway costs as a proxy, compared with calling the backend directly.
#
# Method:
#   * Build the release binary, then start two processes on free loopback ports:
#       - `mofa-gateway sim`: the simulated model server, with no time to first token and no
#         pacing (--ttft-ms 0 --tokens-per-sec 0), so it answers as fast as it can;
#       - `mofa-gateway serve`: the gateway, with one model `mofa-sim` whose one local
#         deployment is the sim (max_concurrency 1024, far above the load used here).
#   * wrk sends the same non-streaming request to both, with a Lua script that POSTs
#       {"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}
#     and prints, from its done() hook, requests/s and latency percentiles in microseconds.
#   * After a short warm-up of both, in one run and in this order:
#       1. full load, CONNS connections (default 32), THREADS wrk threads (default 2),
#          DURATION seconds (default 15): the sim directly, then the gateway;
#       2. low load, LOW_CONNS connections (default 4), same duration: the sim directly, then
#          the gateway. wrk is closed-loop (no fixed request rate), so a low connection count
#          stands in for "half load"; the report prints what share of the full-load rate it
#          reached, to judge how loaded it was.
#   * Reported: requests/s, p50, p99, error counts (non-2xx/3xx, socket errors), CPU seconds
#     used by the sim, the gateway and wrk during each run, and
#       - throughput ratio = gateway requests/s / direct requests/s at full load;
#       - added p50 = gateway p50 - direct p50, in ms, at both loads.
#   * Everything (wrk, the sim, the gateway) runs on the same machine and shares its cores:
#     through the gateway, the CPU also runs a second server and a second hop, so the ratio is
#     the cost of the gateway on a CPU-bound box, not on a box with spare cores.
#
# Traffic goes to 127.0.0.1 only. Both servers are killed on exit, whatever happens.
# Usage: bench/proxy.sh              (env: CONNS THREADS DURATION LOW_CONNS WARMUP)

set -euo pipefail

CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
LOW_CONNS=${LOW_CONNS:-4}
WARMUP=${WARMUP:-3}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/mofa-gateway"
BODY='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'

for v in CONNS THREADS DURATION LOW_CONNS WARMUP; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
if ((THREADS > CONNS)); then
    echo "error: THREADS ($THREADS) must not exceed CONNS ($CONNS)" >&2
    exit 2
fi
LOW_THREADS=$((THREADS < LOW_CONNS ? THREADS : LOW_CONNS))

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

# --- build ------------------------------------------------------------------------------------
echo "== building (cargo build --release)" >&2
(cd "$ROOT" && cargo build --release --quiet)

# --- processes, cleanup -----------------------------------------------------------------------
TMP=$(mktemp -d)
SIM_PID=""
GW_PID=""
cleanup() {
    local pid
    for pid in "$GW_PID" "$SIM_PID"; do
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in "$GW_PID" "$SIM_PID"; do
        [[ -n $pid ]] && wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Two free loopback ports, bound at the same time so that they differ.
read -r SIM_PORT GW_PORT < <(python3 -c '
import socket
a = socket.socket(); a.bind(("127.0.0.1", 0))
b = socket.socket(); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])
')
SIM_URL="http://127.0.0.1:$SIM_PORT/v1/chat/completions"
GW_URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"

"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --model mofa-sim --ttft-ms 0 --tokens-per-sec 0 \
    >"$TMP/sim.log" 2>&1 &
SIM_PID=$!

cat >"$TMP/gateway.toml" <<EOF
[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
max_concurrency = 1024
EOF
"$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$GW_PORT" >"$TMP/gateway.log" 2>&1 &
GW_PID=$!

# Waits until URL answers the benchmark request with a 200 (10 s at most).
wait_ready() {
    local name=$1 url=$2 pid=$3 i code
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: $name exited at start; its log:" >&2
            cat "$TMP/$name.log" >&2
            exit 1
        fi
        code=$(curl --noproxy '*' -s -o /dev/null -w '%{http_code}' --max-time 2 \
            -H 'content-type: application/json' -d "$BODY" "$url" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    echo "error: $name did not answer 200 within 10 s (last status: $code); its log:" >&2
    cat "$TMP/$name.log" >&2
    exit 1
}
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
        "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
        "non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
        e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

# --- measurement helpers ----------------------------------------------------------------------
TICK=$(getconf CLK_TCK)
# CPU time (user+system, clock ticks) of a process so far.
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# CPU time (user+system, seconds) of this shell's waited-for children so far (wrk).
# `times` must run in this shell, not in a $(...) subshell, hence the file.
child_secs() {
    times >"$TMP/times"
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TMP/times"
}

# run NAME URL CONNS THREADS DURATION: one wrk run; its RESULT line goes to $TMP/NAME.result,
# with the CPU seconds of each process appended.
run() {
    local name=$1 url=$2 conns=$3 threads=$4 secs=$5
    local sim0 gw0 wrk0 sim1 gw1 wrk1
    echo "== $name: $conns connections, $threads threads, ${secs}s -> $url" >&2
    child_secs >"$TMP/wrk0"
    sim0=$(proc_ticks "$SIM_PID"); gw0=$(proc_ticks "$GW_PID")
    wrk -t "$threads" -c "$conns" -d "${secs}s" --timeout 5s --latency -s "$TMP/chat.lua" "$url" \
        >"$TMP/$name.out" 2>&1 || { cat "$TMP/$name.out" >&2; echo "error: wrk failed" >&2; exit 1; }
    sim1=$(proc_ticks "$SIM_PID"); gw1=$(proc_ticks "$GW_PID")
    child_secs >"$TMP/wrk1"
    wrk0=$(<"$TMP/wrk0"); wrk1=$(<"$TMP/wrk1")
    sed 's/^/    /' "$TMP/$name.out" | grep -v '^    RESULT' >&2
    if ! grep -q '^RESULT ' "$TMP/$name.out"; then
        echo "error: no RESULT line from wrk" >&2
        exit 1
    fi
    printf '%s cpu_sim=%s cpu_gw=%s cpu_wrk=%s\n' "$(grep '^RESULT ' "$TMP/$name.out")" \
        "$(awk -v a="$sim0" -v b="$sim1" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }')" \
        "$(awk -v a="$gw0" -v b="$gw1" -v t="$TICK" 'BEGIN { printf "%.2f", (b - a) / t }')" \
        "$(awk -v a="$wrk0" -v b="$wrk1" 'BEGIN { printf "%.2f", b - a }')" \
        >"$TMP/$name.result"
}
# field NAME KEY: the value of KEY=... in the result of run NAME.
field() { tr ' ' '\n' <"$TMP/$1.result" | sed -n "s/^$2=//p"; }

# --- runs -------------------------------------------------------------------------------------
run warmup-direct "$SIM_URL" "$CONNS" "$THREADS" "$WARMUP"
run warmup-gateway "$GW_URL" "$CONNS" "$THREADS" "$WARMUP"
run direct "$SIM_URL" "$CONNS" "$THREADS" "$DURATION"
run gateway "$GW_URL" "$CONNS" "$THREADS" "$DURATION"
run direct-low "$SIM_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION"
run gateway-low "$GW_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION"

# --- summary ----------------------------------------------------------------------------------
ms() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1000 }'; }
echo
echo "mofa-gateway proxy benchmark ($(nproc) CPUs shared by wrk, sim and gateway; ${DURATION}s per run)"
printf '%-12s %5s %10s %9s %9s %7s %8s %7s %7s %7s\n' \
    run conns req/s p50_ms p99_ms non2xx sockerr cpu_sim cpu_gw cpu_wrk
for r in direct gateway direct-low gateway-low; do
    case $r in *-low) c=$LOW_CONNS ;; *) c=$CONNS ;; esac
    sockerr=$(($(field "$r" connect) + $(field "$r" read) + $(field "$r" write) + $(field "$r" timeout)))
    printf '%-12s %5s %10s %9s %9s %7s %8s %7s %7s %7s\n' "$r" "$c" "$(field "$r" rps)" \
        "$(ms "$(field "$r" p50_us)")" "$(ms "$(field "$r" p99_us)")" "$(field "$r" non2xx)" \
        "$sockerr" "$(field "$r" cpu_sim)" "$(field "$r" cpu_gw)" "$(field "$r" cpu_wrk)"
done

ratio=$(awk -v g="$(field gateway rps)" -v d="$(field direct rps)" 'BEGIN { printf "%.3f", g / d }')
added_full=$(awk -v g="$(field gateway p50_us)" -v d="$(field direct p50_us)" \
    'BEGIN { printf "%.3f", (g - d) / 1000 }')
added_low=$(awk -v g="$(field gateway-low p50_us)" -v d="$(field direct-low p50_us)" \
    'BEGIN { printf "%.3f", (g - d) / 1000 }')
low_share=$(awk -v l="$(field gateway-low rps)" -v f="$(field gateway rps)" \
    'BEGIN { printf "%.0f", 100 * l / f }')
verdict() { if awk -v x="$1" -v op="$2" -v t="$3" \
    'BEGIN { exit !((op == ">=") ? (x >= t) : (x < t)) }'; then echo met; else echo "NOT met"; fi; }

echo
echo "throughput ratio (gateway / direct, $CONNS conns): $ratio  [target >= 0.75: $(verdict "$ratio" '>=' 0.75)]"
echo "added p50 at $CONNS conns:                          ${added_full} ms"
echo "added p50 at $LOW_CONNS conns (low load):            ${added_low} ms  [target < 0.2 ms: $(verdict "$added_low" '<' 0.2)]"
echo "  (the $LOW_CONNS-connection gateway run reached ${low_share}% of the $CONNS-connection gateway rate)"
exit 0
