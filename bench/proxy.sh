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
#   * After a short warm-up of both (WARMUP seconds each), in one run and in this order:
#       1. full load: CONNS connections (default 32), THREADS wrk threads (default 2),
#          DURATION seconds (default 15); the sim directly, then the gateway;
#       2. low load: LOW_CONNS connections (default 4), same duration; the sim directly, then
#          the gateway. wrk is closed-loop (no fixed request rate), so a low connection count
#          stands in for "half load"; the report prints what share of the full-load rate it
#          reached, to judge how loaded it was.
#   * Reported per run: requests/s, p50, p99, errors (non-2xx/3xx responses, socket errors) and
#     the CPU seconds used by the backend, the gateway and wrk during the run; then
#       - throughput ratio = gateway requests/s / direct requests/s at full load;
#       - added p50 = gateway p50 - direct p50, in ms, at both loads.
#   * wrk, the sim and the gateway run on the same machine and share its cores: through the
#     gateway the CPU also runs a second server and a second hop, so the ratio is the cost of
#     the gateway on a box with no spare cores, not on a box where it has a core of its own.
#   * Caveat: the sim waits on a tokio timer even with --ttft-ms 0 (timer resolution 1 ms), so
#     each direct request takes ~1.1 ms at least. With STUB_CHECK=1 the script also compares,
#     with 1 connection, a timer-free Python stub that answers the same bytes at once, directly
#     and through a second gateway: the added latency of the gateway against an instant backend.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/proxy.sh      (env: CONNS THREADS DURATION LOW_CONNS WARMUP STUB_CHECK=0|1)

set -euo pipefail

CONNS=${CONNS:-32}
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
LOW_CONNS=${LOW_CONNS:-4}
WARMUP=${WARMUP:-3}
STUB_CHECK=${STUB_CHECK:-0}

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
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background, output in $TMP/NAME.log; sets LAST_PID.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# Waits until URL answers the benchmark request with a 200 (10 s at most).
wait_ready() {
    local name=$1 url=$2 pid=$3 i code=none
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

# gateway_config PORT: a gateway config whose model `mofa-sim` is the server on PORT.
gateway_config() {
    cat <<EOF
[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$1/v1"
max_concurrency = 1024
EOF
}

# Four free loopback ports, bound at the same time so that they differ.
read -r SIM_PORT GW_PORT STUB_PORT GW2_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
SIM_URL="http://127.0.0.1:$SIM_PORT/v1/chat/completions"
GW_URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"

start sim "$BIN" sim --listen "127.0.0.1:$SIM_PORT" --model mofa-sim --ttft-ms 0 --tokens-per-sec 0
SIM_PID=$LAST_PID
gateway_config "$SIM_PORT" >"$TMP/gateway.toml"
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
        "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
        "non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
        e.status, e.connect, e.read, e.write, e.timeout))
end
EOF

# --- measurement helpers ----------------------------------------------------------------------
TICK=$(getconf CLK_TCK)
# CPU time (user + system, clock ticks) used so far by process $1.
proc_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
# CPU time (user + system, seconds) used so far by this shell's finished children (wrk), into
# file $1. `times` must run in this shell, not in a $(...) subshell, hence the file.
child_secs() {
    times >"$TMP/times"
    awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                   printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TMP/times" >"$1"
}
secs() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { printf "%.2f", (b - a) / t }'; }

