#!/usr/bin/env bash
# bench/faults.sh: what clients see while a backend dies and comes back, again and again.
#
# Method:
#   * Two simulators stand for the two deployments of one model: A (`local`, preferred by the
#     `local-first` policy) and B (`cloud`, the fallback), each with TTFT_MS time to first
#     token; the gateway sits in front (default resilience settings: 3 tries, breaker after 5
#     consecutive failures, open 10 s, then one probe).
#   * examples/loadgen sends a steady open-loop load of RATE non-streaming requests/s for
#     DURATION seconds (after 2 s of warm-up), twice, in one run:
#       1. baseline: nothing fails;
#       2. faults: every PERIOD seconds A is killed (SIGKILL) and restarted DOWN seconds later
#          on the same port.
#   * Failovers (tries that failed and went on to another deployment) are read from the
#     gateway's own counters: `GET /admin/orchestrator`, field `.counters.retries`, before and
#     after the faults run (warm-up included). Until the gateway has that field, the script
#     falls back to the sum of `x-mofa-attempts - 1` over the window's responses, which loadgen
#     reports (`attempts.retries`), and says which source it used. No log line is grepped.
#   * Reported for each run: the share of every outcome (the target for non-streaming requests
#     with a fallback is 0 client-visible errors), the success latency p50/p99/max, and the
#     cost of a failover: p99 and max with faults minus the baseline's.
#   * The simulators, the gateway and the load generator share the machine's cores.
# Traffic goes to 127.0.0.1 only; everything started here is stopped (by PID) on exit.
# Usage: bench/faults.sh   (env: RATE=200 DURATION=30 PERIOD=3 DOWN=1.5 TTFT_MS=5)
set -euo pipefail
export LC_ALL=C

RATE=${RATE:-200}
DURATION=${DURATION:-30}
PERIOD=${PERIOD:-3}
DOWN=${DOWN:-1.5}
TTFT_MS=${TTFT_MS:-5}

for v in RATE DURATION; do
    if ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $v must be a positive integer (got '${!v}')" >&2
        exit 2
    fi
done
if ! [[ $TTFT_MS =~ ^[0-9]+$ ]]; then
    echo "error: TTFT_MS must be an integer >= 0 (got '$TTFT_MS')" >&2
    exit 2
fi
for v in PERIOD DOWN; do
    if ! [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        echo "error: $v must be a number of seconds (got '${!v}')" >&2
        exit 2
    fi
done
for tool in curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required" >&2; exit 2; }
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Build, free ports, process tracking (by PID) and cleanup on exit: bench/lib.sh.
source "$ROOT/bench/lib.sh"
BODY='{"model":"mofa-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'

# A is killed and restarted by the killer loop (a subshell): its current PID lives in a file
# that lib.sh's cleanup reads, so the last A started is stopped on exit too.
PID_FILES+=("$TMP/a.pid")
start_a() {
    "$BIN" sim --listen "127.0.0.1:$PORT_A" --model mofa-sim --ttft-ms "$TTFT_MS" >>"$TMP/a.log" 2>&1 &
    LAST_PID=$!
    echo "$LAST_PID" >"$TMP/a.pid"
}
first_a() { PORT_A=$1 && start_a; }
start_b() { start b "$BIN" sim --listen "127.0.0.1:$1" --model mofa-sim --ttft-ms "$TTFT_MS"; }
start_gw() { start gateway "$BIN" serve --config "$TMP/gw.toml" --listen "127.0.0.1:$1"; }
# On free ports; restarted on another one if someone takes the port first (bench/lib.sh).
serve a first_a
serve b start_b
PORT_B=$PORT
B_PID=$LAST_PID
cat >"$TMP/gw.toml" <<EOF
[[models]]
name = "mofa-sim"
policy = "local-first"
[[models.deployments]]
kind = "local"
url = "http://127.0.0.1:$PORT_A/v1"
max_concurrency = 512
[[models.deployments]]
kind = "cloud"
provider = "backup"
url = "http://127.0.0.1:$PORT_B/v1"
max_concurrency = 512
EOF
serve gateway start_gw
GW_PID=$LAST_PID
GW_BASE="http://127.0.0.1:$PORT"
wait_ready a "http://127.0.0.1:$PORT_A/v1/models" "$(<"$TMP/a.pid")" -
wait_ready b "http://127.0.0.1:$PORT_B/v1/models" "$B_PID" -
wait_ready gateway "$GW_BASE/v1/chat/completions" "$GW_PID" "$BODY"

# retries_counter: the gateway's `.counters.retries`, or nothing when it has no such field.
retries_counter() {
    curl --noproxy '*' -s --max-time 5 "$GW_BASE/admin/orchestrator" | python3 -c '
import json, sys
try:
    n = json.load(sys.stdin)["counters"]["retries"]
    if isinstance(n, int):
        print(n)
except (ValueError, KeyError, TypeError):
    pass
' || true
}

run_load() {
    "$LOADGEN" --url "$GW_BASE/v1/chat/completions" --rate "$RATE" \
        --duration-s "$DURATION" --warmup-s 2 --max-outstanding 4000 --body "$BODY"
}

echo "baseline: $RATE req/s for $DURATION s, nothing fails" >&2
run_load >"$TMP/baseline.json"

echo "faults: A killed every $PERIOD s, back after $DOWN s" >&2
r0=$(retries_counter)
(
    while true; do
        sleep "$PERIOD"
        kill -KILL "$(<"$TMP/a.pid")" 2>/dev/null || true
        echo kill >>"$TMP/kills"
        sleep "$DOWN"
        start_a
    done
) &
KILLER=$!
PIDS+=("$KILLER")
run_load >"$TMP/faults.json"
kill "$KILLER" 2>/dev/null || true
wait "$KILLER" 2>/dev/null || true
r1=$(retries_counter)
kills=$(wc -l <"$TMP/kills" 2>/dev/null || echo 0)

python3 - "$TMP/baseline.json" "$TMP/faults.json" "$kills" "$r0" "$r1" <<'EOF'
import json, sys
base, faults = (json.load(open(p)) for p in sys.argv[1:3])
kills, r0, r1 = sys.argv[3:6]
header = faults.get("attempts", {}).get("retries")
if r0 and r1:
    print(f"A was killed {kills} times; failovers (tries that failed and were retried on another"
          f" deployment): {int(r1) - int(r0)}, from the gateway's counters.retries"
          f" (whole faults run, warm-up included)"
          + (f"; x-mofa-attempts - 1 summed by loadgen over the window: {header}" if header is not None else ""))
else:
    print(f"A was killed {kills} times; failovers (tries that failed and were retried on another"
          f" deployment): {header if header is not None else 'unknown'}, from x-mofa-attempts - 1"
          f" summed by loadgen over the window's responses (fallback: this gateway's"
          f" /admin/orchestrator has no counters.retries yet)")
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
