#!/usr/bin/env bash
# bench/retry.sh: do clients that retry exactly when a 503 tells them succeed on that retry?
#
# Method:
#   * Start (bench/lib.sh: one release build, free loopback ports, cleanup by PID) a sim
#     answering in about SERVICE_MS (max_tokens 10 paced by --tokens-per-sec) and a gateway with
#     one model on it: max_concurrency SLOTS, [admission] max_queue QUEUE, max_queue_wait_ms
#     WAIT_MS. Capacity C = SLOTS / SERVICE_MS.
#   * Offer OVERLOAD_X x C requests/s, open loop (examples/loadgen.rs), for DURATION s after
#     WARMUP s, with --retry-as-told: each request answered 503 is sent once more, exactly
#     `retry-after-ms` later. The fresh arrivals go on meanwhile: a steady overload.
#   * Reported: hit_rate = retries that got a 200 / retries (target >= 0.80), the waits told,
#     goodput against C, the outcome shares.
# Traffic goes to 127.0.0.1 only. Every process started here is stopped on exit (by PID).
# Usage: bench/retry.sh  (env: SLOTS QUEUE SERVICE_MS OVERLOAD_X DURATION WARMUP WAIT_MS)

set -euo pipefail

SLOTS=${SLOTS:-2}
QUEUE=${QUEUE:-4}
SERVICE_MS=${SERVICE_MS:-500}
OVERLOAD_X=${OVERLOAD_X:-2}
DURATION=${DURATION:-30}
WARMUP=${WARMUP:-5}
WAIT_MS=${WAIT_MS:-10000}
MAX_TOKENS=10

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BODY="{\"model\":\"mofa-sim\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":$MAX_TOKENS}"
for v in SLOTS QUEUE SERVICE_MS DURATION WAIT_MS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: $v must be a positive integer" >&2; exit 2; }
done
source "$ROOT/bench/lib.sh"

# 10 tokens are paced over 9 intervals.
TPS=$(awk -v s="$SERVICE_MS" 'BEGIN { printf "%.3f", 9000 / s }')
RATE=$(awk -v n="$SLOTS" -v s="$SERVICE_MS" -v x="$OVERLOAD_X" 'BEGIN { printf "%.3f", x * n * 1000 / s }')
start_sim() { start sim "$BIN" sim --listen "127.0.0.1:$1" --model mofa-sim --tokens-per-sec "$TPS"; }
serve sim start_sim
SIM_PID=$LAST_PID
SIM_BASE="http://127.0.0.1:$PORT"
cat >"$TMP/gateway.toml" <<EOF
[admission]
max_queue = $QUEUE
max_queue_wait_ms = $WAIT_MS

[[models]]
name = "mofa-sim"
[[models.deployments]]
kind = "local"
url = "$SIM_BASE/v1"
max_concurrency = $SLOTS
EOF
start_gw() { start gateway "$BIN" serve --config "$TMP/gateway.toml" --listen "127.0.0.1:$1"; }
serve gateway start_gw
GW_PID=$LAST_PID
GW_BASE="http://127.0.0.1:$PORT"
wait_ready sim "$SIM_BASE/v1/chat/completions" "$SIM_PID"
wait_ready gateway "$GW_BASE/v1/chat/completions" "$GW_PID"

echo "== $RATE req/s (${OVERLOAD_X}x of $SLOTS slots x ${SERVICE_MS} ms) for ${DURATION}s (+${WARMUP}s), queue $QUEUE, retry as told" >&2
"$LOADGEN" --url "$GW_BASE/v1/chat/completions" --rate "$RATE" --duration-s "$DURATION" \
    --warmup-s "$WARMUP" --body "$BODY" --retry-as-told >"$TMP/run.json"
python3 - "$TMP/run.json" "$SLOTS" "$SERVICE_MS" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
cap = int(sys.argv[2]) * 1000 / int(sys.argv[3])
r = j["retry_as_told"]
print(f"capacity C       {cap:.2f} req/s (nominal)")
print(f"offered          {j['offered_rps']} req/s, launched {j['launched']}")
print(f"goodput          {j['goodput_rps']} req/s = {j['goodput_rps'] / cap:.2f} C (first tries only)")
print(f"outcomes         {j['outcomes']}")
print(f"retried as told  {r['retried']}, succeeded {r['succeeded']}: hit rate {r['hit_rate']:.3f} (target >= 0.80)")
print(f"told (ms)        {r['told_ms']}")
PY