# run NAME URL CONNS THREADS SECONDS BACKEND_PID GATEWAY_PID: one wrk run. Its RESULT line,
# with the CPU seconds of the backend, the gateway and wrk appended, goes to $TMP/NAME.result.
run() {
    local name=$1 url=$2 conns=$3 threads=$4 dur=$5 be_pid=$6 gw_pid=$7 be0 gw0 be1 gw1
    echo "== $name: $conns connections, $threads threads, ${dur}s -> $url" >&2
    child_secs "$TMP/wrk0"
    be0=$(proc_ticks "$be_pid")
    gw0=$(proc_ticks "$gw_pid")
    if ! wrk -t "$threads" -c "$conns" -d "${dur}s" --timeout 5s --latency -s "$TMP/chat.lua" \
        "$url" >"$TMP/$name.out" 2>&1; then
        cat "$TMP/$name.out" >&2
        echo "error: wrk failed" >&2
        exit 1
    fi
    be1=$(proc_ticks "$be_pid")
    gw1=$(proc_ticks "$gw_pid")
    child_secs "$TMP/wrk1"
    grep -v '^RESULT ' "$TMP/$name.out" | sed 's/^/    /' >&2
    if ! grep -q '^RESULT ' "$TMP/$name.out"; then
        echo "error: no RESULT line from wrk" >&2
        exit 1
    fi
    printf '%s cpu_backend=%s cpu_gw=%s cpu_wrk=%s\n' "$(grep '^RESULT ' "$TMP/$name.out")" \
        "$(secs "$be0" "$be1" "$TICK")" "$(secs "$gw0" "$gw1" "$TICK")" \
        "$(secs "$(<"$TMP/wrk0")" "$(<"$TMP/wrk1")" 1)" >"$TMP/$name.result"
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
run warmup-direct "$SIM_URL" "$CONNS" "$THREADS" "$WARMUP" "$SIM_PID" "$GW_PID"
run warmup-gateway "$GW_URL" "$CONNS" "$THREADS" "$WARMUP" "$SIM_PID" "$GW_PID"
run direct "$SIM_URL" "$CONNS" "$THREADS" "$DURATION" "$SIM_PID" "$GW_PID"
run gateway "$GW_URL" "$CONNS" "$THREADS" "$DURATION" "$SIM_PID" "$GW_PID"
run direct-low "$SIM_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION" "$SIM_PID" "$GW_PID"
run gateway-low "$GW_URL" "$LOW_CONNS" "$LOW_THREADS" "$DURATION" "$SIM_PID" "$GW_PID"
ROWS=(direct gateway direct-low gateway-low)

if [[ $STUB_CHECK == 1 ]]; then
    # The stub answers every request with the bytes the sim sent for the same request.
    curl --noproxy '*' -s -o "$TMP/body.json" -H 'content-type: application/json' -d "$BODY" \
        "$SIM_URL"
    cat >"$TMP/stub.py" <<'EOF'
# Timer-free HTTP/1.1 keep-alive server: every request gets a fixed 200 application/json body.
import asyncio, sys
body = open(sys.argv[2], "rb").read()
resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(body), body)
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":", 1)[1])
            if n:
                await reader.readexactly(n)
            writer.write(resp)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
    STUB_URL="http://127.0.0.1:$STUB_PORT/v1/chat/completions"
    GW2_URL="http://127.0.0.1:$GW2_PORT/v1/chat/completions"
    start stub python3 "$TMP/stub.py" "$STUB_PORT" "$TMP/body.json"
    STUB_PID=$LAST_PID
    gateway_config "$STUB_PORT" >"$TMP/gateway-stub.toml"
    start gateway-stub "$BIN" serve --config "$TMP/gateway-stub.toml" --listen "127.0.0.1:$GW2_PORT"
    GW2_PID=$LAST_PID
    wait_ready stub "$STUB_URL" "$STUB_PID"
    wait_ready gateway-stub "$GW2_URL" "$GW2_PID"
    run warmup-stub "$GW2_URL" 1 1 "$WARMUP" "$STUB_PID" "$GW2_PID"
    run stub-direct "$STUB_URL" 1 1 "$DURATION" "$STUB_PID" "$GW2_PID"
    run stub-gateway "$GW2_URL" 1 1 "$DURATION" "$STUB_PID" "$GW2_PID"
    ROWS+=(stub-direct stub-gateway)
fi

# --- summary ----------------------------------------------------------------------------------
echo
echo "mofa-gateway proxy benchmark: $(nproc) CPUs shared by wrk, backend and gateway;" \
    "${DURATION}s per run; CPU columns in seconds"
printf '%-13s %5s %10s %8s %8s %7s %7s %8s %7s %7s\n' \
    run conns req/s p50_ms p99_ms non2xx sockerr cpu_back cpu_gw cpu_wrk
for r in "${ROWS[@]}"; do
    case $r in *-low) c=$LOW_CONNS ;; stub-*) c=1 ;; *) c=$CONNS ;; esac
    sockerr=$(($(field "$r" connect) + $(field "$r" read) + $(field "$r" write) + $(field "$r" timeout)))
    printf '%-13s %5s %10s %8s %8s %7s %7s %8s %7s %7s\n' "$r" "$c" "$(field "$r" rps)" \
        "$(ms "$(field "$r" p50_us)")" "$(ms "$(field "$r" p99_us)")" "$(field "$r" non2xx)" \
        "$sockerr" "$(field "$r" cpu_backend)" "$(field "$r" cpu_gw)" "$(field "$r" cpu_wrk)"
done

ratio=$(awk -v g="$(field gateway rps)" -v d="$(field direct rps)" 'BEGIN { printf "%.3f", g / d }')
added_low=$(added_p50 gateway-low direct-low)
low_share=$(awk -v l="$(field gateway-low rps)" -v f="$(field gateway rps)" \
    'BEGIN { printf "%.0f", 100 * l / f }')
echo
echo "throughput, gateway / direct at $CONNS connections: $ratio" \
    "(target >= 0.75: $(verdict "$ratio" '>=' 0.75))"
echo "added p50 at $CONNS connections: $(added_p50 gateway direct) ms"
echo "added p50 at $LOW_CONNS connections: $added_low ms (target < 0.2 ms: $(verdict "$added_low" '<' 0.2));" \
    "that gateway run reached ${low_share}% of the $CONNS-connection gateway rate"
if [[ $STUB_CHECK == 1 ]]; then
    echo "added p50 over the timer-free stub, 1 connection: $(added_p50 stub-gateway stub-direct) ms"
fi
exit 0
