#!/usr/bin/env bash
# bench/instructions.sh: instructions the gateway executes per proxied request, counted by
# valgrind's callgrind: a figure that does not move with what else the machine is doing, for
# before/after comparisons of a change's cost on the hot path (bench/proxy.sh's CPU time is
# the real measure, but on a shared 2-core machine its runs spread by several percent).
#
# Method:
#   * Build the release binary and the load generator (bench/lib.sh); start one
#     `mofa-gateway sim` on a free loopback port.
#   * For each binary (BIN, and BIN_B when set: e.g. the build before a change; or the same
#     binary with another config: EXTRA and EXTRA_B are TOML appended to each one's config,
#     e.g. EXTRA_B=$'[usage]\nstore = "sqlite"\npath = "/tmp/u.db"'), twice: the
#     gateway under `valgrind --tool=callgrind` with one worker thread and the sim as its one
#     local deployment; 2 s of warm-up, then N1 (default 500) or N2 (default 1500) small
#     non-streaming chat completions at 100 req/s (loadgen), then SIGTERM (callgrind writes
#     its totals). Instructions per request = (I(N2) - I(N1)) / (N2 - N1): start-up, warm-up
#     and shutdown cancel out.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/instructions.sh    (env: BIN_B EXTRA EXTRA_B N1 N2; BODY: the request, JSON)

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N1=${N1:-500}
N2=${N2:-1500}
command -v valgrind >/dev/null 2>&1 || {
    echo "error: valgrind is required (Debian package valgrind)" >&2
    exit 2
}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

sim_ready --model m
BODY=${BODY:-'{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'}

# count BIN N EXTRA: the gateway's instructions for warm-up + N requests.
count() {
    local bin=$1 n=$2 extra=${3:-} port
    port=$(free_ports 1)
    cat >"$TMP/gw.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
worker_threads = 1
[[models]]
name = "m"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$SIM_PORT/v1"
EOF
    printf '%s\n' "$extra" >>"$TMP/gw.toml"
    start callgrind valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" \
        "$bin" serve --config "$TMP/gw.toml"
    local pid=$LAST_PID
    READY_S=60 wait_ready callgrind "http://127.0.0.1:$port/v1/chat/completions" "$pid" "$BODY"
    "$LOADGEN" --url "http://127.0.0.1:$port/v1/chat/completions" --rate 100 \
        --duration-s "$((n / 100))" --warmup-s 2 --body "$BODY" >"$TMP/lg.json"
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    grep -q '"outcomes":{"200":'"$n"'}' "$TMP/lg.json" || {
        echo "error: not all $n requests got 200: $(cat "$TMP/lg.json")" >&2
        exit 1
    }
    awk '/^totals:/ { print $2 }' "$TMP/cg.out"
}

per_request() {
    local a b
    a=$(count "$1" "$N1" "${2:-}")
    b=$(count "$1" "$N2" "${2:-}")
    echo $(((b - a) / (N2 - N1)))
}

echo "instructions per request (callgrind, 1 worker thread, non-streaming, $N1 vs $N2 requests)"
A=$(per_request "$BIN" "${EXTRA:-}")
echo "gateway    $BIN ${EXTRA:+(+ EXTRA)}: $A"
if [[ -n ${BIN_B:-} || -n ${EXTRA_B:-} ]]; then
    B=$(per_request "${BIN_B:-$BIN}" "${EXTRA_B:-}")
    echo "gateway-b  ${BIN_B:-$BIN} ${EXTRA_B:+(+ EXTRA_B)}: $B"
    python3 -c "print(f'gateway / gateway-b: {$A / $B:.4f}')"
fi
