#!/usr/bin/env bash
# bench/faults.sh: what clients see while a backend dies and comes back, again and again.
#
# Method:
#   * Two simulators stand for the two deployments of one model: A (`local`, preferred by the
#     `local-first` policy) and B (`cloud`, the fallback), each with TTFT_MS time to first
#     token; the gateway sits in front (default resilience settings: 3 tries, breaker after 5
#     consecutive failures, open 10 s, then one probe).
#   * examples/loadgen sends a steady open-loop load of RATE non-streaming requests/s for
#     DURATION seconds, twice, in one run:
#       1. baseline: nothing fails;
#       2. faults: every PERIOD seconds A is killed (SIGKILL) and restarted DOWN seconds later
#          on the same port.
#   * Reported for each run: the share of every outcome (the target for non-streaming requests
#     with a fallback is 0 client-visible errors), the success latency p50/p99/max, and the
#     cost of a failover: p99 and max with faults minus the baseline's.
#   * The simulators, the gateway and the load generator share the machine's cores.
# Traffic goes to 127.0.0.1 only; everything started here is killed on exit.
# Usage: bench/faults.sh   (env: RATE=200 DURATION=30 PERIOD=3 DOWN=1.5 TTFT_MS=5)
set -euo pipefail

RATE=${RATE:-200}
DURATION=${DURATION:-30}
PERIOD=${PERIOD:-3}
DOWN=${DOWN:-1.5}
TTFT_MS=${TTFT_MS:-5}

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --quiet --bin mofa-gateway --example loadgen
bin="$root/target/release/mofa-gateway"
loadgen="$root/target/release/examples/loadgen"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # A is restarted by the killer loop in a subshell: find it by its port.
    [ -n "${port_a:-}" ] && pkill -9 -f -- "sim --listen 127.0.0.1:$port_a " 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "not up: $1" >&2; exit 1; }

port_a=$(free_port); port_b=$(free_port); port_gw=$(free_port)
start_a() {
    "$bin" sim --listen "127.0.0.1:$port_a" --model mofa-sim --ttft-ms "$TTFT_MS" >/dev/null 2>&1 &
    a_pid=$!
    disown "$a_pid"
}
start_a
"$bin" sim --listen "127.0.0.1:$port_b" --model mofa-sim --ttft-ms "$TTFT_MS" >/dev/null 2>&1 &
pids+=($!)
disown $!
cat >"$work/gw.toml" <<EOF
[[models]]
name = "mofa-sim"
policy = "local-first"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$port_a/v1"
max_concurrency = 512
[[models.deployments]]
kind = "cloud"
provider = "backup"
url = "http://127.0.0.1:$port_b/v1"
max_concurrency = 512
EOF
"$bin" serve --config "$work/gw.toml" --listen "127.0.0.1:$port_gw" >/dev/null 2>"$work/gw.log" &
pids+=($!)
disown $!
wait_up "http://127.0.0.1:$port_a/v1/models"
wait_up "http://127.0.0.1:$port_b/v1/models"
wait_up "http://127.0.0.1:$port_gw/healthz"

body='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
run_load() {
    "$loadgen" --url "http://127.0.0.1:$port_gw/v1/chat/completions" --rate "$RATE" \
        --duration-s "$DURATION" --warmup-s 2 --max-outstanding 4000 --body "$body"
}

echo "baseline: $RATE req/s for $DURATION s, nothing fails" >&2
run_load >"$work/baseline.json"

echo "faults: A killed every $PERIOD s, back after $DOWN s" >&2
(
    while true; do
        sleep "$PERIOD"
        kill -9 "$a_pid" 2>/dev/null || true
        echo kill >>"$work/kills"
        sleep "$DOWN"
        start_a
    done
) &
killer=$!
pids+=($killer)
run_load >"$work/faults.json"
kill "$killer" 2>/dev/null || true
kills=$(wc -l <"$work/kills" 2>/dev/null || echo 0)
# Each try that failed on A and went on to B is logged by the gateway.
failovers=$(grep -c "upstream failed" "$work/gw.log" || true)
echo "A was killed $kills times; tries that failed on A and were retried elsewhere: $failovers"

python3 - "$work/baseline.json" "$work/faults.json" <<'EOF'
import json, sys
base, faults = (json.load(open(p)) for p in sys.argv[1:3])
def summary(name, r):
    total = sum(r["outcomes"].values())
    shares = ", ".join(f"{k}: {v} ({100*v/total:.2f}%)" for k, v in sorted(r["outcomes"].items()))
    lat = r["latency_ms"].get("200", {})
    print(f"{name:9} requests {total}, {shares}")
    print(f"{'':9} success latency ms: p50 {lat.get('p50', 0):.2f}  p99 {lat.get('p99', 0):.2f}  max {lat.get('max', 0):.2f}")
    return total, lat
tb, lb = summary("baseline", base)
tf, lf = summary("faults", faults)
errors = sum(v for k, v in faults["outcomes"].items() if k != "200")
print(f"client-visible errors under faults: {errors} of {tf} ({100*errors/max(tf,1):.3f}%)  target: 0")
print(f"failover cost: p99 +{lf.get('p99',0)-lb.get('p99',0):.2f} ms, max +{lf.get('max',0)-lb.get('max',0):.2f} ms over the baseline")
EOF
