# Shared by the benchmark scripts (sourced, not run): builds the release binary and the load
# generator, starts processes whose output goes to $TMP/NAME.log and kills them all on exit, and
# finds free loopback ports. Needs ROOT (the repository) and BODY (the request to probe with).

echo "== building (cargo build --release --bin mofa-gateway --example loadgen)" >&2
(cd "$ROOT" && cargo build --release --quiet --bin mofa-gateway --example loadgen)

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

# wait_ready NAME URL PID: waits until URL answers the benchmark request (BODY) with a 200
# (10 s at most); shows NAME's log and exits if it dies or does not.
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

# free_ports N: N free loopback ports, bound at the same time so that they differ.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
' "$1"
}
