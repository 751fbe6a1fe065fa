#!/usr/bin/env bash
# bench/usage_instructions.sh: what the SQLite usage ledger costs the gateway, counted in
# instructions instead of CPU time, so that a 5% difference is visible on a shared 2-core
# machine (bench/usage.sh's CPU-time rounds differ by ±15%).
#
# Method:
#   * One `mofa-gateway sim` (native). Two gateways, the same config but `[usage]` (`off`,
#     `store = "sqlite"`), each run under `valgrind --tool=callgrind` (all threads: the request
#     path, the ledger's writer, SQLite on the blocking pool).
#   * Each gets a warm-up (WARMUP requests at RATE req/s, examples/loadgen.rs), 2 s for the
#     ledger to write it, then its counters are zeroed (`callgrind_control -z`), then N
#     requests at RATE req/s, 2 s for the ledger to write them (it flushes every second), and
#     the counters are dumped (`callgrind_control -d`). Instructions per request = the dump's
#     total / N. Repeatable for the same binary and inputs: instructions, not seconds.
#   * Reported: instructions per request, off and sqlite, and their ratio.
#
# Traffic goes to 127.0.0.1 only. Every process started here is killed on exit.
# Usage: bench/usage_instructions.sh    (env: N RATE WARMUP; KEEP_DIR: keep the dumps there,
# for callgrind_annotate)

set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-2000}
RATE=${RATE:-100}
WARMUP=${WARMUP:-200}
command -v valgrind >/dev/null 2>&1 || {
    echo "error: valgrind is required (Debian: apt-get install valgrind)" >&2
    exit 2
}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

sim_ready --model m
BODY='{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'
: >"$TMP/results.txt"
for kind in off sqlite; do
    {
        echo '[server]'
        echo 'listen = "127.0.0.1:0"'
        if [[ $kind == sqlite ]]; then
            printf '[usage]\nstore = "sqlite"\npath = "%s"\n' "$TMP/usage.db"
        fi
        printf '[[models]]\nname = "m"\n[[models.deployments]]\nkind = "local"\n'
        printf 'url = "http://127.0.0.1:%s/v1"\nmax_concurrency = 1024\n' "$SIM_PORT"
    } >"$TMP/$kind.toml"
    gw_up() {
        start "gw-$kind" valgrind --tool=callgrind --callgrind-out-file="$TMP/cg-$kind.out" \
            "$BIN" serve --config "$TMP/$kind.toml" --listen "127.0.0.1:$1"
    }
    serve "gw-$kind" gw_up
    pid=$LAST_PID
    READY_S=60 wait_ready "gw-$kind" "http://127.0.0.1:$PORT/v1/chat/completions" "$pid" "$BODY"
    url="http://127.0.0.1:$PORT/v1/chat/completions"
    echo "== $kind: warm-up" >&2
    "$LOADGEN" --url "$url" --rate "$RATE" --duration-s $((WARMUP / RATE > 0 ? WARMUP / RATE : 1)) \
        --warmup-s 0 --body "$BODY" >/dev/null
    sleep 2
    callgrind_control -z "$pid" >/dev/null
    echo "== $kind: $N requests" >&2
    "$LOADGEN" --url "$url" --rate "$RATE" --duration-s $((N / RATE)) --warmup-s 0 \
        --body "$BODY" >"$TMP/$kind.json"
    sleep 2
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    dump=$(ls -t "$TMP"/cg-"$kind".out.* | head -1)
    ir=$(awk '/^summary:|^totals:/ { print $2; exit }' "$dump")
    echo "$kind $ir $TMP/$kind.json" >>"$TMP/results.txt"
    [[ -n ${KEEP_DIR:-} ]] && cp "$dump" "$KEEP_DIR/cg-$kind.out"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done

python3 - "$TMP" <<'PY'
import json, sys
tmp = sys.argv[1]
per = {}
for line in open(f"{tmp}/results.txt"):
    kind, ir, path = line.split()
    r = json.load(open(path))
    n = r["launched_all"]
    bad = sum(v for k, v in r["outcomes"].items() if k != "200")
    per[kind] = int(ir) / n
    print(f"{kind:7} {int(ir):>14,} instructions / {n} requests = {per[kind]:>10,.0f} per request (failed {bad})")
print(f"sqlite / off: {per['sqlite'] / per['off']:.4f}")
PY
