#!/usr/bin/env bash
# bench/observe.sh: what metrics and the access log cost, in one run.
#
# Method:
#   * One simulated backend (`mofa-gateway sim`, no TTFT, no pacing) and three gateways in
#     front of it, all on free loopback ports, each with the same config as bench/proxy.sh
#     (one model `mofa-sim`, max_concurrency 64):
#       - base:    BASE_BIN, a build without the metrics and the extended access log (default
#                  target/bench-base/mofa-gateway; build it from the commit before them), with
#                  RUST_LOG=warn;
#       - metrics: this build, RUST_LOG=warn: the Prometheus registry and the status windows
#                  are fed on every request, no access log line is written;
#       - full:    this build, RUST_LOG=info: metrics plus one access log line per request
#                  (text, to a file), as in production.
#   * Every request: the non-streaming POST of bench/proxy.sh. After a warm-up of each, ROUNDS
#     rounds (default 3); each round runs wrk (CONNS connections, default 32, 2 threads,
#     DURATION seconds, default 10) against base, metrics and full in turn, so that a
#     disturbance of the machine spreads over all three. /metrics is scraped once a second
#     during the `metrics` and `full` runs, as a Prometheus server would.
#   * Reported: requests/s of every run, the median per gateway, and the ratio of each to
#     base (target: full >= 0.95, i.e. less than 5% fewer requests/s).
#
# Traffic goes to 127.0.0.1 only; every process started here is killed on exit.
# Usage: BASE_BIN=path bench/observe.sh    (env: CONNS DURATION ROUNDS WARMUP)

set -euo pipefail
export LC_ALL=C
CONNS=${CONNS:-32}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/target/release/mofa-gateway"
BASE_BIN=${BASE_BIN:-$ROOT/target/bench-base/mofa-gateway}
BODY='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
for v in CONNS DURATION ROUNDS WARMUP; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: $v must be a positive integer" >&2; exit 2; }
done
[[ -x $BASE_BIN ]] || { echo "error: BASE_BIN ($BASE_BIN) is not an executable" >&2; exit 2; }
command -v wrk >/dev/null 2>&1 || { echo "error: wrk is required (apt-get install wrk)" >&2; exit 2; }

source "$ROOT/bench/lib.sh"
read -r SIM_PORT P_BASE P_METRICS P_FULL < <(free_ports 4)
start sim "$BIN" sim --listen "127.0.0.1:$SIM_PORT" --model mofa-sim --ttft-ms 0 --tokens-per-sec 0
SIM_PID=$LAST_PID
cat >"$TMP/gateway.toml" <<EOF
[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
max_concurrency = 64
EOF
RUST_LOG=warn start base "$BASE_BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$P_BASE"
BASE_PID=$LAST_PID
RUST_LOG=warn start metrics "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$P_METRICS"
METRICS_PID=$LAST_PID
RUST_LOG=info start full "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$P_FULL"
FULL_PID=$LAST_PID
wait_ready sim "http://127.0.0.1:$SIM_PORT/v1/chat/completions" "$SIM_PID"
wait_ready base "http://127.0.0.1:$P_BASE/v1/chat/completions" "$BASE_PID"
wait_ready metrics "http://127.0.0.1:$P_METRICS/v1/chat/completions" "$METRICS_PID"
wait_ready full "http://127.0.0.1:$P_FULL/v1/chat/completions" "$FULL_PID"

cat >"$TMP/chat.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'
function done(summary, latency, requests)
    io.write(string.format("RESULT rps=%.1f failed=%d\n",
        summary.requests / (summary.duration / 1e6), summary.errors.status))
end
EOF

# run NAME PORT SECONDS: a wrk run; prints its requests/s (and scrapes /metrics meanwhile
# for the gateways that have it).
run() {
    local name=$1 port=$2 secs=$3 scraper=""
    if [[ $name != base ]]; then
        (while sleep 1; do curl --noproxy '*' -s -o /dev/null "http://127.0.0.1:$port/metrics"; done) &
        scraper=$!
    fi
    wrk -t 2 -c "$CONNS" -d "${secs}s" --timeout 5s -s "$TMP/chat.lua" \
        "http://127.0.0.1:$port/v1/chat/completions" >"$TMP/wrk.out" 2>&1 || true
    [[ -n $scraper ]] && { kill "$scraper" 2>/dev/null; wait "$scraper" 2>/dev/null || true; }
    local line
    line=$(sed -n 's/^RESULT //p' "$TMP/wrk.out")
    [[ -n $line ]] || { cat "$TMP/wrk.out" >&2; echo "error: no result from wrk" >&2; exit 1; }
    [[ $line == *"failed=0"* ]] || echo "warning: $name: non-2xx answers ($line)" >&2
    echo "${line%% *}" | sed 's/rps=//'
}

for g in base:$P_BASE metrics:$P_METRICS full:$P_FULL; do run "${g%%:*}" "${g##*:}" "$WARMUP" >/dev/null; done
declare -A RPS
for ((r = 1; r <= ROUNDS; r++)); do
    for g in base:$P_BASE metrics:$P_METRICS full:$P_FULL; do
        name=${g%%:*}
        v=$(run "$name" "${g##*:}" "$DURATION")
        echo "round $r $name: $v req/s" >&2
        RPS[$name]="${RPS[$name]:-} $v"
    done
done
median() { tr ' ' '\n' <<<"$1" | sed '/^$/d' | sort -n | awk '{ a[NR] = $1 } END {
    print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo
echo "mofa-gateway observability cost: $(nproc) CPUs shared by wrk, the sim and the gateways;" \
    "$ROUNDS rounds of ${DURATION}s at $CONNS connections"
printf '%-8s %-40s %10s %8s\n' gateway "req/s per round" median "vs base"
B=$(median "${RPS[base]}")
for name in base metrics full; do
    m=$(median "${RPS[$name]}")
    printf '%-8s %-40s %10s %8s\n' "$name" "${RPS[$name]# }" "$m" \
        "$(awk -v m="$m" -v b="$B" 'BEGIN { printf "%.3f", m / b }')"
done
ratio=$(awk -v m="$(median "${RPS[full]}")" -v b="$B" 'BEGIN { printf "%.3f", m / b }')
echo "full / base: $ratio (target >= 0.95: $(awk -v r="$ratio" 'BEGIN { print (r >= 0.95) ? "met" : "NOT met" }'))"
echo "access log lines written by 'full': $(grep -c 'mofa_gateway::access' "$TMP/full.log" || true)"
